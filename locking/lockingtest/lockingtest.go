// Package lockingtest is the conformance suite that every locking.Backend
// must pass, in the manner of testing/fstest. Backends in this module run it
// against their real stores; run it against your own backend too:
//
//	func TestConformance(t *testing.T) {
//		lockingtest.Run(t, func(t *testing.T) locking.Backend { return newMyBackend(t) }, lockingtest.Options{})
//	}
//
// The suite checks the backend's atomic operations directly and the whole
// contract of package locking on top of it: mutual exclusion, not waiting,
// waiting with MaxWait and cancellation, leases and renewal, takeover of
// expired and stolen locks, loss signalled through Done and With, owner-checked
// release, fencing tokens, input validation and nested locks, and the edges
// of a lock's life (lifecycle.go): With holding its lock until its function
// returns, grants and replies that arrive too late, re-entrancy, Release and
// renewals after the context ended, durations at their extremes, and
// Lock.Context ending with the lock. Time-dependent
// checks use real time in multiples of Options.Granularity.
package lockingtest

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
)

// Options adapts the suite to a backend.
type Options struct {
	// Granularity is the backend's time resolution: how late an expiry may
	// be observed (memcached: time.Second). Leases in the suite are multiples
	// of it. Zero means 10ms.
	Granularity time.Duration
}

// NewBackend returns a backend for the suite. Every call must return a new
// client (connection, pool) of the same store, so that two calls behave like
// two instances of a function; the suite uses fresh ids in every test, so the
// store need not be emptied.
type NewBackend func(t *testing.T) locking.Backend

type suite struct {
	newBackend NewBackend
	g          time.Duration // the backend's granularity
	u          time.Duration // the suite's unit of time
}

// Run runs the conformance suite as subtests of t. Subtests run in parallel
// with one another.
func Run(t *testing.T, newBackend NewBackend, opts Options) {
	t.Helper()
	g := opts.Granularity
	if g <= 0 {
		g = 10 * time.Millisecond
	}
	s := &suite{newBackend: newBackend, g: g, u: max(g, 50*time.Millisecond)}
	tests := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"Backend/AcquireFreeAndHeld", s.backendAcquire},
		{"Backend/RenewIsOwnerChecked", s.backendRenew},
		{"Backend/ReleaseIsOwnerChecked", s.backendRelease},
		{"Backend/ExpiredLeaseIsTakenOver", s.backendExpiry},
		{"Backend/StealAfter", s.backendSteal},
		{"Backend/OneWinnerPerTakeover", s.backendTakeoverRace},
		{"Backend/AgeOfHolding", s.backendAge},
		{"Backend/Probe", s.backendProbe},
		{"Backend/AnyID", s.backendAnyID},
		{"Backend/DurationExtremes", s.backendDurations},
		{"MutualExclusion", s.mutualExclusion},
		{"NoWait", s.noWait},
		{"WaitUntilReleased", s.waitUntilReleased},
		{"MaxWait", s.maxWait},
		{"ContextCancel", s.contextCancel},
		{"RenewalKeepsLock", s.renewal},
		{"DeadHolderTakenOver", s.deadHolder},
		{"StealAfterOption", s.stealAfterOption},
		{"LossIsSignalled", s.loss},
		{"ReleaseChecksOwner", s.releaseChecksOwner},
		{"WithReleasesOnPanic", s.withPanic},
		{"FencingTokensIncrease", s.fencing},
		{"InvalidInput", s.invalidInput},
		{"Nested", s.nested},
		{"Contention", s.contention},
		{"RemoteWaiterNotStarved", s.remoteNotStarved},
		{"Life/WithHoldsUntilFnReturns", s.withOutlivesContext},
		{"Life/GrantAfterContextEnd", s.grantAfterContextEnd},
		{"Life/NotReentrant", s.notReentrant},
		{"Life/ReleaseWithEndedContext", s.releaseWithEndedContext},
		{"Life/ContextEndsDuringRenewal", s.contextEndsDuringRenewal},
		{"Life/AmbiguousAcquire", s.ambiguousAcquire},
		{"Life/LockContext", s.lockContext},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t)
		})
	}
}

// id returns a lock id no other test uses.
func id(t *testing.T, suffix string) string {
	return fmt.Sprintf("lockingtest/%s/%x/%s", t.Name(), rand.Uint64(), suffix)
}

func owner() string { return fmt.Sprintf("owner-%x", rand.Uint64()) }

