package lockingtest

import (
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
)

// RunRestart checks what a restart of the store does to held locks, for
// stores that lose their data when they restart (memcached, a Valkey without
// persistence). On the backend: the holder's Renew fails with ErrNotHeld,
// another owner acquires at once, and its token is still above the lost
// holding's (both of this module's Weak backends seed their token counters
// from a clock). Through a Client: the holder is told at its next renewal
// (Done closes, Err wraps ErrLockLost), another instance acquires at once,
// and the old holder's Release returns ErrLockLost. restart must restart the
// store and return once it answers again. newBackend is as for Run.
func RunRestart(t *testing.T, newBackend NewBackend, restart func(tb testing.TB)) {
	t.Helper()
	t.Run("Backend", func(t *testing.T) { restartBackend(t, newBackend, restart) })
	t.Run("Client", func(t *testing.T) { restartClient(t, newBackend, restart) })
}

func restartBackend(t *testing.T, newBackend NewBackend, restart func(tb testing.TB)) {
	holder, other := newBackend(t), newBackend(t)
	ctx := t.Context()
	lockID := id(t, "restart")
	mine := locking.Request{ID: lockID, Owner: owner(), Lease: time.Minute}
	theirs := locking.Request{ID: lockID, Owner: owner(), Lease: time.Minute}
	g1, err := holder.Acquire(ctx, mine)
	if err != nil || !g1.Acquired {
		t.Fatalf("Acquire = %+v, %v", g1, err)
	}
	if g, _ := other.Acquire(ctx, theirs); g.Acquired {
		t.Fatal("acquired a held lock")
	}
	restart(t)
	if _, err := holder.Renew(ctx, mine); !errors.Is(err, locking.ErrNotHeld) {
		t.Fatalf("Renew after restart = %v, want ErrNotHeld", err)
	}
	g2, err := other.Acquire(ctx, theirs)
	if err != nil || !g2.Acquired {
		t.Fatalf("Acquire after restart = %+v, %v", g2, err)
	}
	if g2.Token <= g1.Token {
		t.Errorf("token after restart %d <= token before %d", g2.Token, g1.Token)
	}
}

func restartClient(t *testing.T, newBackend NewBackend, restart func(tb testing.TB)) {
	const lease = 3 * time.Second // renewed every second
	newClient := func() *locking.Client {
		b := newBackend(t)
		c, err := locking.New(locking.Config{Strong: b, Weak: b, Lease: lease, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	holder, other := newClient(), newClient()
	ctx := t.Context()
	lockID := id(t, "restart")
	l, err := holder.Acquire(ctx, lockID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Acquire(ctx, lockID, locking.Wait(false)); !errors.Is(err, locking.ErrNotAcquired) {
		t.Fatalf("second Acquire before the restart = %v, want ErrNotAcquired", err)
	}
	restart(t)
	restarted := time.Now()
	select {
	case <-l.Done():
	case <-time.After(lease + 2*time.Second):
		t.Fatalf("Done not closed within %v of the restart (renewals every %v)", lease+2*time.Second, lease/3)
	}
	t.Logf("holder told %v after the restart", time.Since(restarted).Round(time.Millisecond))
	if err := l.Err(); !errors.Is(err, locking.ErrLockLost) {
		t.Errorf("Err() = %v, want ErrLockLost", err)
	}
	l2, err := other.Acquire(ctx, lockID, locking.Wait(false))
	if err != nil {
		t.Fatalf("Acquire after the restart: %v", err)
	}
	if err := l.Release(ctx); !errors.Is(err, locking.ErrLockLost) {
		t.Errorf("Release of the lost lock = %v, want ErrLockLost", err)
	}
	if err := l2.Release(ctx); err != nil {
		t.Errorf("Release: %v", err)
	}
}
