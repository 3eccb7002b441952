package torture_test

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/taskguard/taskguard/internal/faultproxy"
	"github.com/taskguard/taskguard/internal/torture"
	"github.com/taskguard/taskguard/locking"
)

// scale is the size of one contention run.
type scale struct {
	procs, clients, goroutines int
	ids                        int
	duration                   time.Duration
}

func contention() scale {
	if long {
		return scale{procs: 4, clients: 2, goroutines: 4, ids: 3, duration: 40 * time.Second}
	}
	return scale{procs: 3, clients: 2, goroutines: 3, ids: 3, duration: 3 * time.Second}
}

func ids(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("torture-%d", i)
	}
	return out
}

// checkTimeout bounds porcupine's search.
const checkTimeout = 2 * time.Minute

// assertExclusive fails t unless the history has no overlap, tokens
// increasing per id in entry order, and a linearizable acquire/release
// history.
func assertExclusive(t *testing.T, res torture.Result) {
	t.Helper()
	for i, o := range res.Overlaps {
		if i == 5 {
			t.Errorf("... %d overlaps in all", len(res.Overlaps))
			break
		}
		t.Errorf("overlap on %q by %v: %+v and %+v", o.A.ID, o.By, o.A, o.B)
	}
	if res.TokenOrder != 0 {
		t.Errorf("%d token-order violations", res.TokenOrder)
	}
	if res.Linearizable != porcupine.Ok {
		t.Errorf("linearizability: %s", res.Linearizable)
	}
}

// TestTortureContention has several processes of several clients of several
// goroutines contend on a few ids of each real store. On Datastore one
// process runs with its client clock skewed: by 5 s on the Firestore
// emulator (which judges leases on server time, so the skew must not
// matter) and by 1 s, within the 2 s margin, on the legacy emulator.
func TestTortureContention(t *testing.T) {
	sc := contention()
	eachStore(t, !long, func(t *testing.T, s store) {
		cfg := s.config(t)
		cfg.IDs = ids(sc.ids)
		cfg.Clients, cfg.Goroutines = sc.clients, sc.goroutines
		cfg.Duration, cfg.Lease, cfg.MaxHold = sc.duration, 3*time.Second, 3*time.Millisecond
		skew := map[string]time.Duration{torture.StoreFirestore: 5 * time.Second, torture.StoreLegacy: time.Second}[s.name]
		start := time.Now()
		st, sections := runWorkers(t, sc.procs, cfg, func(i int, c *torture.Config) {
			if i == 0 {
				c.Skew = skew
			}
		}, nil)
		res := torture.Check(sections, checkTimeout)
		report(t, "%s; processes=%d goroutines=%d acquired=%d errors=%d skew(process 0)=%v in %v",
			res, sc.procs, sc.procs*sc.clients*sc.goroutines, st.Acquired, st.Errors, skew, time.Since(start).Round(time.Millisecond))
		if res.Sections < 10 {
			t.Errorf("only %d sections recorded; the run did not contend", res.Sections)
		}
		if int64(res.Sections) != st.Acquired {
			t.Errorf("workers counted %d acquisitions but recorded %d sections", st.Acquired, res.Sections)
		}
		// With no faults every store, Weak ones included, must exclude:
		// nothing loses data here.
		assertExclusive(t, res)
		if st.Errors != 0 || res.Lost != 0 {
			t.Errorf("errors=%d lost=%d without any fault", st.Errors, res.Lost)
		}
	})
}

// faultLease is the lease used under faults: short, so that a blackhole
// outlasts it.
const faultLease = 2 * time.Second