// client returns a client over a new backend instance, with backoff scaled to
// the suite's unit so waiting tests stay short.
func (s *suite) client(t *testing.T) (*locking.Client, locking.Backend) {
	t.Helper()
	b := s.newBackend(t)
	c, err := locking.New(locking.Config{Strong: b, Weak: b, Lease: 20 * s.u, MinBackoff: s.u / 5, MaxBackoff: s.u})
	if err != nil {
		t.Fatalf("locking.New: %v", err)
	}
	return c, b
}

// acquire acquires id, waiting at most a minute of suite time, so that a
// backend that never frees a lock fails the test instead of hanging it.
func (s *suite) acquire(t *testing.T, c *locking.Client, id string, opts ...locking.Option) *locking.Lock {
	t.Helper()
	l, err := c.Acquire(t.Context(), id, append([]locking.Option{locking.MaxWait(60 * s.u)}, opts...)...)
	if err != nil {
		t.Fatalf("Acquire(%q): %v", id, err)
	}
	return l
}

func release(t *testing.T, l *locking.Lock) {
	t.Helper()
	if err := l.Release(t.Context()); err != nil {
		t.Fatalf("Release(%q): %v", l.ID(), err)
	}
}

// mustBeHeld checks that a non-waiting acquisition of id fails.
func mustBeHeld(t *testing.T, c *locking.Client, id string) {
	t.Helper()
	l, err := c.Acquire(t.Context(), id, locking.Wait(false))
	if err == nil {
		_ = l.Release(t.Context())
		t.Fatalf("Acquire(%q, Wait(false)) succeeded; want ErrNotAcquired while another owner holds it", id)
	}
	if !errors.Is(err, locking.ErrNotAcquired) {
		t.Fatalf("Acquire(%q, Wait(false)) = %v; want ErrNotAcquired", id, err)
	}
}

func backendAcquire(t *testing.T, b locking.Backend, r locking.Request) locking.Grant {
	t.Helper()
	g, err := b.Acquire(t.Context(), r)
	if err != nil {
		t.Fatalf("Backend.Acquire(%q, owner %s): %v", r.ID, r.Owner, err)
	}
	return g
}

func (s *suite) backendAcquire(t *testing.T) {
	b, other := s.newBackend(t), s.newBackend(t)
	lockID := id(t, "x")
	lease := 20 * s.u
	first := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: lease})
	if !first.Acquired || first.Token == 0 {
		t.Fatalf("Acquire of a free lock = %+v; want Acquired with a non-zero token", first)
	}
	if first.TookOver {
		t.Errorf("Acquire of a free lock reported TookOver")
	}
	second := backendAcquire(t, other, locking.Request{ID: lockID, Owner: owner(), Lease: lease})
	if second.Acquired {
		t.Fatalf("a second owner acquired a held lock: %+v", second)
	}
	if second.Remaining < 0 || second.Remaining > lease+s.g {
		t.Errorf("Remaining = %v for a lease of %v; want within [0, lease]", second.Remaining, lease)
	}
	indep := backendAcquire(t, other, locking.Request{ID: id(t, "y"), Owner: owner(), Lease: lease})
	if !indep.Acquired {
		t.Errorf("another id was not acquired while the first is held")
	}
}

// backendAge checks Grant.Age of a busy answer, where the backend reports
// it (0 means unknown): the time since the holder's acquire, then since its
// renewal, within the time between those calls and the answer.
func (s *suite) backendAge(t *testing.T) {
	b, other := s.newBackend(t), s.newBackend(t)
	r := locking.Request{ID: id(t, "x"), Owner: owner(), Lease: 20 * s.u}
	check := func(what string, before time.Time, least time.Duration) {
		t.Helper()
		g := backendAcquire(t, other, locking.Request{ID: r.ID, Owner: owner(), Lease: r.Lease})
		most := time.Since(before)
		if g.Acquired {
			t.Fatalf("a second owner acquired a held lock: %+v", g)
		}
		t.Logf("Age = %v %s (within [%v, %v]; 0: unknown)", g.Age, what, least, most)
		if g.Age != 0 && (g.Age < least-s.g || g.Age > most+s.g) {
			t.Errorf("Age = %v %s; want 0 (unknown) or within [%v, %v]", g.Age, what, least, most)
		}
	}
	acquired := time.Now()
	if g := backendAcquire(t, b, r); !g.Acquired {
		t.Fatalf("Acquire of a free lock failed: %+v", g)
	}
	time.Sleep(2 * s.u)
	check("2 units after the acquire", acquired, 2*s.u)
	renewed := time.Now()
	if _, err := b.Renew(t.Context(), r); err != nil {
		t.Fatalf("Renew: %v", err)
	}
	time.Sleep(s.u)
	check("1 unit after the renewal", renewed, s.u)
}

