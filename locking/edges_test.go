package locking_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// TestReentrancyEndsWithTheHolding: a goroutine that fn started with a
// detached context takes the same id after With returned and released it.
// The enclosing lock is no longer held, so this is no re-entrant use.
func TestReentrancyEndsWithTheHolding(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newClient(t, memlock.New(), locking.Config{})
		res := make(chan error, 1)
		err := c.With(t.Context(), "a", func(ctx context.Context) error {
			bg := context.WithoutCancel(ctx)
			go func() {
				time.Sleep(50 * time.Millisecond) // With has returned
				res <- c.With(bg, "a", func(context.Context) error { return nil }, locking.MaxWait(time.Second))
			}()
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := <-res; err != nil {
			t.Errorf("With of an id whose enclosing With returned = %v; want nil", err)
		}
	})
}

// uncomparable is a backend value that cannot be compared with ==, wrapped
// in one whose type can (the comparison of the two panics at run time).
type uncomparable struct {
	locking.Backend
	tags []string //lint:ignore U1000 makes the type uncomparable
}

type wrapped struct{ locking.Backend }

// TestReentrancyWithUncomparableBackends: the check never panics, and
// detects re-entrant use of one client and kind whatever its backend's
// type; across kinds that share a store it needs a store value that can be
// compared (it cannot tell otherwise whether the two kinds share it).
func TestReentrancyWithUncomparableBackends(t *testing.T) {
	for name, b := range map[string]locking.Backend{
		"uncomparable":         uncomparable{Backend: memlock.New()},
		"wrapped uncomparable": wrapped{uncomparable{Backend: memlock.New()}},
		"wrapped comparable":   wrapped{memlock.New()},
		"pointer (comparable)": memlock.New(),
	} {
		t.Run(name, func(t *testing.T) {
			c, err := locking.New(locking.Config{Strong: b, Weak: b})
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if r := recover(); r != nil {
					t.Fatalf("nested With panicked: %v", r)
				}
			}()
			kinds := []locking.LockKind{locking.Strong}
			if !strings.Contains(name, "uncomparable") {
				kinds = append(kinds, locking.Weak)
			}
			for _, k := range kinds {
				err = c.With(t.Context(), "x", func(ctx context.Context) error {
					return c.With(ctx, "x", func(context.Context) error { return nil }, locking.MaxWait(100*time.Millisecond), locking.Kind(k))
				})
				if !errors.Is(err, locking.ErrReentrant) {
					t.Errorf("nested %v With of the same id = %v; want ErrReentrant", k, err)
				}
			}
		})
	}
}

// panicOnce panics in its first Acquire, as a buggy backend would; the
// panic is recovered further up (net/http recovers handler panics).
type panicOnce struct {
	locking.Backend
	done bool
}

func (p *panicOnce) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if !p.done {
		p.done = true
		panic("backend bug")
	}
	return p.Backend.Acquire(ctx, r)
}

// TestBackendPanicFreesTheGate: after a recovered panic in the backend, the
// next callers of the id are served; before the fix they waited for a gate
// nobody would free.
func TestBackendPanicFreesTheGate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newClient(t, &panicOnce{Backend: memlock.New()}, locking.Config{})
		func() {
			defer func() {
				if recover() == nil {
					t.Error("the backend's panic did not reach the caller")
				}
			}()
			_, _ = c.Acquire(t.Context(), "d")
		}()
		l, err := c.Acquire(t.Context(), "d", locking.Wait(false))
		if err != nil {
			t.Fatalf("Acquire(Wait(false)) after a recovered backend panic = %v; want the lock", err)
		}
		if err := l.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		l, err = c.Acquire(ctx, "d")
		if err != nil {
			t.Fatalf("waiting Acquire after a recovered backend panic = %v; want the lock", err)
		}
		_ = l.Release(t.Context())
	})
}

// unreachable is a store whose calls never answer until their context
// ends.
type unreachable struct {
	locking.Backend
	inFlight *atomic.Int64 // calls not yet returned
}

func (u unreachable) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	u.inFlight.Add(1)
	defer u.inFlight.Add(-1)
	<-ctx.Done()
	return locking.Grant{}, ctx.Err()
}

func (u unreachable) Release(ctx context.Context, id, owner string) error {
	u.inFlight.Add(1)
	defer u.inFlight.Add(-1)
	<-ctx.Done()
	return ctx.Err()
}

