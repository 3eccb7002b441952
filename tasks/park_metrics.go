package tasks

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// meterScope is the instrumentation scope of the tasks package's metrics.
const meterScope = "github.com/taskguard/taskguard/tasks"

var handoffBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}

// parkMetrics are the metrics of park mode. All are recorded by the worker
// that observes the event.
type parkMetrics struct {
	parked     metric.Int64Counter     // deliveries parked (a new waiter record)
	handoffs   metric.Int64Counter     // hand-off continuations created
	coalesced  metric.Int64Counter     // deliveries absorbed by a waiting run
	safetyNets metric.Int64Counter     // safety-net deliveries, by whether they ran the job
	latency    metric.Float64Histogram // hand-off creation to the run's start
}

func newParkMetrics(mp metric.MeterProvider) (*parkMetrics, error) {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	m := mp.Meter(meterScope)
	pm := &parkMetrics{}
	var errs []error
	check := func(err error) { errs = append(errs, err) }
	var err error
	pm.parked, err = m.Int64Counter("taskguard.tasks.parked", metric.WithUnit("{delivery}"),
		metric.WithDescription("Deliveries that found their lock busy and were parked in the wait list (park mode)."))
	check(err)
	pm.handoffs, err = m.Int64Counter("taskguard.tasks.handoffs", metric.WithUnit("{continuation}"),
		metric.WithDescription("Continuations a holder created for the oldest waiter after releasing its lock."))
	check(err)
	pm.coalesced, err = m.Int64Counter("taskguard.tasks.coalesced", metric.WithUnit("{delivery}"),
		metric.WithDescription("Deliveries of a coalescing job absorbed by the job's waiting run."))
	check(err)
	pm.safetyNets, err = m.Int64Counter("taskguard.tasks.safety_nets", metric.WithUnit("{delivery}"),
		metric.WithDescription("Safety-net continuations delivered, by ran: true when the safety net ran the job (its hand-off never came)."))
	check(err)
	pm.latency, err = m.Float64Histogram("taskguard.tasks.handoff.latency", metric.WithUnit("s"),
		metric.WithExplicitBucketBoundaries(handoffBuckets...),
		metric.WithDescription("Time from a hand-off (the holder created the continuation) to the start of the waiter's run, on the two workers' clocks."))
	check(err)
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("%w: meter provider: %w", ErrInvalidConfig, err)
	}
	return pm, nil
}

// WithParkingMeterProvider sets the meter provider of park mode's metrics
// (taskguard.tasks.parked, .handoffs, .coalesced, .safety_nets and
// .handoff.latency); the global one (otel.GetMeterProvider) otherwise. Give
// it after WithParking.
func WithParkingMeterProvider(mp metric.MeterProvider) WorkerOption {
	return func(w *Worker) error {
		if w.park == nil || mp == nil {
			return fmt.Errorf("%w: WithParkingMeterProvider needs WithParking first and a provider", ErrInvalidConfig)
		}
		m, err := newParkMetrics(mp)
		if err != nil {
			return err
		}
		w.park.metrics = m
		return nil
	}
}

func (m *parkMetrics) countParked(ctx context.Context) { m.parked.Add(ctx, 1) }

func (m *parkMetrics) countHandoff(ctx context.Context) { m.handoffs.Add(ctx, 1) }

func (m *parkMetrics) countCoalesced(ctx context.Context) { m.coalesced.Add(ctx, 1) }

func (m *parkMetrics) countSafetyNet(ctx context.Context, ran bool) {
	m.safetyNets.Add(ctx, 1, metric.WithAttributes(attribute.Bool("ran", ran)))
}

func (m *parkMetrics) observeHandoff(ctx context.Context, since time.Time) {
	if !since.IsZero() {
		m.latency.Record(ctx, time.Since(since).Seconds())
	}
}
