package dslock

import (
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/locking/lockingtest"
)

// TestConformance runs the locking conformance suite against each emulator,
// every backend on its own connection. The granularity leaves room for the
// emulators' occasional slow commits (a few hundred ms on a loaded machine
// under -race), since the suite's leases are multiples of it.
func TestConformance(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		lockingtest.Run(t, func(t *testing.T) locking.Backend {
			return newBackend(t, e, Options{})
		}, lockingtest.Options{Granularity: 100 * time.Millisecond})
	})
}