// backendProbe checks Client.Probe: a backend that implements
// locking.Prober reports a lock free, held (with the lease left, by a
// reader that is another instance) and free again after the release or
// the lease's end, and writes nothing (the holder keeps its lock and its
// token); one that does not says so with errors.ErrUnsupported.
func (s *suite) backendProbe(t *testing.T) {
	b := s.newBackend(t)
	c, _ := s.client(t)
	lockID := id(t, "x")
	held, _, err := c.Probe(t.Context(), locking.Strong, lockID)
	if can := c.CanProbe(locking.Strong); can == errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("CanProbe = %v, but Probe = %v", can, err)
	}
	if errors.Is(err, errors.ErrUnsupported) {
		t.Logf("the backend cannot probe: %v", err)
		return
	}
	if err != nil || held {
		t.Fatalf("Probe of a lock never taken = %v, %v; want free", held, err)
	}
	r := locking.Request{ID: lockID, Owner: owner(), Lease: 20 * s.u}
	g := backendAcquire(t, b, r)
	if !g.Acquired {
		t.Fatalf("Acquire of a free lock failed: %+v", g)
	}
	held, left, err := c.Probe(t.Context(), locking.Strong, lockID)
	if err != nil || !held || left <= 0 || left > r.Lease+s.g {
		t.Fatalf("Probe of a held lock = %v, %v, %v; want held with at most %v left", held, left, err, r.Lease)
	}
	if rg, err := b.Renew(t.Context(), r); err != nil || rg.Token != g.Token {
		t.Fatalf("after a probe the holder's Renew = %+v, %v; want its token %d", rg, err, g.Token)
	}
	if err := b.Release(t.Context(), r.ID, r.Owner); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if held, _, err := c.Probe(t.Context(), locking.Strong, lockID); err != nil || held {
		t.Fatalf("Probe after the release = %v, %v; want free", held, err)
	}
	short := locking.Request{ID: lockID, Owner: owner(), Lease: 2 * s.u}
	if g := backendAcquire(t, b, short); !g.Acquired {
		t.Fatalf("Acquire of a released lock failed: %+v", g)
	}
	time.Sleep(short.Lease + 2*s.g)
	if held, _, err := c.Probe(t.Context(), locking.Strong, lockID); err != nil || held {
		t.Fatalf("Probe after the lease ended = %v, %v; want free", held, err)
	}
	if _, _, err := c.Probe(t.Context(), locking.Strong, ""); !errors.Is(err, locking.ErrInvalid) {
		t.Errorf("Probe of an empty id: %v; want ErrInvalid", err)
	}
}

func (s *suite) backendRenew(t *testing.T) {
	b := s.newBackend(t)
	lockID, me := id(t, "x"), owner()
	r := locking.Request{ID: lockID, Owner: me, Lease: 20 * s.u}
	g := backendAcquire(t, b, r)
	if !g.Acquired {
		t.Fatalf("Acquire of a free lock failed: %+v", g)
	}
	rg, err := b.Renew(t.Context(), r)
	if err != nil {
		t.Fatalf("Renew by the owner: %v", err)
	}
	if rg.Token != g.Token {
		t.Errorf("Renew returned token %d; want the acquisition's %d", rg.Token, g.Token)
	}
	_, err = b.Renew(t.Context(), locking.Request{ID: lockID, Owner: owner(), Lease: 20 * s.u})
	if !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Renew by another owner = %v; want ErrNotHeld", err)
	}
	_, err = b.Renew(t.Context(), locking.Request{ID: id(t, "never"), Owner: me, Lease: 20 * s.u})
	if !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Renew of a lock never acquired = %v; want ErrNotHeld", err)
	}
}

func (s *suite) backendRelease(t *testing.T) {
	b := s.newBackend(t)
	lockID, me := id(t, "x"), owner()
	r := locking.Request{ID: lockID, Owner: me, Lease: 20 * s.u}
	if g := backendAcquire(t, b, r); !g.Acquired {
		t.Fatalf("Acquire of a free lock failed: %+v", g)
	}
	if err := b.Release(t.Context(), lockID, owner()); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Release by another owner = %v; want ErrNotHeld", err)
	}
	if g := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: 20 * s.u}); g.Acquired {
		t.Fatalf("lock was free after another owner's Release: it must stay held")
	}
	if err := b.Release(t.Context(), lockID, me); err != nil {
		t.Fatalf("Release by the owner: %v", err)
	}
	if err := b.Release(t.Context(), lockID, me); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("second Release = %v; want ErrNotHeld", err)
	}
	if g := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: 20 * s.u}); !g.Acquired {
		t.Errorf("lock not free after its owner released it")
	}
}

