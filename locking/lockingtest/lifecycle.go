package lockingtest

import (
	"context"
	"errors"
	"math"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
)

// The checks of a lock's life at its edges: a body never runs without its
// lock and its lock is never freed while it runs; a lock is never left behind
// by a context that ends, a reply that is lost or a Release called late;
// durations at their extremes.

// clientOver returns a client over b, configured like client.
func (s *suite) clientOver(t *testing.T, b locking.Backend) *locking.Client {
	t.Helper()
	c, err := locking.New(locking.Config{Strong: b, Weak: b, Lease: 20 * s.u, MinBackoff: s.u / 5, MaxBackoff: s.u})
	if err != nil {
		t.Fatalf("locking.New: %v", err)
	}
	return c
}

// mustBeFree checks that id can be acquired at once, and releases it.
func mustBeFree(t *testing.T, c *locking.Client, id, when string) {
	t.Helper()
	l, err := c.Acquire(t.Context(), id, locking.Wait(false))
	if err != nil {
		t.Fatalf("%s: Acquire(%q, Wait(false)) = %v; want the lock free", when, id, err)
	}
	release(t, l)
}

// withOutlivesContext: the context of With ends while its function runs a
// step that does not watch it. The function's context is cancelled, but the
// lock stays held, renewed beyond its first lease, until the function
// returns; only then is it released.
func (s *suite) withOutlivesContext(t *testing.T) {
	c1, _ := s.client(t)
	c2, _ := s.client(t)
	lockID := id(t, "x")
	// Renewed every lease/3; the step outlasts the first lease.
	lease := max(6*s.u, time.Second)
	step := lease * 3 / 2
	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(lease/6, cancel)
	probes := make(chan error, 2)
	var fnCtxErr error
	ran := false
	err := c1.With(ctx, lockID, func(fctx context.Context) error {
		ran = true
		for _, at := range []time.Duration{lease / 2, lease * 5 / 4} {
			time.AfterFunc(at, func() {
				_, err := c2.Acquire(t.Context(), lockID, locking.Wait(false))
				probes <- err
			})
		}
		time.Sleep(step) // a step that ignores its context
		fnCtxErr = fctx.Err()
		return nil
	}, locking.Lease(lease))
	if !ran {
		// The store took longer than lease/6 to grant (a loaded machine):
		// the context ended first, and With rightly did not run fn.
		t.Fatalf("With = %v before fn ran: the grant came after the context ended at %v", err, lease/6)
	}
	if err != nil {
		t.Errorf("With = %v; want nil: fn succeeded and the lock was held throughout", err)
	}
	if !errors.Is(fnCtxErr, context.Canceled) {
		t.Errorf("fn's context after the caller's ended: %v; want context.Canceled", fnCtxErr)
	}
	for i := range 2 {
		if err := <-probes; !errors.Is(err, locking.ErrNotAcquired) {
			t.Errorf("probe %d while fn still ran = %v; want ErrNotAcquired (the lock must stay held until fn returns)", i, err)
		}
	}
	mustBeFree(t, c2, lockID, "after With returned")
}

// cancelAfterGrant cancels a context just after the store granted a lock:
// the grant's reply arrives, then the caller's context is done.
type cancelAfterGrant struct {
	locking.Backend
	cancel context.CancelFunc
}

func (b *cancelAfterGrant) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	g, err := b.Backend.Acquire(ctx, r)
	b.cancel()
	return g, err
}

// grantAfterContextEnd: Acquire returns the context's error, not a lock
// already given back, and leaves nothing held; With never runs fn.
func (s *suite) grantAfterContextEnd(t *testing.T) {
	other, _ := s.client(t)
	t.Run("Acquire", func(t *testing.T) {
		lockID := id(t, "x")
		ctx, cancel := context.WithCancel(t.Context())
		c := s.clientOver(t, &cancelAfterGrant{Backend: s.newBackend(t), cancel: cancel})
		l, err := c.Acquire(ctx, lockID)
		if l != nil || !errors.Is(err, context.Canceled) {
			t.Fatalf("Acquire whose context ended as the grant arrived = (%v, %v); want (nil, context.Canceled)", l, err)
		}
		mustBeFree(t, other, lockID, "after the grant was given back")
	})
	t.Run("With", func(t *testing.T) {
		lockID := id(t, "x")
		ctx, cancel := context.WithCancel(t.Context())
		c := s.clientOver(t, &cancelAfterGrant{Backend: s.newBackend(t), cancel: cancel})
		ran := false
		err := c.With(ctx, lockID, func(context.Context) error { ran = true; return nil })
		if ran || !errors.Is(err, context.Canceled) {
			t.Fatalf("With whose context ended as the grant arrived = %v, fn ran = %v; want context.Canceled without running fn", err, ran)
		}
		mustBeFree(t, other, lockID, "after the grant was given back")
	})
}

