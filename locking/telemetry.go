package locking

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

// scope is the OpenTelemetry instrumentation scope of this package's meter
// and tracer.
const scope = "github.com/taskguard/taskguard/locking"

// Attribute keys. Metrics carry only the kind and bounded enumerations (never
// a lock id, which would make one time series per id); spans, which are per
// request, also carry the id and the token.
const (
	attrKind      = attribute.Key("taskguard.lock.kind")
	attrOutcome   = attribute.Key("taskguard.lock.outcome")
	attrOperation = attribute.Key("taskguard.lock.operation")
	attrReason    = attribute.Key("taskguard.lock.reason")
	attrID        = attribute.Key("taskguard.lock.id")
	attrToken     = attribute.Key("taskguard.lock.token")
	attrPolls     = attribute.Key("taskguard.lock.polls")
	attrTookOver  = attribute.Key("taskguard.lock.took_over")
)

// An outcome of an Acquire call, the value of taskguard.lock.outcome on
// taskguard.lock.acquire.duration, taskguard.lock.wait.duration and the
// acquire span.
type outcome int

const (
	outcomeAcquired outcome = iota // the lock is held
	outcomeBusy                    // held by another owner and Wait(false)
	outcomeTimeout                 // MaxWait passed
	outcomeCanceled                // the context ended
	outcomeError                   // the backend failed
	numOutcomes
)

var outcomeNames = [numOutcomes]string{"acquired", "busy", "timeout", "canceled", "error"}

// A result of one backend call or one release: ok, not_held (the store says
// this owner does not hold the lock) or error.
type result int

const (
	resultOK result = iota
	resultNotHeld
	resultError
	numResults
)

var resultNames = [numResults]string{"ok", "not_held", "error"}

func resultOf(err error) result {
	switch {
	case err == nil:
		return resultOK
	case errors.Is(err, ErrNotHeld), errors.Is(err, ErrLockLost):
		return resultNotHeld
	}
	return resultError
}

// A Backend operation, the value of taskguard.lock.operation.
type operation int

const (
	opAcquire operation = iota
	opRenew
	opRelease
	numOperations
)

var operationNames = [numOperations]string{"acquire", "renew", "release"}

// Why a lock was lost, the value of taskguard.lock.reason on
// taskguard.lock.lost.
type lossReason int

const (
	lossNotHeld lossReason = iota // the store says another owner has it, or no one
	lossExpired                   // renewals failed until the lease ran out
	numLossReasons
)

var lossReasonNames = [numLossReasons]string{"not_held", "expired"}

// Bucket boundaries in seconds. Acquire and wait durations span a few
// milliseconds (uncontended, on Datastore) to minutes (a long wait for a busy
// lock); backend round trips, a millisecond to several seconds.
var (
	waitBuckets    = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}
	backendBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}
)

// telemetry holds a Client's instruments and tracer, created once in New, and
// the attribute sets of every combination of kind and outcome, built once so
// that recording a measurement allocates nothing.
type telemetry struct {
	tracer  trace.Tracer // nil: the no-op TracerProvider, no spans
	metrics bool         // false: the no-op MeterProvider, nothing is measured

	// The OpenTelemetry global providers as they are before the program
	// installs any, when the client uses them: while they are still the
	// global ones, nothing listens, and the client neither reads clocks
	// nor builds spans for them. Nil when the client uses other providers.
	idleMP metric.MeterProvider
	idleTP trace.TracerProvider

	acquireDuration metric.Float64Histogram
	waitDuration    metric.Float64Histogram
	polls           metric.Int64Counter
	renewals        metric.Int64Counter
	takeovers       metric.Int64Counter
	lost            metric.Int64Counter
	releases        metric.Int64Counter
	held            metric.Int64UpDownCounter
	backendCalls    metric.Int64Counter
	backendDuration metric.Float64Histogram

	kindOnly  [2]attrs
	byOutcome [2][numOutcomes]attrs
	byResult  [2][numResults]attrs
	byReason  [2][numLossReasons]attrs
	byRenewal [2][2]attrs // [kind][0: ok, 1: failed]
	byOp      [2][numOperations][numResults]attrs
}

// attrs is one attribute set as ready-made option slices: passing an
// existing slice to a variadic Add or Record allocates nothing, where
// building the options on each call would.
type attrs struct {
	add []metric.AddOption
	rec []metric.RecordOption
}