// TestTortureFaults runs the contention through a fault-injecting proxy and
// injects, in turn: latency, a reset of every connection, refused
// connections, resets in the middle of requests (commits, scripts, cas), a
// blackhole longer than the lease (holders lose their locks), and for the
// Weak stores a server restart that loses every key. Strong stores must stay
// exclusive; Weak stores' overlaps are counted and reported.
func TestTortureFaults(t *testing.T) {
	rounds := 1
	if long {
		rounds = 6
	}
	eachStore(t, !long, func(t *testing.T, s store) {
		proxy := faultproxy.Start(t, s.addr)
		cfg := s.config(t)
		cfg.Addr = proxy.Addr()
		cfg.IDs = ids(2)
		cfg.Clients, cfg.Goroutines = 1, 3
		cfg.Lease, cfg.MaxHold = faultLease, 20*time.Millisecond
		const step = 700 * time.Millisecond
		perRound := 5*step + faultLease + faultLease/2 + 2*step
		cfg.Duration = time.Duration(rounds)*perRound + step
		faults := 0
		restarts := 0
		var lastFault time.Time
		start := time.Now()
		st, sections := runWorkers(t, 3, cfg, nil, func() {
			for range rounds {
				time.Sleep(step)
				proxy.SetLatency(30 * time.Millisecond)
				time.Sleep(step)
				proxy.SetLatency(0)
				proxy.Reset()
				proxy.Refuse(true)
				time.Sleep(step / 2)
				proxy.Refuse(false)
				for range 3 {
					time.Sleep(step / 2)
					proxy.ResetAfter(40)
				}
				time.Sleep(step)
				proxy.Blackhole(true)
				time.Sleep(faultLease + faultLease/2)
				proxy.Blackhole(false)
				faults += 7
				if s.restart != nil {
					s.restart(t)
					restarts++
					faults++
				}
				lastFault = time.Now()
				time.Sleep(2 * step)
			}
		})
		res := torture.Check(sections, checkTimeout)
		after := 0
		for _, sec := range sections {
			if sec.Enter > lastFault.UnixNano() {
				after++
			}
		}
		ps := proxy.Stats()
		report(t, "%s; rounds=%d faults=%d (restarts %d) acquired=%d errors=%d lost=%d proxy: accepted=%d refused=%d reset=%d dropped-bytes=%d; after last fault=%d; in %v",
			res, rounds, faults, restarts, st.Acquired, st.Errors, st.Lost, ps.Accepted, ps.Refused, ps.Reset, ps.Dropped, after, time.Since(start).Round(time.Millisecond))
		if ps.Reset == 0 || ps.Dropped == 0 {
			t.Errorf("the faults did not bite: %+v", ps)
		}
		if after == 0 {
			t.Errorf("no section entered after the last fault: the clients did not recover")
		}
		if torture.Kind(s.name) == locking.Strong {
			assertExclusive(t, res)
			return
		}
		// Weak: a restart loses every lock, so overlaps may happen; they are
		// reported above, not hidden. The checker must still see them when
		// they happen: porcupine and the overlap scan agree.
		if (len(res.Overlaps) == 0) != (res.Linearizable == porcupine.Ok) && res.Linearizable != porcupine.Unknown {
			t.Errorf("overlap scan (%d) and porcupine (%s) disagree", len(res.Overlaps), res.Linearizable)
		}
	})
}

