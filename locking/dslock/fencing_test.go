package dslock

import (
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// TestFencingTransitions follows one id through every way a lock changes
// hands and checks that each new holding gets a larger token, and that
// renewals keep theirs.
func TestFencingTransitions(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		a, b := newBackend(t, e, Options{}), newBackend(t, e, Options{})
		const id = "fencing"
		short := 100 * time.Millisecond
		var last uint64
		issued := func(what string, tok uint64) {
			t.Helper()
			if tok <= last {
				t.Fatalf("%s: token %d not above the previous %d", what, tok, last)
			}
			t.Logf("%-28s token %d", what, tok)
			last = tok
		}
		renew := func(what string, bk *Backend, r0 locking.Request) {
			t.Helper()
			g, err := bk.Renew(t.Context(), r0)
			if err != nil || g.Token != last {
				t.Fatalf("%s: Renew = %+v, %v; want the acquisition's token %d", what, g, err, last)
			}
		}

		r1 := req(id, short)
		issued("acquire", mustAcquire(t, a, r1).Token)
		renew("renew", a, r1)
		renew("renew again", a, r1)
		if err := a.Release(t.Context(), id, r1.Owner); err != nil {
			t.Fatal(err)
		}
		r2 := req(id, short)
		issued("re-create after release", mustAcquire(t, b, r2).Token)
		renew("renew", b, r2)

		time.Sleep(short + 3*testSkew)
		r3 := req(id, time.Minute)
		g := mustAcquire(t, a, r3)
		if !g.TookOver {
			t.Errorf("takeover of an expired lease: TookOver false")
		}
		issued("takeover after expiry", g.Token)
		renew("renew", a, r3)

		time.Sleep(60 * time.Millisecond)
		r4 := req(id, time.Minute)
		r4.StealAfter = 50 * time.Millisecond
		g = mustAcquire(t, b, r4)
		if !g.TookOver {
			t.Errorf("steal: TookOver false")
		}
		issued("steal (StealAfter)", g.Token)

		// Let it expire and have cleanup delete it.
		r5 := req(id, short)
		if err := b.Release(t.Context(), id, r4.Owner); err != nil {
			t.Fatal(err)
		}
		issued("re-create after release", mustAcquire(t, a, r5).Token)
		time.Sleep(short + 100*time.Millisecond)
		rep, err := a.Cleanup(t.Context(), CleanupOptions{Grace: 50 * time.Millisecond})
		if err != nil || rep.Deleted != 1 {
			t.Fatalf("Cleanup = %+v, %v; want 1 deleted", rep, err)
		}
		if _, found := stored(t, a, id); found {
			t.Fatal("cleanup left the expired lock")
		}
		issued("re-create after cleanup", mustAcquire(t, b, req(id, time.Minute)).Token)
	})
}