func newAttrs(kvs ...attribute.KeyValue) attrs {
	o := metric.WithAttributeSet(attribute.NewSet(kvs...))
	return attrs{add: []metric.AddOption{o}, rec: []metric.RecordOption{o}}
}

func newTelemetry(mp metric.MeterProvider, tp trace.TracerProvider) (*telemetry, error) {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	m := mp.Meter(scope)
	t := &telemetry{tracer: tp.Tracer(scope), metrics: true}
	if _, ok := mp.(metricnoop.MeterProvider); ok {
		t.metrics = false // no clock readings for instruments that record nothing
	}
	if _, ok := tp.(tracenoop.TracerProvider); ok {
		t.tracer = nil // no spans: saves putting a no-op span in each context
	}
	if mp == idleMeterProvider {
		t.idleMP = mp
	}
	if tp == idleTracerProvider {
		t.idleTP = tp
	}
	var errs []error
	check := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	var err error
	t.acquireDuration, err = m.Float64Histogram("taskguard.lock.acquire.duration",
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(waitBuckets...),
		metric.WithDescription("Duration of Acquire calls (also those made by With), from the call until the lock is held or the call fails, by outcome."))
	check(err)
	t.waitDuration, err = m.Float64Histogram("taskguard.lock.wait.duration",
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(waitBuckets...),
		metric.WithDescription("Time Acquire calls spent waiting for a lock held by another owner (queued behind a local holder or pausing between polls), recorded only for calls that waited, by outcome."))
	check(err)
	t.polls, err = m.Int64Counter("taskguard.lock.polls",
		metric.WithUnit("{poll}"),
		metric.WithDescription("Tries to take a lock from the backend (Backend.Acquire calls made by Acquire), by result: acquired, busy or error."))
	check(err)
	t.renewals, err = m.Int64Counter("taskguard.lock.renewals",
		metric.WithUnit("{renewal}"),
		metric.WithDescription("Background lease renewals, by outcome: ok or failed."))
	check(err)
	t.takeovers, err = m.Int64Counter("taskguard.lock.takeovers",
		metric.WithUnit("{lock}"),
		metric.WithDescription("Acquisitions that replaced a previous holder whose lease had expired or who was stolen from."))
	check(err)
	t.lost, err = m.Int64Counter("taskguard.lock.lost",
		metric.WithUnit("{lock}"),
		metric.WithDescription("Locks lost before their holder released them, by reason: not_held (taken over or removed) or expired (renewals failed until the lease ran out)."))
	check(err)
	t.releases, err = m.Int64Counter("taskguard.lock.releases",
		metric.WithUnit("{release}"),
		metric.WithDescription("Releases (Lock.Release, and releases on the holder's behalf when its context ended), by outcome: ok, not_held or error."))
	check(err)
	t.held, err = m.Int64UpDownCounter("taskguard.lock.held",
		metric.WithUnit("{lock}"),
		metric.WithDescription("Locks this process holds now."))
	check(err)
	t.backendCalls, err = m.Int64Counter("taskguard.lock.backend.calls",
		metric.WithUnit("{call}"),
		metric.WithDescription("Round trips to the lock backend (every Backend call), by operation and outcome: ok, not_held or error."))
	check(err)
	t.backendDuration, err = m.Float64Histogram("taskguard.lock.backend.duration",
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(backendBuckets...),
		metric.WithDescription("Duration of Backend calls, by operation and outcome."))
	check(err)
	if err := errors.Join(errs...); err != nil {
		return nil, invalid("Config.MeterProvider: %v", err)
	}

	for k := range LockKind(2) {
		kind := attrKind.String(k.String())
		t.kindOnly[k] = newAttrs(kind)
		for o := range numOutcomes {
			t.byOutcome[k][o] = newAttrs(kind, attrOutcome.String(outcomeNames[o]))
		}
		for r := range numResults {
			t.byResult[k][r] = newAttrs(kind, attrOutcome.String(resultNames[r]))
			for op := range numOperations {
				t.byOp[k][op][r] = newAttrs(kind, attrOperation.String(operationNames[op]), attrOutcome.String(resultNames[r]))
			}
		}
		t.byRenewal[k][0] = newAttrs(kind, attrOutcome.String("ok"))
		t.byRenewal[k][1] = newAttrs(kind, attrOutcome.String("failed"))
		for r := range numLossReasons {
			t.byReason[k][r] = newAttrs(kind, attrReason.String(lossReasonNames[r]))
		}
	}
	return t, nil
}