func (s *suite) backendExpiry(t *testing.T) {
	b, other := s.newBackend(t), s.newBackend(t)
	lockID, first := id(t, "x"), owner()
	lease := 2 * s.u
	g1 := backendAcquire(t, b, locking.Request{ID: lockID, Owner: first, Lease: lease})
	if !g1.Acquired {
		t.Fatalf("Acquire of a free lock failed")
	}
	if g := backendAcquire(t, other, locking.Request{ID: lockID, Owner: owner(), Lease: lease}); g.Acquired {
		t.Fatalf("lock taken over before its lease expired")
	}
	time.Sleep(lease + 2*s.g)
	second := owner()
	g2 := backendAcquire(t, other, locking.Request{ID: lockID, Owner: second, Lease: 20 * s.u})
	if !g2.Acquired {
		t.Fatalf("an expired lease was not taken over: %+v", g2)
	}
	if !g2.TookOver {
		t.Errorf("taking over an expired lease did not report TookOver")
	}
	if g2.Token <= g1.Token {
		t.Errorf("takeover token %d is not above the previous holder's %d", g2.Token, g1.Token)
	}
	if _, err := b.Renew(t.Context(), locking.Request{ID: lockID, Owner: first, Lease: lease}); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("the old holder's Renew after a takeover = %v; want ErrNotHeld", err)
	}
	if err := b.Release(t.Context(), lockID, first); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("the old holder's Release after a takeover = %v; want ErrNotHeld", err)
	}
	if g := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: lease}); g.Acquired {
		t.Errorf("the new holder's lock was free after the old holder's Release")
	}
}

func (s *suite) backendSteal(t *testing.T) {
	b, other := s.newBackend(t), s.newBackend(t)
	lockID := id(t, "x")
	g1 := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: 100 * s.u})
	if !g1.Acquired {
		t.Fatalf("Acquire of a free lock failed")
	}
	if g := backendAcquire(t, other, locking.Request{ID: lockID, Owner: owner(), Lease: s.u, StealAfter: 50 * s.u}); g.Acquired {
		t.Fatalf("stolen although acquired less than StealAfter ago")
	}
	time.Sleep(2*s.u + 2*s.g)
	g2 := backendAcquire(t, other, locking.Request{ID: lockID, Owner: owner(), Lease: 20 * s.u, StealAfter: s.u})
	if !g2.Acquired || !g2.TookOver {
		t.Fatalf("not stolen although acquired more than StealAfter ago: %+v", g2)
	}
	if g2.Token <= g1.Token {
		t.Errorf("steal token %d is not above the previous holder's %d", g2.Token, g1.Token)
	}
}

func (s *suite) backendTakeoverRace(t *testing.T) {
	const takers = 8
	lockID := id(t, "x")
	first := s.newBackend(t)
	if g := backendAcquire(t, first, locking.Request{ID: lockID, Owner: owner(), Lease: s.u}); !g.Acquired {
		t.Fatalf("Acquire of a free lock failed")
	}
	backends := make([]locking.Backend, takers)
	for i := range backends {
		backends[i] = s.newBackend(t)
	}
	time.Sleep(s.u + 2*s.g)
	var (
		wins   atomic.Int32
		errs   = make([]error, takers)
		wg     sync.WaitGroup
		starts = make(chan struct{})
	)
	for i, b := range backends {
		wg.Go(func() {
			<-starts
			g, err := b.Acquire(t.Context(), locking.Request{ID: lockID, Owner: owner(), Lease: 20 * s.u})
			errs[i] = err
			if err == nil && g.Acquired {
				wins.Add(1)
			}
		})
	}
	close(starts)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("takers failed: %v", err)
	}
	if n := wins.Load(); n != 1 {
		t.Fatalf("%d of %d concurrent takers of one expired lock won; want exactly 1", n, takers)
	}
}

func (s *suite) backendAnyID(t *testing.T) {
	b := s.newBackend(t)
	base := id(t, "")
	suffixes := []string{"a", "a ", "A", " ", "\x00", "\x00\x01\x7f", "line\nbreak", "\xff\xfe not utf-8",
		"ユーザー/42", strings.Repeat("long", 2500), strings.Repeat("/", 300), "%s %d {}", "key with spaces"}
	for _, suf := range suffixes {
		r := locking.Request{ID: base + suf, Owner: owner(), Lease: 20 * s.u}
		g := backendAcquire(t, b, r)
		if !g.Acquired {
			t.Fatalf("id %q: not acquired although no other test uses it (two ids mapped to one key?)", r.ID)
		}
	}
	for _, suf := range suffixes {
		if g := backendAcquire(t, b, locking.Request{ID: base + suf, Owner: owner(), Lease: 20 * s.u}); g.Acquired {
			t.Errorf("id %q: acquired twice", base+suf)
		}
	}
}

