package dslock

import (
	"errors"
	"math"
	"testing"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// TestDurationExtremes runs leases and StealAfter at the ends of their range
// against each emulator: 1 ns (rounded up by the store, never to zero or
// "never"), locking.MaxLease (held, and refused to others), and beyond
// MaxLease up to math.MaxInt64 (refused with ErrInvalid before any RPC).
func TestDurationExtremes(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		var log rpcLog
		holder := newBackend(t, e, Options{}, log.intercept)
		taker := newBackend(t, e, Options{})
		// past is long enough for a 1 ns lease or StealAfter to have
		// passed on either clock: the store's, or the client's with its
		// testSkew margin.
		const past = 5 * testSkew

		t.Run("lease 1ns", func(t *testing.T) {
			r := req("x-lease-1ns", 1)
			mustAcquire(t, holder, r)
			rec, found := stored(t, taker, r.ID)
			if !found || rec.lease != time.Millisecond {
				t.Fatalf("stored %+v found=%v; want a lease of 1ms (1ns rounded up)", rec, found)
			}
			time.Sleep(past)
			g := mustAcquire(t, taker, req(r.ID, time.Minute))
			if !g.TookOver {
				t.Errorf("Acquire after a 1ns lease = %+v; want a takeover", g)
			}
		})

		t.Run("lease MaxLease", func(t *testing.T) {
			r := req("x-lease-max", locking.MaxLease)
			g := mustAcquire(t, holder, r)
			if rec, _ := stored(t, taker, r.ID); rec.lease != locking.MaxLease {
				t.Fatalf("stored lease %v; want %v", rec.lease, locking.MaxLease)
			}
			for _, steal := range []time.Duration{0, locking.MaxLease} {
				o := req(r.ID, locking.MaxLease)
				o.StealAfter = steal
				got, err := taker.Acquire(t.Context(), o)
				if err != nil || got.Acquired {
					t.Fatalf("Acquire (StealAfter %v) of a lock held for MaxLease = %+v, %v; want busy", steal, got, err)
				}
				if lo := locking.MaxLease - time.Minute; got.Remaining < lo || got.Remaining > locking.MaxLease+testSkew {
					t.Errorf("Remaining = %v; want about %v", got.Remaining, locking.MaxLease)
				}
			}
			if rg, err := holder.Renew(t.Context(), r); err != nil || rg.Token != g.Token {
				t.Fatalf("Renew = %+v, %v; want token %d", rg, err, g.Token)
			}
			if err := holder.Release(t.Context(), r.ID, r.Owner); err != nil {
				t.Fatal(err)
			}
		})

		t.Run("StealAfter 1ns", func(t *testing.T) {
			r := req("x-steal-1ns", time.Minute)
			mustAcquire(t, holder, r)
			time.Sleep(past)
			o := req(r.ID, time.Minute)
			o.StealAfter = 1
			g := mustAcquire(t, taker, o)
			if !g.TookOver {
				t.Errorf("steal = %+v; want TookOver", g)
			}
			if _, err := holder.Renew(t.Context(), r); !errors.Is(err, locking.ErrNotHeld) {
				t.Errorf("holder's Renew after the steal = %v; want ErrNotHeld", err)
			}
		})

		t.Run("beyond MaxLease refused", func(t *testing.T) {
			for name, r := range map[string]locking.Request{
				"lease MaxLease+1ns":      {Lease: locking.MaxLease + 1},
				"lease MaxInt64":          {Lease: math.MaxInt64},
				"StealAfter MaxLease+1ns": {Lease: time.Minute, StealAfter: locking.MaxLease + 1},
				"StealAfter MaxInt64":     {Lease: time.Minute, StealAfter: math.MaxInt64},
			} {
				t.Run(name, func(t *testing.T) {
					r.ID, r.Owner = "x-"+name, "owner-"+name
					log.take()
					if g, err := holder.Acquire(t.Context(), r); !errors.Is(err, locking.ErrInvalid) || g.Acquired {
						t.Errorf("Acquire = %+v, %v; want ErrInvalid", g, err)
					}
					if _, err := holder.Renew(t.Context(), r); !errors.Is(err, locking.ErrInvalid) {
						t.Errorf("Renew = %v; want ErrInvalid", err)
					}
					if calls := log.take(); len(calls) != 0 {
						t.Errorf("RPCs sent for an invalid request: %v", calls)
					}
					if _, found := stored(t, taker, r.ID); found {
						t.Errorf("an entity was written for an invalid request")
					}
					// The lock stays free for a valid request.
					mustAcquire(t, taker, req(r.ID, time.Minute))
				})
			}
		})
	})
}

// TestDurationArithmeticSaturates checks the conversions between durations,
// stored milliseconds and times at the extremes, without an emulator: none
// may wrap around to a negative (expired) or tiny lease.
func TestDurationArithmeticSaturates(t *testing.T) {
	for _, d := range []time.Duration{1, time.Millisecond, locking.MaxLease, math.MaxInt64 - 1, math.MaxInt64} {
		ms := leaseMillis(d)
		if ms <= 0 || time.Duration(ms) < d/time.Millisecond {
			t.Errorf("leaseMillis(%d) = %d; want at least %d and positive", d, ms, d/time.Millisecond)
		}
	}
	decodeLease := func(ms int64) time.Duration {
		rec, err := decode(&pb.EntityResult{Entity: &pb.Entity{Properties: map[string]*pb.Value{
			propOwner:   {ValueType: &pb.Value_StringValue{StringValue: "o"}},
			propLeaseMs: {ValueType: &pb.Value_IntegerValue{IntegerValue: ms}},
		}}})
		if err != nil {
			t.Fatal(err)
		}
		return rec.lease
	}
	if got := decodeLease(math.MaxInt64); got <= 0 || got < locking.MaxLease {
		t.Errorf("decoded lease of MaxInt64 ms = %v; want saturated, not wrapped", got)
	}
	if got := decodeLease(-5); got != 0 {
		t.Errorf("decoded negative lease = %v; want 0 (expired)", got)
	}

	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	b := &Backend{skew: time.Second, now: func() time.Time { return now }}
	for name, rec := range map[string]record{
		"renewed far in the future": {lease: time.Minute, renewedAt: time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)},
		"huge lease, renewed now":   {lease: math.MaxInt64, renewedAt: now},
	} {
		a := b.judge(rec, time.Time{})
		if a.remaining <= 0 {
			t.Errorf("%s: judged %+v; want still held (remaining > 0), not wrapped to expired", name, a)
		}
	}
	// A lease renewed long ago with an ordinary lease is expired, however
	// far back.
	if a := b.judge(record{lease: time.Minute, renewedAt: time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC)}, time.Time{}); a.remaining > 0 {
		t.Errorf("ancient lease judged %+v; want expired", a)
	}
}
