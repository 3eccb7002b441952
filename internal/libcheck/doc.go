// Package libcheck holds the test that taskguard's libraries are libraries:
// importing them registers no Cloud Run function, sets no global logger,
// and links neither the Functions Framework's registry nor a lock backend
// the program did not import.
package libcheck