func (s *suite) mutualExclusion(t *testing.T) {
	c1, _ := s.client(t)
	c2, _ := s.client(t)
	lockID := id(t, "x")
	l := s.acquire(t, c1, lockID)
	mustBeHeld(t, c2, lockID)
	mustBeHeld(t, c1, lockID)
	other := s.acquire(t, c2, id(t, "other"))
	release(t, other)
	release(t, l)
	l2 := s.acquire(t, c2, lockID, locking.Wait(false))
	release(t, l2)
}

func (s *suite) noWait(t *testing.T) {
	c1, _ := s.client(t)
	c2, _ := s.client(t)
	lockID := id(t, "x")
	l := s.acquire(t, c1, lockID)
	defer release(t, l)
	start := time.Now()
	_, err := c2.Acquire(t.Context(), lockID, locking.Wait(false))
	var nae *locking.NotAcquiredError
	if !errors.As(err, &nae) || nae.ID != lockID || nae.TimedOut {
		t.Fatalf("Acquire(Wait(false)) on a held lock = %v; want a *NotAcquiredError for %q, not timed out", err, lockID)
	}
	if d := time.Since(start); d > 10*s.u {
		t.Errorf("Acquire(Wait(false)) took %v; it must not wait", d)
	}
	ran := false
	err = c2.With(t.Context(), lockID, func(context.Context) error { ran = true; return nil }, locking.Wait(false))
	if !errors.Is(err, locking.ErrNotAcquired) || ran {
		t.Fatalf("With(Wait(false)) on a held lock = %v, ran=%v; want ErrNotAcquired without running fn", err, ran)
	}
}

func (s *suite) waitUntilReleased(t *testing.T) {
	c1, _ := s.client(t)
	c2, _ := s.client(t)
	lockID := id(t, "x")
	l := s.acquire(t, c1, lockID)
	hold := 3 * s.u
	time.AfterFunc(hold, func() { _ = l.Release(context.Background()) })
	start := time.Now()
	l2 := s.acquire(t, c2, lockID)
	defer release(t, l2)
	if d := time.Since(start); d < hold {
		t.Fatalf("acquired after %v, before the holder released at %v", d, hold)
	}
	if l2.Token() <= l.Token() {
		t.Errorf("token %d after a release is not above the previous %d", l2.Token(), l.Token())
	}
}

func (s *suite) maxWait(t *testing.T) {
	c1, _ := s.client(t)
	c2, _ := s.client(t)
	lockID := id(t, "x")
	l := s.acquire(t, c1, lockID)
	defer release(t, l)
	wait := 3 * s.u
	start := time.Now()
	_, err := c2.Acquire(t.Context(), lockID, locking.MaxWait(wait))
	elapsed := time.Since(start)
	var nae *locking.NotAcquiredError
	if !errors.As(err, &nae) || !nae.TimedOut {
		t.Fatalf("Acquire(MaxWait(%v)) on a held lock = %v; want a timed-out *NotAcquiredError", wait, err)
	}
	// The last try is at the deadline; allow one backend round trip after it.
	if elapsed < wait || elapsed > wait+s.u+10*s.g {
		t.Errorf("MaxWait(%v) gave up after %v; want within one backoff step of it", wait, elapsed)
	}
	// Callers in the same client queue behind each other; MaxWait holds there too.
	_, err = c1.Acquire(t.Context(), lockID, locking.MaxWait(s.u))
	if !errors.Is(err, locking.ErrNotAcquired) {
		t.Errorf("Acquire(MaxWait) in the holder's client = %v; want ErrNotAcquired", err)
	}
}

func (s *suite) contextCancel(t *testing.T) {
	c1, _ := s.client(t)
	c2, _ := s.client(t)
	lockID := id(t, "x")
	l := s.acquire(t, c1, lockID)
	defer release(t, l)
	for _, c := range []*locking.Client{c2, c1} {
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(2*s.u, cancel)
		start := time.Now()
		_, err := c.Acquire(ctx, lockID)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Acquire with a cancelled context = %v; want an error wrapping context.Canceled", err)
		}
		if d := time.Since(start); d > 2*s.u+s.u+10*s.g {
			t.Errorf("Acquire returned %v after its context was cancelled at %v", d, 2*s.u)
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := c2.Acquire(ctx, id(t, "free")); !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire with a context already cancelled = %v; want context.Canceled", err)
	}
}

