package locking_test

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// renewCounter counts renewals per lock id and keeps the context of the
// last Release.
type renewCounter struct {
	locking.Backend
	mu         sync.Mutex
	renewals   map[string]int
	releaseCtx context.Context
	onRelease  func(ctx context.Context)
}

func newRenewCounter() *renewCounter {
	return &renewCounter{Backend: memlock.New(), renewals: map[string]int{}}
}

func (b *renewCounter) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	b.mu.Lock()
	b.renewals[r.ID]++
	b.mu.Unlock()
	return b.Backend.Renew(ctx, r)
}

func (b *renewCounter) Release(ctx context.Context, id, owner string) error {
	b.mu.Lock()
	b.releaseCtx = ctx
	f := b.onRelease
	b.mu.Unlock()
	if f != nil {
		f(ctx)
	}
	return b.Backend.Release(ctx, id, owner)
}

func (b *renewCounter) count(id string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.renewals[id]
}

type ctxKey struct{}

// TestReleaseContext checks the context a store's Release gets: the
// caller's values without its cancellation, a deadline 10 s from the
// store's first look, cancelled (children too) once Release returns.
func TestReleaseContext(t *testing.T) {
	b := newRenewCounter()
	var child context.Context
	var stopChild context.CancelFunc
	var deadline time.Time
	var errDuring error
	b.onRelease = func(ctx context.Context) {
		d, ok := ctx.Deadline()
		if !ok {
			t.Error("release context has no deadline")
		}
		deadline, errDuring = d, ctx.Err()
		child, stopChild = context.WithCancel(ctx)
	}
	c := newClient(t, b, locking.Config{})
	defer func() { stopChild() }()
	l, err := c.Acquire(t.Context(), "ctx")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.WithValue(t.Context(), ctxKey{}, "v"))
	cancel()
	start := time.Now()
	if err := l.Release(ctx); err != nil {
		t.Fatalf("Release = %v", err)
	}
	rctx := b.releaseCtx
	if got := rctx.Value(ctxKey{}); got != "v" {
		t.Errorf("release context value = %v; want the caller's", got)
	}
	if errDuring != nil {
		t.Errorf("release context Err during the call = %v; want nil (detached from the caller's)", errDuring)
	}
	if left := deadline.Sub(start); left <= 9*time.Second || left > 10*time.Second+time.Second {
		t.Errorf("release deadline %v after Release began; want about 10s", left)
	}
	select {
	case <-child.Done():
	default:
		t.Error("a context derived from the release context is not cancelled after Release returned")
	}
	if !errors.Is(rctx.Err(), context.Canceled) || !errors.Is(context.Cause(rctx), context.Canceled) {
		t.Errorf("release context after Release: Err %v, Cause %v; want context.Canceled", rctx.Err(), context.Cause(rctx))
	}
}

// TestReleaseContextBound checks that a store call that waits for its
// context is ended 10 s after it began.
func TestReleaseContextBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newRenewCounter()
		b.onRelease = func(ctx context.Context) { <-ctx.Done() }
		c := newClient(t, b, locking.Config{})
		l, err := c.Acquire(t.Context(), "bound")
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_ = l.Release(t.Context())
		if got := time.Since(start); got != 10*time.Second {
			t.Errorf("Release of a store that waits for its context returned after %v; want 10s", got)
		}
		if !errors.Is(b.releaseCtx.Err(), context.DeadlineExceeded) {
			t.Errorf("release context Err = %v; want DeadlineExceeded", b.releaseCtx.Err())
		}
	})
}

// TestRenewalsOfManyLocks checks, on the real clock, that one client keeps
// renewing locks of different leases each on its own schedule, and that a
// released lock's renewals stop while the others go on.
func TestRenewalsOfManyLocks(t *testing.T) {
	b := newRenewCounter()
	c := newClient(t, b, locking.Config{MinBackoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond})
	leases := map[string]time.Duration{"a": 150 * time.Millisecond, "b": 300 * time.Millisecond, "c": 600 * time.Millisecond, "d": 90 * time.Millisecond}
	locks := map[string]*locking.Lock{}
	for id, lease := range leases {
		l, err := c.Acquire(t.Context(), id, locking.Lease(lease))
		if err != nil {
			t.Fatal(err)
		}
		locks[id] = l
	}
	time.Sleep(450 * time.Millisecond)
	if err := locks["d"].Release(t.Context()); err != nil {
		t.Fatalf("Release(d) = %v", err)
	}
	dAtRelease := b.count("d")
	time.Sleep(450 * time.Millisecond)
	for id, l := range locks {
		if id == "d" {
			continue
		}
		if err := l.Err(); err != nil {
			t.Errorf("lock %s: %v; want held", id, err)
		}
		// Renewed every third of the lease over 900 ms; allow for a loaded
		// machine by asking for half.
		if got, want := b.count(id), int(900*time.Millisecond/(leases[id]/3))/2; got < want {
			t.Errorf("lock %s (lease %v): %d renewals in 900ms; want at least %d", id, leases[id], got, want)
		}
		if err := l.Release(t.Context()); err != nil {
			t.Errorf("Release(%s) = %v", id, err)
		}
	}
	if dAtRelease < 2 {
		t.Errorf("lock d (lease 90ms): %d renewals in 450ms; want at least 2", dAtRelease)
	}
	if got := b.count("d"); got != dAtRelease {
		t.Errorf("lock d renewed %d times after its Release", got-dAtRelease)
	}
}