// TestFailedAcquireReturnsSoon: on a store that does not answer, an Acquire
// whose context ends after 100 ms returns 2 s later (its give-back ends
// inside the call, bounded by 2 s), not 10 s later, and leaves nothing
// running behind it.
func TestFailedAcquireReturnsSoon(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := unreachable{memlock.New(), new(atomic.Int64)}
		c := newClient(t, b, locking.Config{})
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := c.Acquire(ctx, "bh")
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Acquire = %v; want context.DeadlineExceeded", err)
		}
		if d := time.Since(start); d != 2100*time.Millisecond {
			t.Errorf("Acquire returned %v after it started; want 2.1 s (its 100 ms context, then 2 s for the give-back)", d)
		}
		if n := b.inFlight.Load(); n != 0 {
			t.Errorf("%d store calls still under way after Acquire returned; want none (the give-back ends inside the call)", n)
		}
	})
}

// failingAcquire fails every Acquire after 30 ms.
type failingAcquire struct{ locking.Backend }

var errStoreDown = errors.New("store down")

func (failingAcquire) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	time.Sleep(30 * time.Millisecond)
	return locking.Grant{}, errStoreDown
}

// TestNoWaitWhileTheStoreFails: a caller that does not wait, behind a local
// caller whose call to the store fails, is told the store's error, not that
// another owner holds the lock (nobody is known to).
func TestNoWaitWhileTheStoreFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newClient(t, failingAcquire{memlock.New()}, locking.Config{})
		go func() { _, _ = c.Acquire(t.Context(), "fe") }()
		time.Sleep(5 * time.Millisecond)
		_, err := c.Acquire(t.Context(), "fe", locking.Wait(false))
		if errors.Is(err, locking.ErrNotAcquired) || !errors.Is(err, errStoreDown) {
			t.Errorf("Acquire(Wait(false)) while the store fails = %v; want the store's error, not ErrNotAcquired", err)
		}
		time.Sleep(time.Second)
	})
}

// roundingUp keeps every lease for at least a second, as memcached does.
type roundingUp struct{ locking.Backend }

func (r roundingUp) Acquire(ctx context.Context, q locking.Request) (locking.Grant, error) {
	q.Lease = max(q.Lease, time.Second)
	return r.Backend.Acquire(ctx, q)
}

// TestLeaseRanOutIsGivenBack: a lease shorter than a renewal can keep up
// with (1 ms) runs out at once on this side and the lock is reported lost;
// the store, which rounded the lease up to a second, must not keep the
// holding after With returned.
func TestLeaseRanOutIsGivenBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := memlock.New()
		c := newClient(t, roundingUp{store}, locking.Config{})
		other := newClient(t, store, locking.Config{})
		err := c.With(t.Context(), "e", func(ctx context.Context) error {
			time.Sleep(20 * time.Millisecond)
			return nil
		}, locking.Lease(time.Millisecond))
		if !errors.Is(err, locking.ErrLockLost) {
			t.Errorf("With on a 1 ms lease = %v; want ErrLockLost (no renewal can keep up)", err)
		}
		synctest.Wait()
		l, err := other.Acquire(t.Context(), "e", locking.Wait(false))
		if err != nil {
			t.Fatalf("Acquire after a lost 1 ms lease = %v; want the lock given back", err)
		}
		_ = l.Release(t.Context())
	})
}

// slowRenew is a store whose renewals answer only when their context ends,
// and then 100 ms later (a reply on its way).
type slowRenew struct {
	locking.Backend
	inFlight atomic.Int64
}

func (s *slowRenew) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	<-ctx.Done()
	time.Sleep(100 * time.Millisecond)
	return locking.Grant{}, ctx.Err()
}

// TestReleaseJoinsTheRenewal: a Release, or the end of the lock's context,
// during a renewal cancels the renewal and waits for it: when Release
// returns (or Done closes), no call of the lock is still under way.
func TestReleaseJoinsTheRenewal(t *testing.T) {
	for _, end := range []string{"Release", "context"} {
		t.Run(end, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := &slowRenew{Backend: memlock.New()}
				c := newClient(t, b, locking.Config{})
				ctx, cancel := context.WithCancel(t.Context())
				defer cancel()
				l, err := c.Acquire(ctx, "job", locking.Lease(30*time.Second))
				if err != nil {
					t.Fatal(err)
				}
				time.Sleep(11 * time.Second) // the first renewal, at 10 s, is under way
				synctest.Wait()
				if n := b.inFlight.Load(); n != 1 {
					t.Fatalf("%d renewals under way at 11 s; want 1", n)
				}
				if end == "Release" {
					if err := l.Release(t.Context()); err != nil {
						t.Fatalf("Release: %v", err)
					}
				} else {
					cancel()
					<-l.Done()
				}
				if n := b.inFlight.Load(); n != 0 {
					t.Errorf("%d renewals still under way once the lock ended; want none", n)
				}
			})
		})
	}
}
