package redislock_test

import (
	"testing"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockingtest"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// TestRestartThroughClient restarts the real server under a held lock, with
// the core client on top: the holder is told at its next renewal and
// another instance can acquire the lock at once.
func TestRestartThroughClient(t *testing.T) {
	srv := redistest.Start(t)
	prefix := uniquePrefix()
	lockingtest.RunRestart(t, func(t *testing.T) locking.Backend {
		return newBackend(t, srv.Addr, prefix, nil)
	}, srv.Restart)
}
