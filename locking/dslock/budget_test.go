package dslock

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// TestRPCBudget counts the RPCs of each operation with a gRPC interceptor.
func TestRPCBudget(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		var logA, logB, logC, logD rpcLog
		a := newBackend(t, e, Options{}, logA.intercept)
		b := newBackend(t, e, Options{}, logB.intercept)
		c := newBackend(t, e, Options{}, logC.intercept)
		d := newBackend(t, e, Options{}, logD.intercept) // a second instance of a's owner, with nothing cached
		admin := newBackend(t, e, Options{})
		const id = "budget"
		ra, rb, rc := req(id, time.Minute), req(id, 200*time.Millisecond), req(id, time.Minute)

		var tokenA uint64
		renew := func(be *Backend, r locking.Request) func() (bool, error) {
			return func() (bool, error) {
				g, err := be.Renew(t.Context(), r)
				if err == nil && g.Token != tokenA {
					t.Errorf("renew returned token %d; want the acquisition's %d", g.Token, tokenA)
				}
				return err == nil, err
			}
		}
		release := func(be *Backend, r locking.Request) func() (bool, error) {
			return func() (bool, error) { return true, be.Release(t.Context(), r.ID, r.Owner) }
		}

		steps := []struct {
			name    string
			log     *rpcLog
			do      func() (acquired bool, err error)
			want    []string
			held    bool // want acquired (or success)
			notHeld bool // want an error wrapping locking.ErrNotHeld
		}{
			{name: "acquire free", log: &logA, do: func() (bool, error) {
				g, err := a.Acquire(t.Context(), ra)
				tokenA = g.Token
				return g.Acquired, err
			}, want: []string{"Commit"}, held: true},
			{name: "acquire held, first try", log: &logB, do: acq(t, b, rb), want: []string{"Commit", "Lookup"}},
			{name: "poll held", log: &logB, do: acq(t, b, rb), want: []string{"Lookup"}},
			{name: "poll held again", log: &logB, do: acq(t, b, rb), want: []string{"Lookup"}},
			{name: "renew", log: &logA, do: renew(a, ra), want: []string{"Commit"}, held: true},
			{name: "renew again", log: &logA, do: renew(a, ra), want: []string{"Commit"}, held: true},
			{name: "renew, nothing cached", log: &logD, do: renew(d, ra), want: []string{"Lookup", "Commit"}, held: true},
			{name: "renew, cached version stale", log: &logA, do: renew(a, ra), want: []string{"Commit", "Lookup", "Commit"}, held: true},
			{name: "renew, cached version current", log: &logA, do: renew(a, ra), want: []string{"Commit"}, held: true},
			{name: "release", log: &logA, do: release(a, ra), want: []string{"Commit"}, held: true},
			{name: "release, released", log: &logA, do: release(a, ra), want: []string{"Lookup"}, notHeld: true},
			{name: "acquire after release, polling", log: &logB, do: acq(t, b, rb), want: []string{"Lookup", "Commit"}, held: true},
			{name: "acquire expired, first try", log: &logC, do: func() (bool, error) {
				time.Sleep(rb.Lease + 3*testSkew)
				return acq(t, c, rc)()
			}, want: []string{"Commit", "Lookup", "Commit"}, held: true},
			{name: "renew, taken over", log: &logB, do: func() (bool, error) { _, err := b.Renew(t.Context(), rb); return false, err },
				want: []string{"Commit", "Lookup"}, notHeld: true},
			{name: "release after takeover", log: &logC, do: release(c, rc), want: []string{"Commit"}, held: true},
			{name: "acquire again", log: &logC, do: acq(t, c, rc), want: []string{"Commit"}, held: true},
			{name: "release, force-released", log: &logC, do: func() (bool, error) {
				if _, err := admin.ForceRelease(t.Context(), id, 0); err != nil {
					t.Fatalf("ForceRelease: %v", err)
				}
				return false, c.Release(t.Context(), id, rc.Owner)
			}, want: []string{"Commit", "Lookup"}, notHeld: true},
		}
		for _, s := range steps {
			s.log.take()
			ok, err := s.do()
			got := s.log.take()
			switch {
			case s.notHeld:
				if !errors.Is(err, locking.ErrNotHeld) {
					t.Fatalf("%s: %v; want ErrNotHeld", s.name, err)
				}
			case err != nil:
				t.Fatalf("%s: %v", s.name, err)
			case ok != s.held:
				t.Fatalf("%s: succeeded=%v; want %v", s.name, ok, s.held)
			}
			t.Logf("%-32s %d RPC: %v", s.name, len(got), got)
			if !slices.Equal(got, s.want) {
				t.Errorf("%s: RPCs %v; want %v", s.name, got, s.want)
			}
		}

		// A backend that polled a lock takes it over, once expired, in 2 RPCs.
		logB.take()
		rb2 := req("budget-2", 150*time.Millisecond)
		mustAcquire(t, a, rb2)
		rb3 := req("budget-2", time.Minute)
		if ok, _ := acq(t, b, rb3)(); ok {
			t.Fatal("acquired a held lock")
		}
		time.Sleep(rb2.Lease + 3*testSkew)
		logB.take()
		if ok, err := acq(t, b, rb3)(); !ok || err != nil {
			t.Fatalf("takeover: %v %v", ok, err)
		}
		got := logB.take()
		t.Logf("%-32s %d RPC: %v", "take over after polling", len(got), got)
		if want := []string{"Lookup", "Commit"}; !slices.Equal(got, want) {
			t.Errorf("takeover after polling: RPCs %v; want %v", got, want)
		}
	})
}

// countingBackend counts Acquire calls reaching the backend.
type countingBackend struct {
	*Backend
	acquires atomic.Int64
}

func (c *countingBackend) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	c.acquires.Add(1)
	return c.Backend.Acquire(ctx, r)
}

// TestPollBudgetThroughClient waits for a held lock through locking.Client
// and checks that its polls cost one RPC each (plus one for the first try,
// which finds the lock held by creating).
func TestPollBudgetThroughClient(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		holder := newBackend(t, e, Options{})
		var log rpcLog
		cb := &countingBackend{Backend: newBackend(t, e, Options{}, log.intercept)}
		c, err := locking.New(locking.Config{Strong: cb, MinBackoff: 20 * time.Millisecond, MaxBackoff: 40 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		mustAcquire(t, holder, req("polled", time.Minute))
		_, err = c.Acquire(t.Context(), "polled", locking.MaxWait(400*time.Millisecond))
		if !errors.Is(err, locking.ErrNotAcquired) {
			t.Fatalf("Acquire = %v; want ErrNotAcquired", err)
		}
		tries, rpcs := cb.acquires.Load(), len(log.take())
		t.Logf("%d tries of a held lock: %d RPCs", tries, rpcs)
		if tries < 3 || int64(rpcs) != tries+1 {
			t.Errorf("%d tries cost %d RPCs; want tries+1", tries, rpcs)
		}
	})
}

// acq returns a step acquiring r through b.
func acq(t *testing.T, b *Backend, r locking.Request) func() (bool, error) {
	return func() (bool, error) {
		g, err := b.Acquire(t.Context(), r)
		return g.Acquired, err
	}
}
