package redislock_test

import (
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// TestRestartThroughClient restarts the real server under a held lock: the
// holder's Done closes at its next renewal with ErrLockLost, and another
// instance can acquire the lock at once.
func TestRestartThroughClient(t *testing.T) {
	srv := redistest.Start(t)
	bs := sameStore(t, srv.Addr, 2)
	newClient := func(b locking.Backend) *locking.Client {
		c, err := locking.New(locking.Config{Weak: b, Lease: 3 * time.Second, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	holder, other := newClient(bs[0]), newClient(bs[1])
	ctx := t.Context()
	l, err := holder.Acquire(ctx, "restart", locking.Kind(locking.Weak))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Acquire(ctx, "restart", locking.Kind(locking.Weak), locking.Wait(false)); !errors.Is(err, locking.ErrNotAcquired) {
		t.Fatalf("second Acquire before the restart = %v, want ErrNotAcquired", err)
	}
	srv.Restart(t)
	restarted := time.Now()
	select {
	case <-l.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed within 5 s of the restart (renewals every 1 s)")
	}
	t.Logf("holder told %v after the restart", time.Since(restarted).Round(time.Millisecond))
	if err := l.Err(); !errors.Is(err, locking.ErrLockLost) {
		t.Errorf("Err() = %v, want ErrLockLost", err)
	}
	l2, err := other.Acquire(ctx, "restart", locking.Kind(locking.Weak), locking.Wait(false))
	if err != nil {
		t.Fatalf("Acquire after the restart: %v", err)
	}
	if err := l.Release(ctx); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Release of the lost lock = %v, want ErrNotHeld", err)
	}
	if err := l2.Release(ctx); err != nil {
		t.Errorf("Release: %v", err)
	}
}