// notReentrant: taking a lock that an enclosing With holds fails at once
// with ErrReentrant naming the id, whatever the kind (Strong and Weak share
// the store here) and whether by With or Acquire.
func (s *suite) notReentrant(t *testing.T) {
	c, _ := s.client(t)
	lockID := id(t, "x")
	err := c.With(t.Context(), lockID, func(ctx context.Context) error {
		cases := []struct {
			name string
			call func(ctx context.Context) error
		}{
			{"With", func(ctx context.Context) error {
				return c.With(ctx, lockID, func(context.Context) error { return errors.New("inner fn ran") }, locking.MaxWait(5*s.u))
			}},
			{"Acquire", func(ctx context.Context) error {
				l, err := c.Acquire(ctx, lockID, locking.MaxWait(5*s.u))
				if l != nil {
					_ = l.Release(ctx)
				}
				return err
			}},
			{"With of the other kind on the same store", func(ctx context.Context) error {
				return c.With(ctx, lockID, func(context.Context) error { return nil }, locking.Kind(locking.Weak), locking.MaxWait(5*s.u))
			}},
			{"With two levels down", func(ctx context.Context) error {
				return c.With(ctx, lockID+"/inner", func(ctx context.Context) error {
					return c.With(ctx, lockID, func(context.Context) error { return nil }, locking.MaxWait(5*s.u))
				})
			}},
		}
		for _, tc := range cases {
			start := time.Now()
			err := tc.call(ctx)
			if !errors.Is(err, locking.ErrReentrant) || !strings.Contains(err.Error(), lockID) {
				t.Errorf("%s of the held id = %v; want ErrReentrant naming %q", tc.name, err, lockID)
			}
			if d := time.Since(start); d > 2*s.u {
				t.Errorf("%s of the held id took %v; want an immediate error, not a wait", tc.name, d)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("outer With = %v", err)
	}
}

// releaseWithEndedContext: Release with a context that is already done
// (a deferred Release after a timeout) still releases the lock.
func (s *suite) releaseWithEndedContext(t *testing.T) {
	c := s.clientOver(t, honoursContext{s.newBackend(t)})
	other, _ := s.client(t)
	lockID := id(t, "x")
	l := s.acquire(t, c, lockID)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := l.Release(ctx); err != nil {
		t.Fatalf("Release with an ended context = %v; want nil", err)
	}
	mustBeFree(t, other, lockID, "after Release with an ended context")
}

// honoursContext refuses a call whose context is done, as every network
// client does, so that in-memory backends show the same behaviour.
type honoursContext struct{ locking.Backend }

func (b honoursContext) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := ctx.Err(); err != nil {
		return locking.Grant{}, err
	}
	return b.Backend.Acquire(ctx, r)
}

func (b honoursContext) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := ctx.Err(); err != nil {
		return locking.Grant{}, err
	}
	return b.Backend.Renew(ctx, r)
}

func (b honoursContext) Release(ctx context.Context, id, owner string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.Backend.Release(ctx, id, owner)
}

// slowRenew adds latency to every Renew: the request is on the wire while
// the caller's context ends, and fails with the context, as a network
// client's does.
type slowRenew struct {
	locking.Backend
	delay    time.Duration
	inFlight atomic.Int32
}

func (b *slowRenew) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	b.inFlight.Add(1)
	defer b.inFlight.Add(-1)
	t := time.NewTimer(b.delay)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return locking.Grant{}, ctx.Err()
	}
	return b.Backend.Renew(ctx, r)
}

// contextEndsDuringRenewal: the lock's context ends while a renewal is in
// flight. The lock ends as released, not lost, and is given back.
func (s *suite) contextEndsDuringRenewal(t *testing.T) {
	b := &slowRenew{Backend: s.newBackend(t), delay: s.u}
	c := s.clientOver(t, b)
	other, _ := s.client(t)
	lockID := id(t, "x")
	lease := 6 * s.u // the first renewal is sent at 2u and answered at 3u
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	l, err := c.Acquire(ctx, lockID, locking.Lease(lease))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(4 * s.u)
	for b.inFlight.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(s.u / 50)
	}
	if b.inFlight.Load() == 0 {
		t.Fatalf("no renewal in flight within 4u of a lease of 6u")
	}
	cancel()
	select {
	case <-l.Done():
	case <-time.After(lease):
		t.Fatalf("Done not closed within a lease of the context ending")
	}
	if err := l.Err(); errors.Is(err, locking.ErrLockLost) || !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Err() after the context ended during a renewal = %v; want ErrNotHeld (ended), not ErrLockLost", err)
	}
	mustBeFree(t, other, lockID, "after the lock ended with its context")
}