// TestClientAcrossBubbles checks that one client serves callers outside a
// testing/synctest bubble, inside one, and outside again: its shared
// parts (the renewal timer, pooled queues) never carry a timer or channel
// from one to the other.
func TestClientAcrossBubbles(t *testing.T) {
	b := newRenewCounter()
	c := newClient(t, b, locking.Config{})
	hold := func(t *testing.T, id string, lease, d time.Duration) {
		t.Helper()
		l, err := c.Acquire(t.Context(), id, locking.Lease(lease))
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(d)
		if err := l.Err(); err != nil {
			t.Errorf("%s after %v: %v; want held", id, d, err)
		}
		if err := l.Release(t.Context()); err != nil {
			t.Errorf("Release(%s) = %v", id, err)
		}
		if b.count(id) < 2 {
			t.Errorf("%s: %d renewals while held %v with lease %v; want at least 2", id, b.count(id), d, lease)
		}
	}
	hold(t, "outside", 150*time.Millisecond, 300*time.Millisecond)
	synctest.Test(t, func(t *testing.T) {
		hold(t, "inside", 3*time.Second, 10*time.Second)
	})
	hold(t, "outside-again", 150*time.Millisecond, 300*time.Millisecond)
}

// TestLockContextCostsNoGoroutine checks that Lock.Context runs no
// goroutine: held locks whose contexts were asked for (and whose acquiring
// contexts can end) run as many goroutines as before, and none is left
// after they end.
func TestLockContextCostsNoGoroutine(t *testing.T) {
	c := newClient(t, memlock.New(), locking.Config{})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var locks []*locking.Lock
	for i := range 20 {
		l, err := c.Acquire(ctx, "g"+string(rune('a'+i)))
		if err != nil {
			t.Fatal(err)
		}
		locks = append(locks, l)
	}
	before := runtime.NumGoroutine()
	var ctxs []context.Context
	for _, l := range locks {
		ctxs = append(ctxs, l.Context())
	}
	if after := runtime.NumGoroutine(); after != before {
		t.Errorf("%d goroutines after asking 20 held locks for their contexts; %d before", after, before)
	}
	for _, l := range locks[:10] {
		if err := l.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	cancel() // ends the other 10 with their acquiring context
	for i, lctx := range ctxs {
		select {
		case <-lctx.Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("lock %d: Context not done after its lock ended", i)
		}
		if !errors.Is(context.Cause(lctx), locking.ErrNotHeld) {
			t.Errorf("lock %d: cause %v; want ErrNotHeld", i, context.Cause(lctx))
		}
	}
}

// flakyRenew fails the first fails renewals, then passes them on.
type flakyRenew struct {
	*renewCounter
	mu    sync.Mutex
	fails int
}

func (b *flakyRenew) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	b.mu.Lock()
	fail := b.fails > 0
	if fail {
		b.fails--
	}
	b.mu.Unlock()
	if fail {
		b.renewCounter.mu.Lock()
		b.renewals[r.ID]++
		b.renewCounter.mu.Unlock()
		return locking.Grant{}, errUnavailable
	}
	return b.renewCounter.Renew(ctx, r)
}

// TestRenewalRetriesOnTheClientSchedule checks, on the real clock, that a
// renewal that fails is retried after a backoff on the client's schedule
// and that the lock, renewed in time, stays held.
func TestRenewalRetriesOnTheClientSchedule(t *testing.T) {
	b := &flakyRenew{renewCounter: newRenewCounter(), fails: 3}
	c := newClient(t, b, locking.Config{MinBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	const lease = 600 * time.Millisecond
	l, err := c.Acquire(t.Context(), "flaky", locking.Lease(lease))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * lease)
	if err := l.Err(); err != nil {
		t.Fatalf("lock after 3 failed renewals and %v: %v; want held", 2*lease, err)
	}
	// 3 failures retried within a few backoffs of the first renewal (at a
	// third of the lease), then a renewal every third of the lease.
	if got := b.count("flaky"); got < 3+2 {
		t.Errorf("%d renewal attempts in %v; want the 3 failed ones and at least 2 more", got, 2*lease)
	}
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
}
