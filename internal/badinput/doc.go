// Package badinput holds fuzz tests that feed arbitrary lock ids through
// every backend's key mapping and through the locking client. It has no
// code of its own; see its tests. The seed corpus is committed under
// testdata/fuzz and runs with every go test; make fuzz-short fuzzes for a
// few seconds per target.
package badinput