func (s *suite) renewal(t *testing.T) {
	c1, _ := s.client(t)
	c2, _ := s.client(t)
	lockID := id(t, "x")
	lease := 6 * s.u
	l := s.acquire(t, c1, lockID, locking.Lease(lease))
	time.Sleep(lease*5/2 + s.g)
	select {
	case <-l.Done():
		t.Fatalf("lock lost while renewing: %v", l.Err())
	default:
	}
	if err := l.Err(); err != nil {
		t.Fatalf("Err() of a held lock = %v", err)
	}
	mustBeHeld(t, c2, lockID)
	release(t, l)
	select {
	case <-l.Done():
	default:
		t.Fatalf("Done not closed after Release")
	}
	if err := l.Err(); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Err() after Release = %v; want ErrNotHeld", err)
	}
	l2 := s.acquire(t, c2, lockID, locking.Wait(false))
	release(t, l2)
}

func (s *suite) deadHolder(t *testing.T) {
	c, b := s.client(t)
	lockID := id(t, "x")
	lease := 3 * s.u
	dead := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: lease})
	if !dead.Acquired {
		t.Fatalf("Acquire of a free lock failed")
	}
	start := time.Now()
	l := s.acquire(t, c, lockID)
	defer release(t, l)
	if d := time.Since(start); d < lease-s.g {
		t.Errorf("took over after %v, before the dead holder's lease of %v ran out", d, lease)
	}
	if l.Token() <= dead.Token {
		t.Errorf("takeover token %d is not above the dead holder's %d", l.Token(), dead.Token)
	}
}

func (s *suite) stealAfterOption(t *testing.T) {
	c, b := s.client(t)
	lockID := id(t, "x")
	if g := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: 200 * s.u}); !g.Acquired {
		t.Fatalf("Acquire of a free lock failed")
	}
	if _, err := c.Acquire(t.Context(), lockID, locking.Wait(false), locking.StealAfter(100*s.u)); !errors.Is(err, locking.ErrNotAcquired) {
		t.Fatalf("Acquire(StealAfter) of a fresh lock = %v; want ErrNotAcquired", err)
	}
	start := time.Now()
	l := s.acquire(t, c, lockID, locking.StealAfter(2*s.u))
	defer release(t, l)
	if d := time.Since(start); d > 20*s.u {
		t.Errorf("stealing took %v; the lease of %v must not have to run out", d, 200*s.u)
	}
}

// steal takes lockID from its holder through the backend directly, waiting
// until the holder has not renewed for a while.
func (s *suite) steal(t *testing.T, b locking.Backend, lockID string, deadline time.Duration) locking.Grant {
	t.Helper()
	end := time.Now().Add(deadline)
	for time.Now().Before(end) {
		g := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: 100 * s.u, StealAfter: s.g})
		if g.Acquired {
			return g
		}
		time.Sleep(s.g)
	}
	t.Fatalf("could not steal %q within %v", lockID, deadline)
	return locking.Grant{}
}

func (s *suite) loss(t *testing.T) {
	c, _ := s.client(t)
	thief := s.newBackend(t)
	lease := 9 * s.u
	t.Run("Acquire", func(t *testing.T) {
		lockID := id(t, "x")
		l := s.acquire(t, c, lockID, locking.Lease(lease))
		stolen := s.steal(t, thief, lockID, lease)
		select {
		case <-l.Done():
		case <-time.After(lease):
			t.Fatalf("Done not closed within a lease of the lock being taken over")
		}
		if err := l.Err(); !errors.Is(err, locking.ErrLockLost) {
			t.Errorf("Err() after takeover = %v; want ErrLockLost", err)
		}
		if stolen.Token <= l.Token() {
			t.Errorf("thief's token %d is not above the holder's %d", stolen.Token, l.Token())
		}
		if err := l.Release(t.Context()); !errors.Is(err, locking.ErrLockLost) || errors.Is(err, locking.ErrNotHeld) {
			t.Errorf("Release of a lost lock = %v; want ErrLockLost (only)", err)
		}
	})
	t.Run("With", func(t *testing.T) {
		lockID := id(t, "x")
		fnErr := errors.New("fn saw its context end")
		var cause error
		err := c.With(t.Context(), lockID, func(ctx context.Context) error {
			s.steal(t, thief, lockID, lease)
			select {
			case <-ctx.Done():
				cause = context.Cause(ctx)
				return fnErr
			case <-time.After(lease):
				return errors.New("fn's context was not cancelled within a lease of the takeover")
			}
		}, locking.Lease(lease))
		if !errors.Is(err, locking.ErrLockLost) || !errors.Is(err, fnErr) {
			t.Fatalf("With after a takeover = %v; want ErrLockLost joined with fn's error", err)
		}
		if !errors.Is(cause, locking.ErrLockLost) {
			t.Errorf("fn's context cause = %v; want ErrLockLost", cause)
		}
	})
}