// replyLost applies an Acquire in the store and loses its reply.
type replyLost struct{ locking.Backend }

var errReplyLost = errors.New("lockingtest: the reply was lost")

func (b replyLost) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if _, err := b.Backend.Acquire(ctx, r); err != nil {
		return locking.Grant{}, err
	}
	return locking.Grant{}, errReplyLost
}

// ambiguousAcquire: an Acquire that the store applied but whose reply never
// came back leaves nothing held once the caller has its error.
func (s *suite) ambiguousAcquire(t *testing.T) {
	c := s.clientOver(t, replyLost{s.newBackend(t)})
	other, _ := s.client(t)
	lockID := id(t, "x")
	if _, err := c.Acquire(t.Context(), lockID); !errors.Is(err, errReplyLost) {
		t.Fatalf("Acquire whose reply was lost = %v; want the backend's error", err)
	}
	mustBeFree(t, other, lockID, "after an Acquire whose reply was lost")
}

// backendDurations checks Lease and StealAfter at their extremes: 1 ns
// (rounded up by the store, never down to "none"), MaxLease, and values
// above it, which are refused with ErrInvalid and write nothing.
func (s *suite) backendDurations(t *testing.T) {
	b, other := s.newBackend(t), s.newBackend(t)
	t.Run("Lease1ns", func(t *testing.T) {
		lockID := id(t, "x")
		g := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: time.Nanosecond})
		if !g.Acquired {
			t.Fatalf("Acquire with a 1 ns lease = %+v; want Acquired", g)
		}
		// The store rounds the lease up to its resolution, then it expires.
		deadline := time.Now().Add(3*s.g + 2*s.u)
		for {
			if g := backendAcquire(t, other, locking.Request{ID: lockID, Owner: owner(), Lease: 20 * s.u}); g.Acquired {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("a 1 ns lease still held after %v", 3*s.g+2*s.u)
			}
			time.Sleep(s.g / 10)
		}
	})
	t.Run("LeaseMax", func(t *testing.T) {
		lockID := id(t, "x")
		me := owner()
		if g := backendAcquire(t, b, locking.Request{ID: lockID, Owner: me, Lease: locking.MaxLease}); !g.Acquired {
			t.Fatalf("Acquire with Lease MaxLease = %+v; want Acquired", g)
		}
		if g := backendAcquire(t, other, locking.Request{ID: lockID, Owner: owner(), Lease: s.u}); g.Acquired {
			t.Fatalf("a second owner took a lock held with Lease MaxLease: %+v", g)
		}
		if g, err := b.Renew(t.Context(), locking.Request{ID: lockID, Owner: me, Lease: locking.MaxLease}); err != nil || !g.Acquired {
			t.Fatalf("Renew with Lease MaxLease = %+v, %v", g, err)
		}
		if g := backendAcquire(t, other, locking.Request{ID: lockID, Owner: owner(), Lease: s.u, StealAfter: locking.MaxLease}); g.Acquired {
			t.Fatalf("StealAfter MaxLease took a lock just renewed: %+v", g)
		}
		if err := b.Release(t.Context(), lockID, me); err != nil {
			t.Fatalf("Release: %v", err)
		}
	})
	t.Run("StealAfter1ns", func(t *testing.T) {
		lockID := id(t, "x")
		backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: 20 * s.u})
		time.Sleep(s.g + s.u/10) // "not renewed within 1 ns" holds after any pause the store can see
		g := backendAcquire(t, other, locking.Request{ID: lockID, Owner: owner(), Lease: 20 * s.u, StealAfter: time.Nanosecond})
		if !g.Acquired || !g.TookOver {
			t.Fatalf("StealAfter 1 ns on a lock not renewed for %v = %+v; want Acquired and TookOver", s.g+s.u/10, g)
		}
	})
	t.Run("AboveMax", func(t *testing.T) {
		lockID := id(t, "x")
		bad := []locking.Request{
			{ID: lockID, Owner: owner(), Lease: math.MaxInt64},
			{ID: lockID, Owner: owner(), Lease: locking.MaxLease + 1},
			{ID: lockID, Owner: owner(), Lease: 0},
			{ID: lockID, Owner: owner(), Lease: -time.Second},
			{ID: lockID, Owner: owner(), Lease: s.u, StealAfter: math.MaxInt64},
			{ID: lockID, Owner: owner(), Lease: s.u, StealAfter: -1},
		}
		for _, r := range bad {
			if _, err := b.Acquire(t.Context(), r); !errors.Is(err, locking.ErrInvalid) {
				t.Errorf("Acquire(Lease %v, StealAfter %v) = %v; want ErrInvalid", r.Lease, r.StealAfter, err)
			}
			if _, err := b.Renew(t.Context(), r); !errors.Is(err, locking.ErrInvalid) {
				t.Errorf("Renew(Lease %v, StealAfter %v) = %v; want ErrInvalid", r.Lease, r.StealAfter, err)
			}
		}
		if g := backendAcquire(t, other, locking.Request{ID: lockID, Owner: owner(), Lease: s.u}); !g.Acquired {
			t.Errorf("an id written to by refused requests is held: %+v", g)
		}
	})
}

