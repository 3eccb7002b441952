package redislock_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// countingBackend counts the Acquire calls (polls) of a waiter.
type countingBackend struct {
	*redislock.Backend
	polls atomic.Int64
}

func (c *countingBackend) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	c.polls.Add(1)
	return c.Backend.Acquire(ctx, r)
}

// Watch is promoted from *redislock.Backend: the wrapper stays a Notifier.
var _ locking.Notifier = (*countingBackend)(nil)

func notifyClients(t *testing.T, addr string) (holder *locking.Client, waiter *locking.Client, wb *countingBackend) {
	t.Helper()
	bs := sameStore(t, addr, 2)
	wb = &countingBackend{Backend: bs[1]}
	var err error
	if holder, err = locking.New(locking.Config{Weak: bs[0]}); err != nil {
		t.Fatal(err)
	}
	if waiter, err = locking.New(locking.Config{Weak: wb}); err != nil {
		t.Fatal(err)
	}
	return holder, waiter, wb
}

// waitFor acquires id with c in the background and reports when it got it.
func waitFor(t *testing.T, c *locking.Client, id string) <-chan time.Time {
	t.Helper()
	got := make(chan time.Time, 1)
	go func() {
		l, err := c.Acquire(context.Background(), id, locking.Kind(locking.Weak), locking.MaxWait(30*time.Second))
		if err != nil {
			t.Errorf("waiter: %v", err)
			close(got)
			return
		}
		got <- time.Now()
		_ = l.Release(context.Background())
	}()
	return got
}

// TestReleaseIsAnnounced: a waiter on another client (another instance) is
// woken by the release's announcement, not by a poll: while the lock is
// held for 5 s it polls a handful of times (its first try, one when the
// subscription is confirmed, and a safety poll every 2 to 3 s), and it
// takes the lock well before its next safety poll could have.
func TestReleaseIsAnnounced(t *testing.T) {
	srv := redistest.Start(t)
	holder, waiter, wb := notifyClients(t, srv.Addr)
	l, err := holder.Acquire(t.Context(), "job", locking.Kind(locking.Weak))
	if err != nil {
		t.Fatal(err)
	}
	got := waitFor(t, waiter, "job")
	time.Sleep(5 * time.Second)
	polls := wb.polls.Load()
	released := time.Now()
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	at, ok := <-got
	if !ok {
		t.FailNow()
	}
	handoff := at.Sub(released)
	t.Logf("%d polls in 5 s of waiting; hand-off %v", polls, handoff)
	if polls > 2+2 {
		t.Errorf("%d polls while the lock was held 5 s; want at most 4 (first try, on confirmation, a safety poll every 2 to 3 s)", polls)
	}
	// Safety polls come 2 to 3 s apart: a hand-off this fast was woken by
	// the announcement.
	if handoff > locking.SafetyPoll/4 {
		t.Errorf("hand-off took %v; want it woken by the announcement, well under the %v safety poll", handoff, locking.SafetyPoll)
	}
}

// TestLostAnnouncementIsCoveredByPolls: the waiter's subscription is killed
// right before the release, so the announcement is lost; and in a second
// case the server restarts (every key lost). Either way the waiter still
// takes the lock, through its safety poll.
func TestLostAnnouncementIsCoveredByPolls(t *testing.T) {
	t.Run("SubscriptionDropped", func(t *testing.T) {
		srv := redistest.Start(t)
		holder, waiter, _ := notifyClients(t, srv.Addr)
		l, err := holder.Acquire(t.Context(), "job", locking.Kind(locking.Weak))
		if err != nil {
			t.Fatal(err)
		}
		got := waitFor(t, waiter, "job")
		time.Sleep(2500 * time.Millisecond)
		admin := newClient(t, srv.Addr, nil)
		n, err := admin.ClientKillByFilter(t.Context(), "TYPE", "pubsub").Result()
		if err != nil || n == 0 {
			t.Fatalf("CLIENT KILL TYPE pubsub = %d, %v; want the waiter's subscription killed", n, err)
		}
		if err := l.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
		select {
		case _, ok := <-got:
			if !ok {
				t.FailNow()
			}
		case <-time.After(3 * locking.SafetyPoll):
			t.Fatalf("the waiter did not take the lock within %v of a release whose announcement was lost", 3*locking.SafetyPoll)
		}
	})
	t.Run("ServerRestarted", func(t *testing.T) {
		srv := redistest.Start(t)
		if srv.External() {
			t.Skip("cannot restart an external server")
		}
		holder, waiter, _ := notifyClients(t, srv.Addr)
		l, err := holder.Acquire(t.Context(), "job", locking.Kind(locking.Weak), locking.Lease(time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		defer l.Release(context.Background())
		got := waitFor(t, waiter, "job")
		time.Sleep(1500 * time.Millisecond)
		srv.Restart(t) // the holding and the subscription are gone
		select {
		case _, ok := <-got:
			if !ok {
				t.FailNow()
			}
		case <-time.After(5 * locking.SafetyPoll):
			t.Fatalf("the waiter did not take the lock within %v of a restart that lost the holding", 5*locking.SafetyPoll)
		}
	})
}

// TestWatchWithoutPubSub: a client that cannot subscribe makes Watch fail
// with ErrNoPubSub, and the locking client polls instead.
func TestWatchWithoutPubSub(t *testing.T) {
	srv := redistest.Start(t)
	b, err := redislock.New(scripterOnly{newClient(t, srv.Addr, nil)}, redislock.Options{Prefix: uniquePrefix()})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Watch(t.Context(), "job"); !errors.Is(err, redislock.ErrNoPubSub) {
		t.Fatalf("Watch = %v; want ErrNoPubSub", err)
	}
	c, err := locking.New(locking.Config{Weak: b})
	if err != nil {
		t.Fatal(err)
	}
	l, err := c.Acquire(t.Context(), "job", locking.Kind(locking.Weak))
	if err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(300*time.Millisecond, func() { _ = l.Release(context.Background()) })
	l2, err := c.Acquire(t.Context(), "job", locking.Kind(locking.Weak), locking.MaxWait(10*time.Second))
	if err != nil {
		t.Fatalf("waiting by polls: %v", err)
	}
	_ = l2.Release(t.Context())
}

// scripterOnly hides every method of a client but those of redis.Scripter.
type scripterOnly struct{ redis.Scripter }

// TestTakeoverKeepsWaitersAnnounced: a holding that waiters were turned
// away from expires and is taken over; the new holding's release is
// announced too, since the others still wait.
func TestTakeoverKeepsWaitersAnnounced(t *testing.T) {
	srv := redistest.Start(t)
	b := newBackend(t, srv.Addr, uniquePrefix(), nil)
	ctx := t.Context()
	if g, err := b.Acquire(ctx, req("job", "a", 50*time.Millisecond)); err != nil || !g.Acquired {
		t.Fatalf("acquire: %+v %v", g, err)
	}
	if g, err := b.Acquire(ctx, req("job", "b", time.Second)); err != nil || g.Acquired {
		t.Fatalf("acquire of a held lock: %+v %v; want busy", g, err)
	}
	time.Sleep(80 * time.Millisecond)
	if g, err := b.Acquire(ctx, req("job", "c", time.Second)); err != nil || !g.TookOver {
		t.Fatalf("acquire after the lease ran out: %+v %v; want a takeover", g, err)
	}
	ch, stop, err := b.Watch(ctx, "job")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	select { // the subscription's confirmation
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("no confirmation of the subscription")
	}
	if err := b.Release(ctx, "job", "c"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("the release of a holding taken over while others waited was not announced")
	}
}