func (s *suite) releaseChecksOwner(t *testing.T) {
	c, _ := s.client(t)
	thief := s.newBackend(t)
	lockID := id(t, "x")
	lease := 9 * s.u
	l := s.acquire(t, c, lockID, locking.Lease(lease))
	s.steal(t, thief, lockID, lease)
	// Release at once, maybe before the holder's next renewal noticed.
	if err := l.Release(t.Context()); !errors.Is(err, locking.ErrLockLost) || errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Release after a takeover = %v; want ErrLockLost (only)", err)
	}
	other, _ := s.client(t)
	mustBeHeld(t, other, lockID)

	l2 := s.acquire(t, c, id(t, "twice"))
	release(t, l2)
	if err := l2.Release(t.Context()); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("second Release = %v; want ErrNotHeld", err)
	}
}

func (s *suite) withPanic(t *testing.T) {
	c, _ := s.client(t)
	other, _ := s.client(t)
	lockID := id(t, "x")
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v; want the body's panic to go on", r)
			}
		}()
		_ = c.With(t.Context(), lockID, func(context.Context) error { panic("boom") })
	}()
	l := s.acquire(t, other, lockID, locking.Wait(false))
	release(t, l)
	bodyErr := errors.New("body failed")
	if err := c.With(t.Context(), lockID, func(context.Context) error { return bodyErr }); !errors.Is(err, bodyErr) {
		t.Errorf("With returned %v; want the body's error", err)
	}
	l = s.acquire(t, other, lockID, locking.Wait(false))
	release(t, l)
}

func (s *suite) fencing(t *testing.T) {
	c, b := s.client(t)
	lockID := id(t, "x")
	var last uint64
	check := func(what string, tok uint64) {
		t.Helper()
		if tok <= last {
			t.Fatalf("%s: token %d is not above the previous %d", what, tok, last)
		}
		last = tok
	}
	for i := range 3 {
		l := s.acquire(t, c, lockID)
		check(fmt.Sprintf("acquisition %d", i), l.Token())
		release(t, l)
	}
	g := backendAcquire(t, b, locking.Request{ID: lockID, Owner: owner(), Lease: s.u})
	check("backend acquisition", g.Token)
	l := s.acquire(t, c, lockID) // waits out the lease, then takes over
	check("takeover", l.Token())
	release(t, l)
}

// countingBackend counts calls, to prove that bad input fails before I/O.
type countingBackend struct {
	locking.Backend
	calls atomic.Int64
}

func (b *countingBackend) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	b.calls.Add(1)
	return b.Backend.Acquire(ctx, r)
}

func (s *suite) invalidInput(t *testing.T) {
	cb := &countingBackend{Backend: s.newBackend(t)}
	c, err := locking.New(locking.Config{Weak: cb}) // no Strong backend
	if err != nil {
		t.Fatal(err)
	}
	strongOnly, err := locking.New(locking.Config{Strong: cb})
	if err != nil {
		t.Fatal(err)
	}
	lockID := id(t, "x")
	cases := []struct {
		name string
		id   string
		opts []locking.Option
		want error
	}{
		{"empty id", "", nil, locking.ErrInvalid},
		{"zero lease", lockID, []locking.Option{locking.Lease(0)}, locking.ErrInvalid},
		{"negative lease", lockID, []locking.Option{locking.Lease(-time.Second)}, locking.ErrInvalid},
		{"zero MaxWait", lockID, []locking.Option{locking.MaxWait(0)}, locking.ErrInvalid},
		{"negative MaxWait", lockID, []locking.Option{locking.MaxWait(-1)}, locking.ErrInvalid},
		{"zero StealAfter", lockID, []locking.Option{locking.StealAfter(0)}, locking.ErrInvalid},
		{"negative StealAfter", lockID, []locking.Option{locking.StealAfter(-time.Second)}, locking.ErrInvalid},
		{"lease above MaxLease", lockID, []locking.Option{locking.Lease(locking.MaxLease + 1)}, locking.ErrInvalid},
		{"lease MaxInt64", lockID, []locking.Option{locking.Lease(math.MaxInt64)}, locking.ErrInvalid},
		{"MaxWait MaxInt64", lockID, []locking.Option{locking.MaxWait(math.MaxInt64)}, locking.ErrInvalid},
		{"StealAfter MaxInt64", lockID, []locking.Option{locking.StealAfter(math.MaxInt64)}, locking.ErrInvalid},
		{"unknown kind", lockID, []locking.Option{locking.Kind(7)}, locking.ErrInvalid},
		{"nil option", lockID, []locking.Option{nil}, locking.ErrInvalid},
		{"Strong without a Strong backend", lockID, nil, locking.ErrNoBackend},
	}
	for _, tc := range cases {
		if _, err := c.Acquire(t.Context(), tc.id, tc.opts...); !errors.Is(err, tc.want) {
			t.Errorf("Acquire: %s: err = %v; want %v", tc.name, err, tc.want)
		}
		ran := false
		if err := c.With(t.Context(), tc.id, func(context.Context) error { ran = true; return nil }, tc.opts...); !errors.Is(err, tc.want) || ran {
			t.Errorf("With: %s: err = %v, ran = %v; want %v without running fn", tc.name, err, ran, tc.want)
		}
	}
	if err := c.With(t.Context(), lockID, nil); !errors.Is(err, locking.ErrInvalid) {
		t.Errorf("With(nil fn) = %v; want ErrInvalid", err)
	}
	if n := cb.calls.Load(); n != 0 {
		t.Errorf("bad input reached the backend %d times; want 0", n)
	}
	// Weak locks fall back to the Strong backend (a stronger lock is always
	// a valid weak one), in New as in Default.
	if l, err := strongOnly.Acquire(t.Context(), lockID, locking.Kind(locking.Weak), locking.Wait(false)); err != nil {
		t.Errorf("Acquire(Kind(Weak)) on a client with only a Strong backend = %v; want the Strong backend used", err)
	} else {
		release(t, l)
	}
	if _, err := locking.New(locking.Config{}); !errors.Is(err, locking.ErrInvalid) {
		t.Errorf("New(Config{}) = %v; want ErrInvalid", err)
	}
}