// idleMeterProvider and idleTracerProvider are the OpenTelemetry global
// providers as they were when this package was initialized, if they were
// then the delegating defaults of package otel, which record nothing until
// the program installs providers of its own (otel.SetMeterProvider and
// otel.SetTracerProvider); nil otherwise.
var (
	idleMeterProvider  = idleGlobal(otel.GetMeterProvider(), "*global.meterProvider")
	idleTracerProvider = idleGlobal(otel.GetTracerProvider(), "*global.tracerProvider")
)

// idleGlobal returns p if its type is the delegating default of package
// otel, named typ, and nil otherwise.
func idleGlobal[P any](p P, typ string) P {
	if fmt.Sprintf("%T", p) == typ {
		return p
	}
	var zero P
	return zero
}

// measuring reports whether measurements are recorded: the MeterProvider
// is not the no-op one, nor the global one before the program installed
// its own.
func (t *telemetry) measuring() bool {
	if !t.metrics {
		return false
	}
	if t.idleMP == nil {
		return true
	}
	switch p := otel.GetMeterProvider(); p.(type) {
	case metricnoop.MeterProvider:
		return false
	default:
		return p != t.idleMP
	}
}

// tracing returns the tracer, or nil when spans are not recorded: the
// TracerProvider is the no-op one, or the global one before the program
// installed its own.
func (t *telemetry) tracing() trace.Tracer {
	if t.tracer == nil || t.idleTP == nil {
		return t.tracer
	}
	switch p := otel.GetTracerProvider(); p.(type) {
	case tracenoop.TracerProvider:
		return nil
	default:
		if p == t.idleTP {
			return nil
		}
	}
	return t.tracer
}

// noSpan stands for the spans of a client whose TracerProvider is the no-op
// one: ending it ends nothing.
var noSpan trace.Span = tracenoop.Span{}

// acquireStats is what one Acquire call observed.
type acquireStats struct {
	outcome  outcome
	polls    int
	waited   time.Duration // queued locally or pausing between polls
	token    uint64
	tookOver bool
}

// startAcquire starts the span of an Acquire call, a child of the span in
// ctx.
func (t *telemetry) startAcquire(ctx context.Context, id string, o *options) (context.Context, trace.Span) {
	tr := t.tracing()
	if tr == nil {
		return ctx, noSpan
	}
	ctx, span := tr.Start(ctx, "taskguard.lock.acquire")
	if span.IsRecording() { // no attribute slices for a no-op tracer
		span.SetAttributes(attrID.String(id), attrKind.String(o.kind.String()))
	}
	return ctx, span
}

// endAcquire records an Acquire call that started at start and ends its span.
func (t *telemetry) endAcquire(ctx context.Context, span trace.Span, kind LockKind, start time.Time, st *acquireStats, err error) {
	if start.IsZero() { // not measured
		t.endSpan(span, st, err)
		return
	}
	t.acquireDuration.Record(ctx, time.Since(start).Seconds(), t.byOutcome[kind][st.outcome].rec...)
	if st.waited > 0 {
		t.waitDuration.Record(ctx, st.waited.Seconds(), t.byOutcome[kind][st.outcome].rec...)
	}
	if st.outcome == outcomeAcquired {
		t.held.Add(ctx, 1, t.kindOnly[kind].add...)
		if st.tookOver {
			t.takeovers.Add(ctx, 1, t.kindOnly[kind].add...)
		}
	}
	t.endSpan(span, st, err)
}

