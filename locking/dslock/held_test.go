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

// TestHoldingsBoundedAndMonotonic checks that the holdings cache stays
// bounded, keeps the newest version under racing writers, and drops an entry
// only when it is still the one the caller saw.
func TestHoldingsBoundedAndMonotonic(t *testing.T) {
	var h holdings
	for i := range 3 * maxHoldings {
		h.put(fmt.Sprint(i), "o", holding{version: int64(i), token: 1})
		if n := len(h.m); n > maxHoldings {
			t.Fatalf("%d entries after %d puts; want at most %d", n, i+1, maxHoldings)
		}
	}

	var wg sync.WaitGroup
	for v := range 64 {
		wg.Go(func() { h.put("x", "o", holding{version: int64(v + 1), token: 7}) })
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
