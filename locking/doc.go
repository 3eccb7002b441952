// Package locking guards work with locks that hold across every instance of
// every function.
package locking
