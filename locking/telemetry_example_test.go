package locking_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// A client records into the MeterProvider of its Config (or the global one).
// Here an in-memory reader collects what one uncontended With recorded; in
// production a periodic reader exports to Cloud Monitoring (see
// docs/observability.md).
func ExampleConfig_meterProvider() {
	reader := sdkmetric.NewManualReader()
	c, err := locking.New(locking.Config{
		Strong:        memlock.New(),
		Logger:        slog.New(slog.DiscardHandler),
		MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)),
	})
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	if err := c.With(ctx, "user-42", func(context.Context) error { return nil }); err != nil {
		panic(err)
	}

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		panic(err)
	}
	var names []string
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			names = append(names, m.Name)
		}
	}
	slices.Sort(names)
	for _, n := range names {
		fmt.Println(n)
	}
	// Output:
	// taskguard.lock.acquire.duration
	// taskguard.lock.backend.calls
	// taskguard.lock.backend.duration
	// taskguard.lock.held
	// taskguard.lock.polls
	// taskguard.lock.releases
}
