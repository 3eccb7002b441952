package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// takeoverLease is the lease (djangae: steal_after) of the dead holder in
// BenchmarkTakeover.
const takeoverLease = time.Second

// takeoverSamples is how many holder deaths each system measures.
const takeoverSamples = 3

// die takes id on lk's store as a holder that dies at once: it never renews
// nor releases.
func die(ctx context.Context, lk locker, id string, lease time.Duration) error {
	switch l := lk.(type) {
	case *ours:
		g, err := l.pc.Backend.Acquire(ctx, locking.Request{ID: id, Owner: rand.Text(), Lease: lease})
		if err == nil && !g.Acquired {
			err = errUnexpected
		}
		return err
	case *djangae:
		ok, err := l.try(ctx, id)
		if err == nil && !ok {
			err = errUnexpected
		}
		return err
	case *googleLock:
		ok, err := l.try(ctx, id, "dead")
		if err == nil && !ok {
			err = errUnexpected
		}
		return err
	}
	return fmt.Errorf("die: unknown locker %T", lk)
}

// BenchmarkTakeover measures the time from a holder's death (the moment it
// started the acquire that was its last word) to another instance holding
// the lock, against the lease: takeover-ns and x-lease (takeover / lease).
// For djangae the "lease" is steal_after_ms, the only way its locks end
// without a release. On the legacy emulator our Datastore backend judges
// leases on client clocks and adds its skew margin (dslock.DefaultClockSkew,
// 2 s); "firestore/ours" runs on the Firestore emulator, whose server times
// it uses instead.
func BenchmarkTakeover(b *testing.B) {
	cfg := backoffConfig()
	firestore := system{"firestore/ours", func(b *testing.B) func() locker {
		e := emulatorOf(b, dstest.Firestore)
		return func() locker { return newOurs(dsBackend(b, e, &rpcCounter{}), cfg, locking.Lease(takeoverLease)) }
	}}
	for _, s := range append(systems(takeoverLease, cfg), firestore) {
		b.Run(s.name, func(b *testing.B) {
			instance := s.open(b)
			dead, waiter := instance(), instance()
			var took []time.Duration
			for b.Loop() {
				for range takeoverSamples {
					id := uniq("takeover")
					t0 := time.Now()
					if err := die(b.Context(), dead, id, takeoverLease); err != nil {
						b.Fatal(err)
					}
					release, err := waiter.acquire(b.Context(), id)
					if err != nil {
						b.Fatal(err)
					}
					took = append(took, time.Since(t0))
					if err := release(b.Context()); err != nil {
						b.Fatal(err)
					}
				}
			}
			p50 := percentile(took, 50)
			b.ReportMetric(float64(p50), "takeover-ns")
			b.ReportMetric(float64(percentile(took, 99)), "takeover-max-ns")
			b.ReportMetric(float64(p50)/float64(takeoverLease), "x-lease")
		})
	}
}
