package redislock_test

import (
	"testing"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockingtest"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// TestServerRestart restarts the real server under held locks: a restart
// loses every lock; the holder finds out at its next renewal, a new owner
// can acquire at once, and the fencing token still grows (its counter is
// seeded from a clock).
func TestServerRestart(t *testing.T) {
	srv := redistest.Start(t)
	prefix := uniquePrefix()
	lockingtest.RunRestart(t, func(t *testing.T) locking.Backend {
		return newBackend(t, srv.Addr, prefix, nil)
	}, srv.Restart)
}