type lifeKey struct{}

// lockContext: Lock.Context carries the values of the context the lock was
// taken with and ends as the lock does, with its end as the cause:
// ErrNotHeld when released (by Release, or as its context ended),
// ErrLockLost when taken over.
func (s *suite) lockContext(t *testing.T) {
	c, _ := s.client(t)
	ended := func(t *testing.T, ctx context.Context, within time.Duration, want, not error) {
		t.Helper()
		select {
		case <-ctx.Done():
		default:
			if within == 0 {
				t.Fatal("Lock.Context not done once the lock ended")
			}
			select {
			case <-ctx.Done():
			case <-time.After(within):
				t.Fatalf("Lock.Context not done within %v of the lock's end", within)
			}
		}
		if cause := context.Cause(ctx); !errors.Is(cause, want) || errors.Is(cause, not) {
			t.Errorf("Lock.Context cause = %v; want %v (not %v)", cause, want, not)
		}
		if !errors.Is(ctx.Err(), context.Canceled) {
			t.Errorf("Lock.Context Err = %v; want context.Canceled", ctx.Err())
		}
	}
	t.Run("Released", func(t *testing.T) {
		ctx := context.WithValue(t.Context(), lifeKey{}, "v")
		l, err := c.Acquire(ctx, id(t, "y"))
		if err != nil {
			t.Fatal(err)
		}
		lctx := l.Context()
		if lctx != l.Context() {
			t.Error("Lock.Context returned two contexts")
		}
		if got := lctx.Value(lifeKey{}); got != "v" {
			t.Errorf("Lock.Context value = %v; want the acquiring context's", got)
		}
		if err := lctx.Err(); err != nil {
			t.Fatalf("Lock.Context of a held lock: Err = %v", err)
		}
		release(t, l)
		ended(t, lctx, 0, locking.ErrNotHeld, locking.ErrLockLost)
		if !errors.Is(context.Cause(l.Context()), locking.ErrNotHeld) {
			t.Errorf("Lock.Context asked for after Release: cause %v; want ErrNotHeld", context.Cause(l.Context()))
		}
	})
	t.Run("ContextEnded", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		l, err := c.Acquire(ctx, id(t, "x"))
		if err != nil {
			t.Fatal(err)
		}
		lctx := l.Context()
		cancel()
		ended(t, lctx, 60*s.u, locking.ErrNotHeld, locking.ErrLockLost)
	})
	t.Run("With", func(t *testing.T) {
		var lctx context.Context
		err := c.With(t.Context(), id(t, "x"), func(ctx context.Context) error {
			lctx = locking.FromContext(ctx).Context()
			return lctx.Err()
		})
		if err != nil {
			t.Fatalf("With = %v", err)
		}
		ended(t, lctx, 0, locking.ErrNotHeld, locking.ErrLockLost)
	})
	t.Run("Lost", func(t *testing.T) {
		thief := s.newBackend(t)
		lease := 9 * s.u
		lockID := id(t, "x")
		l := s.acquire(t, c, lockID, locking.Lease(lease))
		lctx := l.Context()
		s.steal(t, thief, lockID, lease)
		ended(t, lctx, lease, locking.ErrLockLost, locking.ErrNotHeld)
		_ = l.Release(t.Context())
	})
}
