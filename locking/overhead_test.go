package locking_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

// BenchmarkOverhead measures what the core adds to a store: an uncontended
// Acquire + Release through the client on the in-memory store, against the
// store's own Acquire + Release, the two interleaved in one run so that the
// machine's load weighs on both alike. It reports the client's ns/op,
// store-ns/op, x-store (the ratio; the goal is ≤ 4) and client-allocs/op
// (the goal is ≤ 10), with the no-op telemetry providers.
func BenchmarkOverhead(b *testing.B) {
	store := memlock.New()
	c, err := locking.New(locking.Config{
		Strong: store, Logger: slog.New(slog.DiscardHandler),
		MeterProvider: metricnoop.NewMeterProvider(), TracerProvider: tracenoop.NewTracerProvider(),
	})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	req := locking.Request{ID: "direct", Owner: "owner", Lease: locking.DefaultLease}
	direct := func() {
		if g, err := store.Acquire(ctx, req); err != nil || !g.Acquired {
			b.Fatalf("store Acquire = %+v, %v", g, err)
		}
		if err := store.Release(ctx, req.ID, req.Owner); err != nil {
			b.Fatal(err)
		}
	}
	client := func() {
		l, err := c.Acquire(ctx, "client")
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			b.Fatal(err)
		}
	}
	var storeTime, clientTime time.Duration
	n := 0
	for b.Loop() {
		t0 := time.Now()
		direct()
		t1 := time.Now()
		client()
		clientTime += time.Since(t1)
		storeTime += t1.Sub(t0)
		n++
	}
	b.ReportMetric(float64(clientTime.Nanoseconds())/float64(n), "ns/op")
	b.ReportMetric(float64(storeTime.Nanoseconds())/float64(n), "store-ns/op")
	b.ReportMetric(float64(clientTime)/float64(storeTime), "x-store")
	b.ReportMetric(testing.AllocsPerRun(100, client), "client-allocs/op")
	b.ReportMetric(testing.AllocsPerRun(100, direct), "store-allocs/op")
}