// TestTortureLifeCycle attacks the edges of a lock's life on every store:
// contexts cancelled at random points of acquire and hold, bodies that run
// on after their context ended, and replies lost after the store applied an
// Acquire, Renew or Release. No two sections may overlap (With holds the
// lock until its body returns), and when the workers are done no lock may be
// left held (a grant nobody holds is given back).
func TestTortureLifeCycle(t *testing.T) {
	sc := contention()
	eachStore(t, !long, func(t *testing.T, s store) {
		cfg := s.config(t)
		cfg.IDs = ids(sc.ids)
		cfg.Clients, cfg.Goroutines = sc.clients, sc.goroutines
		cfg.Duration, cfg.Lease, cfg.MaxHold = sc.duration, 3*time.Second, 20*time.Millisecond
		cfg.LifeFaults, cfg.DropReply = true, 0.05
		start := time.Now()
		st, sections := runWorkers(t, sc.procs, cfg, nil, nil)
		res := torture.Check(sections, checkTimeout)
		report(t, "%s; processes=%d acquired=%d errors=%d (releases the store failed: %d) lost=%d cancelled while acquiring=%d while holding=%d (ran on after it: %d) replies dropped=%d in %v",
			res, sc.procs, st.Acquired, st.Errors, st.ReleaseFailed, st.Lost, st.CancelledAcquiring, st.CancelledHolding, st.Overran, st.DroppedReplies,
			time.Since(start).Round(time.Millisecond))
		if st.CancelledAcquiring == 0 || st.CancelledHolding == 0 || st.Overran == 0 || st.DroppedReplies == 0 {
			t.Errorf("the faults did not bite: %+v", st)
		}
		assertExclusive(t, res)
		// Nothing left held: every id is free once the workers are gone,
		// unless the store itself failed a release (then that lock expires
		// with its lease, as documented).
		b, closeB, err := torture.NewBackend(t.Context(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer closeB()
		for _, id := range cfg.IDs {
			g, err := b.Acquire(t.Context(), locking.Request{ID: id, Owner: "torture-check", Lease: time.Second})
			switch {
			case err == nil && g.Acquired:
			case st.ReleaseFailed > 0:
				t.Logf("lock %q held after the run (%+v, %v); the store failed %d releases, whose locks expire with their lease", id, g, err, st.ReleaseFailed)
			default:
				t.Errorf("lock %q left held after the run although no release failed in the store: %+v, %v", id, g, err)
			}
		}
	})
}

// TestTortureCrash kills a holder process with SIGKILL inside its critical
// section. Another holder takes the lock over only after the lease counted
// from the holder's last renewal (never before), and gets a higher token.
func TestTortureCrash(t *testing.T) {
	rounds := 1
	if long {
		rounds = 5
	}
	eachStore(t, false, func(t *testing.T, s store) {
		for r := range rounds {
			cfg := s.config(t)
			cfg.IDs = []string{fmt.Sprintf("crash-%d", r)}
			cfg.Clients, cfg.Goroutines = 1, 1
			cfg.Duration, cfg.Lease = time.Hour, faultLease
			cfg.HoldForever = true
			dir := t.TempDir()
			cfg.RenewLog = dir + "/renewals"
			w := spawn(t, dir, 0, cfg)
			held := waitEntered(t, w, 30*time.Second)
			time.Sleep(faultLease/2 + faultLease/3) // past at least one renewal
			if err := w.cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			killed := time.Now()
			_ = w.cmd.Wait()
			last := max(lastRenewal(t, cfg.RenewLog), held.Start)

			b, closeB, err := torture.NewBackend(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			c := newClient(t, s.name, b)
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			l, err := c.Acquire(ctx, cfg.IDs[0], locking.Kind(torture.Kind(s.name)), locking.Lease(faultLease))
			entered := time.Now()
			cancel()
			if err != nil {
				closeB()
				t.Fatalf("taking over the dead holder's lock: %v", err)
			}
			_ = l.Release(t.Context())
			closeB()
			after := time.Duration(entered.UnixNano() - last)
			report(t, "round %d: holder token %d killed %v after its last renewal; taker entered %v after the last renewal (%v after the kill), token %d",
				r, held.Token, killed.Sub(time.Unix(0, last)).Round(time.Millisecond), after.Round(time.Millisecond), entered.Sub(killed).Round(time.Millisecond), l.Token())
			if after < faultLease {
				t.Errorf("taken over %v after the dead holder's last renewal; want >= the lease %v", after, faultLease)
			}
			if l.Token() <= held.Token {
				t.Errorf("taker's token %d; want > the dead holder's %d", l.Token(), held.Token)
			}
		}
	})
}

// newClient returns a locking client on b as the store's kind.
func newClient(t *testing.T, storeName string, b locking.Backend) *locking.Client {
	t.Helper()
	cfg := locking.Config{MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
	if torture.Kind(storeName) == locking.Strong {
		cfg.Strong = b
	} else {
		cfg.Weak = b
	}
	c, err := locking.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// lossOutcome is what one lost-lock round measured.
type lossOutcome struct {
	done, taken time.Time // holder's Done closed; taker entered
	lostCause   bool      // the holder's context was cancelled with ErrLockLost
	token, next uint64
}

// loseLock runs one round: a holder connected through proxy acquires id
// with lease, the proxy is blackholed so that its renewals fail, and a
// taker (its own connection to the store, clock skewed by takerSkew on the
// legacy emulator) waits for the lock. It returns when both are done.
func loseLock(t *testing.T, s store, proxy *faultproxy.Proxy, id string, lease, takerSkew time.Duration) lossOutcome {
	t.Helper()
	cfg := s.config(t)
	holderCfg := cfg
	holderCfg.Addr = proxy.Addr()
	hb, closeH, err := torture.NewBackend(t.Context(), holderCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer closeH()
	takerCfg := cfg
	takerCfg.Skew = takerSkew
	tb, closeT, err := torture.NewBackend(t.Context(), takerCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer closeT()
	holder, taker := newClient(t, s.name, hb), newClient(t, s.name, tb)
	kind := locking.Kind(torture.Kind(s.name))

	var out lossOutcome
	entered := make(chan struct{})
	holderErr := make(chan error, 1)
	go func() {
		holderErr <- holder.With(t.Context(), id, func(ctx context.Context) error {
			out.token = locking.FromContext(ctx).Token()
			close(entered)
			<-ctx.Done()
			out.done = time.Now()
			out.lostCause = errors.Is(context.Cause(ctx), locking.ErrLockLost)
			return nil
		}, kind, locking.Lease(lease))
	}()
	select {
	case <-entered:
	case err := <-holderErr:
		t.Fatalf("holder: %v", err)
	}
	time.Sleep(lease / 4)
	proxy.Blackhole(true)
	defer proxy.Blackhole(false)

	ctx, cancel := context.WithTimeout(t.Context(), 4*lease+10*time.Second)
	defer cancel()
	l, err := taker.Acquire(ctx, id, kind, locking.Lease(lease))
	out.taken = time.Now()
	if err != nil {
		t.Fatalf("taker: %v", err)
	}
	out.next = l.Token()
	_ = l.Release(t.Context())
	if err := <-holderErr; !errors.Is(err, locking.ErrLockLost) {
		t.Errorf("holder's With returned %v; want ErrLockLost", err)
	}
	return out
}

// TestTortureLostLock blackholes a holder's connection so that its renewals
// fail: its Done closes and its context is cancelled before anyone else can
// take the lock over. The margin (taker's entry minus the holder's Done) is
// reported; the core promises at least a tenth of the lease, counted from
// when each renewal was sent.
func TestTortureLostLock(t *testing.T) {
	rounds := 1
	if long {
		rounds = 6
	}
	eachStore(t, false, func(t *testing.T, s store) {
		proxy := faultproxy.Start(t, s.addr)
		detected := 0
		var minMargin time.Duration = 1 << 62
		for r := range rounds {
			o := loseLock(t, s, proxy, fmt.Sprintf("lost-%d", r), faultLease, 0)
			margin := o.taken.Sub(o.done)
			minMargin = min(minMargin, margin)
			if o.lostCause && margin > 0 {
				detected++
			}
			if margin <= 0 {
				t.Errorf("round %d: taker entered %v before the holder's Done closed", r, -margin)
			}
			if !o.lostCause {
				t.Errorf("round %d: holder's context was not cancelled with ErrLockLost", r)
			}
			if o.next <= o.token {
				t.Errorf("round %d: taker's token %d; want > %d", r, o.next, o.token)
			}
		}
		report(t, "lost locks detected before takeover: %d/%d; smallest margin %v (lease %v, lease/10 = %v)",
			detected, rounds, minMargin.Round(time.Millisecond), faultLease, faultLease/10)
	})
}

// TestTortureClockSkew skews the taker's client clock ahead while the holder
// is blackholed. On the Firestore emulator leases are judged on server time
// and no skew matters. On the legacy emulator (no server times) the taker's
// clock is used, with dslock.DefaultClockSkew (2 s) as the margin: at the
// margin the holder still learns of its loss first; beyond it (here by
// 1.5 s) the taker enters while the holder still believes it holds the lock.
// That overlap is expected, asserted and reported.
func TestTortureClockSkew(t *testing.T) {
	const lease = 3 * time.Second
	cases := []struct {
		store       string
		skew        time.Duration
		wantOverlap bool
	}{
		{torture.StoreFirestore, 10 * time.Second, false},
		{torture.StoreLegacy, 2 * time.Second, false},
		{torture.StoreLegacy, 3500 * time.Millisecond, true},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s/skew=%v", tc.store, tc.skew), func(t *testing.T) {
			s := startStore(t, tc.store)
			proxy := faultproxy.Start(t, s.addr)
			o := loseLock(t, s, proxy, "skew", lease, tc.skew)
			margin := o.taken.Sub(o.done)
			report(t, "taker clock +%v: taker entered %v after the holder's Done (negative: overlap); want overlap=%v",
				tc.skew, margin.Round(time.Millisecond), tc.wantOverlap)
			if got := margin < 0; got != tc.wantOverlap {
				t.Errorf("overlap=%v (margin %v); want %v", got, margin, tc.wantOverlap)
			}
			if o.next <= o.token {
				t.Errorf("taker's token %d; want > %d", o.next, o.token)
			}
		})
	}
}

// TestTortureWeakRestart shows what a Weak store does when it loses its
// data: the store restarts while a holder is inside its critical section, a
// second owner acquires the lock at once, and the two overlap until the
// first holder's next renewal fails and its context is cancelled (at most a
// third of the lease, plus the renewal's round trip). The overlap is
// expected for Weak locks; it is asserted and reported.
func TestTortureWeakRestart(t *testing.T) {
	const lease = 3 * time.Second
	for _, name := range []string{torture.StoreMemcached, torture.StoreRedis} {
		t.Run(name, func(t *testing.T) {
			s := startStore(t, name)
			cfg := s.config(t)
			hb, closeH, err := torture.NewBackend(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer closeH()
			tb, closeT, err := torture.NewBackend(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer closeT()
			holder, taker := newClient(t, name, hb), newClient(t, name, tb)
			entered := make(chan struct{})
			var done time.Time
			var lost bool
			holderErr := make(chan error, 1)
			go func() {
				holderErr <- holder.With(t.Context(), "restart", func(ctx context.Context) error {
					close(entered)
					<-ctx.Done()
					done, lost = time.Now(), errors.Is(context.Cause(ctx), locking.ErrLockLost)
					return nil
				}, locking.Kind(locking.Weak), locking.Lease(lease))
			}()
			<-entered
			s.restart(t)
			ctx, cancel := context.WithTimeout(t.Context(), 2*lease)
			defer cancel()
			l, err := taker.Acquire(ctx, "restart", locking.Kind(locking.Weak), locking.Lease(lease))
			taken := time.Now()
			if err != nil {
				t.Fatalf("taker after the restart: %v", err)
			}
			if err := <-holderErr; !errors.Is(err, locking.ErrLockLost) {
				t.Errorf("holder's With = %v; want ErrLockLost", err)
			}
			_ = l.Release(t.Context())
			overlap := done.Sub(taken)
			report(t, "after a restart the taker entered while the holder was inside; overlap %v until the holder's renewal failed (lease %v, renewal every %v); holder told: %v",
				overlap.Round(time.Millisecond), lease, lease/3, lost)
			if overlap <= 0 {
				t.Errorf("no overlap (%v): the holder noticed the restart before the taker entered, which a Weak store cannot promise; has the test lost its point?", overlap)
			}
			if overlap > lease/3+time.Second || !lost {
				t.Errorf("holder learned of the loss %v after the takeover (lost=%v); want within a renewal interval (%v) plus a second", overlap, lost, lease/3)
			}
		})
	}
}

// TestTortureResetMidRequest resets the holder's connection after the first
// n bytes of its Acquire (a Datastore commit, a memcached incr or add, a
// redis script call), for several n. Whatever the outcome, the lock is
// consistent: when Acquire reports the lock held, nobody else gets it until
// it is released; when Acquire fails, nothing is left held.
func TestTortureResetMidRequest(t *testing.T) {
	cuts := []int64{10, 60, 150, 400}
	eachStore(t, false, func(t *testing.T, s store) {
		proxy := faultproxy.Start(t, s.addr)
		cfg := s.config(t)
		hcfg := cfg
		hcfg.Addr = proxy.Addr()
		hb, closeH, err := torture.NewBackend(t.Context(), hcfg)
		if err != nil {
			t.Fatal(err)
		}
		defer closeH()
		ob, closeO, err := torture.NewBackend(t.Context(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer closeO()
		holder, other := newClient(t, s.name, hb), newClient(t, s.name, ob)
		kind := locking.Kind(torture.Kind(s.name))
		// Warm the holder's connection, so the cut lands in the request.
		if err := holder.With(t.Context(), "warm", func(context.Context) error { return nil }, kind); err != nil {
			t.Fatal(err)
		}
		acquired, failed := 0, 0
		for _, n := range cuts {
			id := fmt.Sprintf("cut-%d", n)
			proxy.ResetAfter(n)
			// The lock lives no longer than the context it was acquired with.
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			l, err := holder.Acquire(ctx, id, kind, locking.Lease(faultLease), locking.Wait(false))
			ol, oerr := other.Acquire(t.Context(), id, kind, locking.Lease(faultLease), locking.Wait(false))
			switch {
			case err == nil:
				acquired++
				if oerr == nil {
					t.Errorf("cut after %d bytes: both the holder (token %d) and another client (token %d) hold %q", n, l.Token(), ol.Token(), id)
					_ = ol.Release(t.Context())
				} else if !errors.Is(oerr, locking.ErrNotAcquired) {
					t.Errorf("cut after %d bytes: other client: %v", n, oerr)
				}
				if err := l.Release(t.Context()); err != nil {
					t.Errorf("cut after %d bytes: release: %v", n, err)
				}
			default:
				failed++
				if oerr != nil {
					t.Errorf("cut after %d bytes: Acquire failed (%v) but left the lock held: %v", n, err, oerr)
					continue
				}
				_ = ol.Release(t.Context())
			}
		}
		report(t, "acquire cut after %v bytes: %d acquired (held exclusively), %d failed (nothing left held); proxy resets=%d",
			cuts, acquired, failed, proxy.Stats().Reset)
		if proxy.Stats().Reset < int64(len(cuts)) {
			t.Errorf("only %d resets for %d cuts", proxy.Stats().Reset, len(cuts))
		}
	})
}
