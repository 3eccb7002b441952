package dslock

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// TestHoldingsFollowTheirLeases checks the holdings table: no fixed cap
// (every live holding keeps its entry, so Renew and Release stay 1 RPC
// however many locks are held), entries of leases that ended long ago are
// swept, the newest version wins under racing writers, and an entry is
// dropped only when it is still the one the caller saw.
func TestHoldingsFollowTheirLeases(t *testing.T) {
	var h holdings
	const live = 3 * 4096 // three times the former cap
	for i := range live {
		h.put(fmt.Sprint(i), "o", holding{version: int64(i + 1), token: 1}, time.Minute)
	}
	if n := h.len(); n != live {
		t.Fatalf("%d entries after %d puts of live holdings; want all kept", n, live)
	}
	for i := range live {
		if _, ok := h.get(fmt.Sprint(i), "o"); !ok {
			t.Fatalf("entry %d of a live holding forgotten", i)
		}
	}
	// Holdings whose leases ended long ago (their holders stopped renewing
	// without releasing) do not accumulate.
	for i := range 3 * live {
		h.put(fmt.Sprint("dead-", i), "o", holding{version: 1, token: 1}, -2*heldLinger)
	}
	if n := h.len(); n > 2*live+minSweep {
		t.Fatalf("%d entries after %d dead holdings; want them swept", n, 3*live)
	}
	for i := range live {
		if _, ok := h.get(fmt.Sprint(i), "o"); !ok {
			t.Fatalf("sweep dropped the entry of live holding %d", i)
		}
	}
	for i := range live {
		h.drop(fmt.Sprint(i), "o", holding{})
	}

	var wg sync.WaitGroup
	for v := range 64 {
		wg.Go(func() { h.put("x", "o", holding{version: int64(v + 1), token: 7}, time.Minute) })
	}
	wg.Wait()
	if got, ok := h.get("x", "o"); !ok || got.version != 64 {
		t.Fatalf("after racing puts: %+v %v; want version 64", got, ok)
	}
	h.drop("x", "o", holding{version: 3, token: 7})
	if _, ok := h.get("x", "o"); !ok {
		t.Fatal("drop of an older version removed the newer entry")
	}
	if _, ok := h.get("x", "other"); ok {
		t.Fatal("entry found for another owner")
	}
	h.drop("x", "o", holding{})
	if _, ok := h.get("x", "o"); ok {
		t.Fatal("drop of any version left the entry")
	}
}

// TestRenewOneRPCAmongManyHoldings holds a lock while the Backend remembers
// 20,000 other live holdings (five times the former cap of 4,096, beyond
// which entries were evicted at random): its Renew and Release still take 1
// RPC each, and the release frees its entry.
func TestRenewOneRPCAmongManyHoldings(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		var log rpcLog
		b := newBackend(t, e, Options{}, log.intercept)
		r := req("many-holdings", time.Minute)
		mustAcquire(t, b, r)
		for i := range 20000 {
			b.held.put(fmt.Sprint("other-", i), "o", holding{version: int64(i + 1), token: 1}, time.Minute)
		}
		log.take()
		if _, err := b.Renew(t.Context(), r); err != nil {
			t.Fatal(err)
		}
		if err := b.Release(t.Context(), r.ID, r.Owner); err != nil {
			t.Fatal(err)
		}
		if calls := log.take(); len(calls) != 2 {
			t.Errorf("Renew and Release sent %v; want one Commit each", calls)
		}
		if _, ok := b.held.get(KeyName(r.ID), r.Owner); ok {
			t.Error("the released holding is still remembered")
		}
	})
}

// TestConcurrentRenewals renews one holding from many goroutines of one
// Backend at once, and from a second Backend with the same owner token (so
// each one's remembered version goes stale under the other), then releases
// it: every renewal that succeeds returns the acquisition's token, the entity
// keeps that token, and after the release both Backends report ErrNotHeld.
func TestConcurrentRenewals(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		a, b := newBackend(t, e, Options{}), newBackend(t, e, Options{})
		r := req("concurrent-renewals", time.Minute)
		tok := mustAcquire(t, a, r).Token

		var wg sync.WaitGroup
		var ok, contended atomic.Int64
		errs := make(chan error, 64)
		for i := range 8 {
			be := a
			if i%4 == 3 {
				be = b
			}
			wg.Go(func() {
				for range 4 {
					g, err := be.Renew(t.Context(), r)
					switch {
					case errors.Is(err, errContended):
						contended.Add(1)
					case err != nil:
						errs <- err
						return
					case g.Token != tok:
						errs <- fmt.Errorf("renewal returned token %d; want %d", g.Token, tok)
						return
					default:
						ok.Add(1)
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		t.Logf("%d renewals succeeded, %d gave up on contention", ok.Load(), contended.Load())
		if ok.Load() == 0 {
			t.Fatal("no renewal succeeded")
		}
		if rec, found := stored(t, a, r.ID); !found || rec.owner != r.Owner || rec.fencing() != tok {
			t.Fatalf("after the renewals: %+v found=%v; want owner %s token %d", rec, found, r.Owner, tok)
		}
		if g, err := a.Renew(t.Context(), r); err != nil || g.Token != tok {
			t.Fatalf("quiet renewal: %+v, %v; want token %d", g, err, tok)
		}
		if err := a.Release(t.Context(), r.ID, r.Owner); err != nil {
			t.Fatalf("Release: %v", err)
		}
		if _, found := stored(t, a, r.ID); found {
			t.Fatal("entity left after Release")
		}
		for name, be := range map[string]*Backend{"a": a, "b": b} {
			if _, err := be.Renew(t.Context(), r); !errors.Is(err, locking.ErrNotHeld) {
				t.Errorf("Renew on %s after release: %v; want ErrNotHeld", name, err)
			}
			if err := be.Release(t.Context(), r.ID, r.Owner); !errors.Is(err, locking.ErrNotHeld) {
				t.Errorf("Release on %s after release: %v; want ErrNotHeld", name, err)
			}
		}
	})
}