func (s *suite) nested(t *testing.T) {
	c, _ := s.client(t)
	other, _ := s.client(t)
	outer, inner := id(t, "outer"), id(t, "inner")
	ran := false
	err := c.With(t.Context(), outer, func(ctx context.Context) error {
		return c.With(ctx, inner, func(context.Context) error { ran = true; return nil })
	})
	if err != nil || !ran {
		t.Fatalf("nested With on different ids = %v, inner ran = %v", err, ran)
	}
	blocker := s.acquire(t, other, inner)
	defer release(t, blocker)
	err = c.With(t.Context(), outer, func(ctx context.Context) error {
		return c.With(ctx, inner, func(context.Context) error { return nil }, locking.Wait(false))
	})
	var nae *locking.NotAcquiredError
	if !errors.As(err, &nae) || nae.ID != inner {
		t.Fatalf("outer With = %v; want the inner lock's *NotAcquiredError naming %q", err, inner)
	}
	l := s.acquire(t, other, outer, locking.Wait(false)) // the outer lock was released
	release(t, l)
}

// contention runs clients × goroutines × ids against one another and checks
// that only the holder ever touches a non-atomic counter, and that tokens per
// id increase in the order sections are entered.
func (s *suite) contention(t *testing.T) {
	const (
		clients    = 3
		goroutines = 3
		ids        = 2
		rounds     = 5
	)
	type section struct {
		inside int // touched only by the holder; the race detector and the check below catch overlap
		tokens []uint64
	}
	sections := make([]section, ids)
	lockIDs := make([]string, ids)
	for i := range lockIDs {
		lockIDs[i] = id(t, fmt.Sprint(i))
	}
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for range clients {
		c, _ := s.client(t)
		for range goroutines {
			wg.Go(func() {
				for r := range rounds * ids {
					i := r % ids
					err := c.With(t.Context(), lockIDs[i], func(ctx context.Context) error {
						sec := &sections[i]
						sec.inside++
						if sec.inside != 1 {
							return fmt.Errorf("%d holders inside %q at once", sec.inside, lockIDs[i])
						}
						l := locking.FromContext(ctx)
						if l == nil || l.ID() != lockIDs[i] {
							return fmt.Errorf("FromContext in With(%q) = %v; want the lock", lockIDs[i], l)
						}
						sec.tokens = append(sec.tokens, l.Token())
						time.Sleep(time.Millisecond)
						sec.inside--
						return nil
					})
					if err != nil {
						mu.Lock()
						errs = append(errs, err)
						mu.Unlock()
						return
					}
				}
			})
		}
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i, sec := range sections {
		if len(sec.tokens) != clients*goroutines*rounds {
			t.Errorf("%q: %d sections; want %d", lockIDs[i], len(sec.tokens), clients*goroutines*rounds)
		}
		for j := 1; j < len(sec.tokens); j++ {
			if sec.tokens[j] <= sec.tokens[j-1] {
				t.Errorf("%q: token %d entered after %d", lockIDs[i], sec.tokens[j], sec.tokens[j-1])
			}
		}
	}
}