// endSpan ends the span of an Acquire call.
func (t *telemetry) endSpan(span trace.Span, st *acquireStats, err error) {
	if !span.IsRecording() {
		span.End()
		return
	}
	span.SetAttributes(attrOutcome.String(outcomeNames[st.outcome]), attrPolls.Int(st.polls))
	if st.outcome == outcomeAcquired {
		span.SetAttributes(attrToken.Int64(int64(st.token)), attrTookOver.Bool(st.tookOver))
	}
	if st.outcome == outcomeError {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// poll records one Backend.Acquire call made by Acquire.
func (t *telemetry) poll(ctx context.Context, kind LockKind, g Grant, err error) {
	o := outcomeBusy
	switch {
	case err != nil:
		o = outcomeError
	case g.Acquired:
		o = outcomeAcquired
	}
	t.polls.Add(ctx, 1, t.byOutcome[kind][o].add...)
}

// startHold starts the span of With's function, a child of the span in ctx.
func (t *telemetry) startHold(ctx context.Context, l *Lock) (context.Context, trace.Span) {
	tr := t.tracing()
	if tr == nil {
		return ctx, noSpan
	}
	ctx, span := tr.Start(ctx, "taskguard.lock.hold")
	if span.IsRecording() {
		span.SetAttributes(attrID.String(l.req.ID), attrKind.String(l.kind.String()), attrToken.Int64(int64(l.token)))
	}
	return ctx, span
}

// endHold ends the span of With's function, which returned err (or
// panicked), while lost is the lock's loss error if it was lost.
func (t *telemetry) endHold(span trace.Span, err, lost error, panicked bool) {
	if span.IsRecording() {
		switch {
		case lost != nil:
			span.RecordError(lost)
			span.SetStatus(codes.Error, lost.Error())
		case panicked:
			span.SetStatus(codes.Error, "panic")
		case err != nil:
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
		}
	}
	span.End()
}

// startRelease starts the span of a Lock.Release call.
func (t *telemetry) startRelease(ctx context.Context, l *Lock) (context.Context, trace.Span) {
	tr := t.tracing()
	if tr == nil {
		return ctx, noSpan
	}
	ctx, span := tr.Start(ctx, "taskguard.lock.release")
	if span.IsRecording() {
		span.SetAttributes(attrID.String(l.req.ID), attrKind.String(l.kind.String()), attrToken.Int64(int64(l.token)))
	}
	return ctx, span
}

// release records a release that ended with err, if the lock is measured,
// and ends span if it is not nil.
func (t *telemetry) release(ctx context.Context, span trace.Span, kind LockKind, err error, measured bool) {
	if measured {
		t.releases.Add(ctx, 1, t.byResult[kind][resultOf(err)].add...)
	}
	if span == nil {
		return
	}
	if span.IsRecording() {
		r := resultOf(err)
		span.SetAttributes(attrOutcome.String(resultNames[r]))
		if r != resultOK {
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
		}
	}
	span.End()
}

// renewal records a background renewal that ended with err.
func (t *telemetry) renewal(ctx context.Context, kind LockKind, err error) {
	i := 0
	if err != nil {
		i = 1
	}
	t.renewals.Add(ctx, 1, t.byRenewal[kind][i].add...)
}

// ended records that a lock stopped being held, lost for reason if lost.
func (t *telemetry) ended(kind LockKind, lost bool, reason lossReason) {
	ctx := context.Background()
	t.held.Add(ctx, -1, t.kindOnly[kind].add...)
	if lost {
		t.lost.Add(ctx, 1, t.byReason[kind][reason].add...)
	}
}

// meteredBackend counts and times every call to the backend of one kind.
type meteredBackend struct {
	b    Backend
	t    *telemetry
	kind LockKind
}

func (m *meteredBackend) record(ctx context.Context, op operation, start time.Time, err error) {
	a := &m.t.byOp[m.kind][op][resultOf(err)]
	m.t.backendCalls.Add(ctx, 1, a.add...)
	m.t.backendDuration.Record(ctx, time.Since(start).Seconds(), a.rec...)
}

// Unwrap returns the backend it counts the calls of.
func (m *meteredBackend) Unwrap() Backend { return m.b }

func (m *meteredBackend) Acquire(ctx context.Context, r Request) (Grant, error) {
	start := time.Now()
	g, err := m.b.Acquire(ctx, r)
	m.record(ctx, opAcquire, start, err)
	return g, err
}

func (m *meteredBackend) Renew(ctx context.Context, r Request) (Grant, error) {
	start := time.Now()
	g, err := m.b.Renew(ctx, r)
	m.record(ctx, opRenew, start, err)
	return g, err
}

func (m *meteredBackend) Release(ctx context.Context, id, owner string) error {
	start := time.Now()
	err := m.b.Release(ctx, id, owner)
	m.record(ctx, opRelease, start, err)
	return err
}
