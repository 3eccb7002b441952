package locking_test

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

// BenchmarkOverhead measures what the core adds to a store: an uncontended
// Acquire + Release through the client on the in-memory store, against the
// store's own Acquire + Release, the two interleaved in one run so that the
// machine's load weighs on both alike. It reports the client's ns/op,
// store-ns/op, x-store (the ratio; the goal is ≤ 4) and client-allocs/op
// (the goal is ≤ 10). Sub-benchmarks: noop, with the no-op telemetry
// providers in Config; global, with none in Config, so the OpenTelemetry
// global providers, with no SDK installed: what a program gets by default.
func BenchmarkOverhead(b *testing.B) {
	b.Run("noop", func(b *testing.B) {
		benchOverhead(b, metricnoop.NewMeterProvider(), tracenoop.NewTracerProvider())
	})
	b.Run("global", func(b *testing.B) { benchOverhead(b, nil, nil) })
}

func benchOverhead(b *testing.B, mp metric.MeterProvider, tp trace.TracerProvider) {
	store := memlock.New()
	c, err := locking.New(locking.Config{
		Strong: store, Logger: slog.New(slog.DiscardHandler),
		MeterProvider: mp, TracerProvider: tp,
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

// TestIdleGlobalTelemetryIsFree checks that a client left with the
// OpenTelemetry global providers, while the program installed none (the
// default), allocates no more per Acquire + Release than one given the
// no-op providers: no spans in contexts, no clock readings for metrics.
// (It must run before any test installs global providers.)
func TestIdleGlobalTelemetryIsFree(t *testing.T) {
	if got := fmt.Sprintf("%T", otel.GetMeterProvider()); got != "*global.meterProvider" {
		t.Fatalf("the global MeterProvider is a %s already; this test must run before any test installs one", got)
	}
	allocs := func(cfg locking.Config) float64 {
		cfg.Strong = memlock.New()
		cfg.Logger = slog.New(slog.DiscardHandler)
		c, err := locking.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return testing.AllocsPerRun(100, func() {
			l, err := c.Acquire(t.Context(), "x")
			if err != nil {
				t.Fatal(err)
			}
			if err := l.Release(t.Context()); err != nil {
				t.Fatal(err)
			}
		})
	}
	noop := allocs(locking.Config{MeterProvider: metricnoop.NewMeterProvider(), TracerProvider: tracenoop.NewTracerProvider()})
	global := allocs(locking.Config{})
	if global > noop {
		t.Errorf("Acquire + Release with the idle global providers: %v allocations; %v with the no-op ones", global, noop)
	}
}
