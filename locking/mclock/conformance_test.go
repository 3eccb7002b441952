package mclock_test

import (
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockingtest"
	"github.com/taskguard/taskguard/locking/mclock/mctest"
)

// TestConformance runs the locking conformance suite against a real
// memcached; every backend it asks for has a client of its own.
func TestConformance(t *testing.T) {
	srv := mctest.Start(t)
	prefix := uniquePrefix()
	lockingtest.Run(t, func(t *testing.T) locking.Backend {
		return newBackend(t, srv.Addr, prefix, nil)
	}, lockingtest.Options{Granularity: time.Second})
}
