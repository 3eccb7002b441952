package locking_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

// broken is a backend whose every call fails.
type broken struct{}

func (broken) Acquire(context.Context, locking.Request) (locking.Grant, error) {
	return locking.Grant{}, errUnavailable
}
func (broken) Renew(context.Context, locking.Request) (locking.Grant, error) {
	return locking.Grant{}, errUnavailable
}
func (broken) Release(context.Context, string, string) error { return errUnavailable }

// observed is a client recording into in-memory OpenTelemetry readers, and a
// second, uninstrumented client ("another instance") sharing its Strong store.
type observed struct {
	c, other *locking.Client
	store    *counting // c's Strong backend; c's Weak backend is broken
	reader   *sdkmetric.ManualReader
	spans    *tracetest.SpanRecorder
	tp       *sdktrace.TracerProvider
}

func newObserved(t *testing.T) *observed {
	t.Helper()
	o := &observed{
		store:  &counting{Backend: memlock.New()},
		reader: sdkmetric.NewManualReader(),
		spans:  tracetest.NewSpanRecorder(),
	}
	o.tp = sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(o.spans))
	quiet := slog.New(slog.DiscardHandler)
	var err error
	o.c, err = locking.New(locking.Config{
		Strong: o.store, Weak: broken{},
		// A fixed pause between polls makes their number exact.
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 10 * time.Millisecond,
		Logger:         quiet,
		MeterProvider:  sdkmetric.NewMeterProvider(sdkmetric.WithReader(o.reader)),
		TracerProvider: o.tp,
	})
	if err != nil {
		t.Fatal(err)
	}
	o.other, err = locking.New(locking.Config{
		Strong: o.store.Backend, Logger: quiet,
		MeterProvider: metricnoop.NewMeterProvider(), TracerProvider: tracenoop.NewTracerProvider(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// metrics collects the reader's metrics as "name{attr=value,…}" → value;
// histograms as two entries, "… count" and "… sum". Attribute keys lose their
// "taskguard.lock." prefix.
func metrics(t *testing.T, r *sdkmetric.ManualReader) map[string]float64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	key := func(name string, set attribute.Set) string {
		var kvs []string
		for _, kv := range set.ToSlice() {
			kvs = append(kvs, strings.TrimPrefix(string(kv.Key), "taskguard.lock.")+"="+kv.Value.String())
		}
		return name + "{" + strings.Join(kvs, ",") + "}"
	}
	out := make(map[string]float64)
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					out[key(m.Name, p.Attributes)] = float64(p.Value)
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					k := key(m.Name, p.Attributes)
					out[k+" count"] = float64(p.Count)
					out[k+" sum"] = p.Sum
				}
			default:
				t.Errorf("metric %s: unexpected data %T", m.Name, m.Data)
			}
		}
	}
	return out
}

// TestTelemetryMetrics drives a contended lock through every outcome on a
// fake clock and checks every data point the client records.
func TestTelemetryMetrics(t *testing.T) {
	const (
		acq      = "taskguard.lock.acquire.duration{kind=strong,outcome=acquired}"
		polls    = "taskguard.lock.polls{kind=strong,outcome="
		bAcquire = "taskguard.lock.backend.calls{kind=strong,operation=acquire,outcome=ok}"
		bDur     = "taskguard.lock.backend.duration{kind=strong,operation=acquire,outcome=ok}"
		bRelease = "taskguard.lock.backend.calls{kind=strong,operation=release,outcome=ok}"
		bRelDur  = "taskguard.lock.backend.duration{kind=strong,operation=release,outcome=ok}"
		held     = "taskguard.lock.held{kind=strong}"
	)
	tests := []struct {
		name string
		run  func(t *testing.T, o *observed, held *locking.Lock) error
		want map[string]float64
	}{{
		name: "busy",
		run: func(t *testing.T, o *observed, held *locking.Lock) error {
			_, err := o.c.Acquire(t.Context(), "job", locking.Wait(false))
			return wantErr(err, locking.ErrNotAcquired)
		},
		want: map[string]float64{
			"taskguard.lock.acquire.duration{kind=strong,outcome=busy} count": 1,
			"taskguard.lock.acquire.duration{kind=strong,outcome=busy} sum":   0,
			polls + "busy}": 1,
			bAcquire:        1, bDur + " count": 1, bDur + " sum": 0,
		},
	}, {
		name: "timeout",
		run: func(t *testing.T, o *observed, held *locking.Lock) error {
			// Polls at 0, 10, 20, 30 and 35 ms.
			_, err := o.c.Acquire(t.Context(), "job", locking.MaxWait(35*time.Millisecond))
			return wantErr(err, locking.ErrNotAcquired)
		},
		want: map[string]float64{
			"taskguard.lock.acquire.duration{kind=strong,outcome=timeout} count": 1,
			"taskguard.lock.acquire.duration{kind=strong,outcome=timeout} sum":   0.035,
			"taskguard.lock.wait.duration{kind=strong,outcome=timeout} count":    1,
			"taskguard.lock.wait.duration{kind=strong,outcome=timeout} sum":      0.035,
			polls + "busy}": 5,
			bAcquire:        5, bDur + " count": 5, bDur + " sum": 0,
		},
	}, {
		name: "canceled",
		run: func(t *testing.T, o *observed, held *locking.Lock) error {
			// Polls at 0, 10 and 20 ms; the pause after the third ends at 25.
			ctx, cancel := context.WithTimeout(t.Context(), 25*time.Millisecond)
			defer cancel()
			_, err := o.c.Acquire(ctx, "job")
			return wantErr(err, context.DeadlineExceeded)
		},
		want: map[string]float64{
			"taskguard.lock.acquire.duration{kind=strong,outcome=canceled} count": 1,
			"taskguard.lock.acquire.duration{kind=strong,outcome=canceled} sum":   0.025,
			"taskguard.lock.wait.duration{kind=strong,outcome=canceled} count":    1,
			"taskguard.lock.wait.duration{kind=strong,outcome=canceled} sum":      0.025,
			polls + "busy}": 3,
			bAcquire:        3, bDur + " count": 3, bDur + " sum": 0,
		},
	}, {
		name: "backend error",
		run: func(t *testing.T, o *observed, held *locking.Lock) error {
			_, err := o.c.Acquire(t.Context(), "job", locking.Kind(locking.Weak))
			return wantErr(err, errUnavailable)
		},
		want: map[string]float64{
			"taskguard.lock.acquire.duration{kind=weak,outcome=error} count":                   1,
			"taskguard.lock.acquire.duration{kind=weak,outcome=error} sum":                     0,
			"taskguard.lock.polls{kind=weak,outcome=error}":                                    1,
			"taskguard.lock.backend.calls{kind=weak,operation=acquire,outcome=error}":          1,
			"taskguard.lock.backend.duration{kind=weak,operation=acquire,outcome=error} count": 1,
			"taskguard.lock.backend.duration{kind=weak,operation=acquire,outcome=error} sum":   0,
			// The failed acquire may have applied: its owner is released.
			"taskguard.lock.backend.calls{kind=weak,operation=release,outcome=error}":          1,
			"taskguard.lock.backend.duration{kind=weak,operation=release,outcome=error} count": 1,
			"taskguard.lock.backend.duration{kind=weak,operation=release,outcome=error} sum":   0,
		},
	}, {
		name: "waited, held and renewed",
		run: func(t *testing.T, o *observed, held *locking.Lock) error {
			// The other holder releases at 45 ms; polls at 0, 10, …, 40 find
			// the lock busy, the one at 50 takes it. The body runs 25 ms of a
			// 30 ms lease: renewals at 60 and 70 ms.
			go func() {
				time.Sleep(45 * time.Millisecond)
				_ = held.Release(context.Background())
			}()
			return o.c.With(t.Context(), "job", func(context.Context) error {
				time.Sleep(25 * time.Millisecond)
				return nil
			}, locking.Lease(30*time.Millisecond))
		},
		want: map[string]float64{
			acq + " count": 1, acq + " sum": 0.05,
			"taskguard.lock.wait.duration{kind=strong,outcome=acquired} count": 1,
			"taskguard.lock.wait.duration{kind=strong,outcome=acquired} sum":   0.05,
			polls + "busy}":     5,
			polls + "acquired}": 1,
			"taskguard.lock.renewals{kind=strong,outcome=ok}": 2,
			"taskguard.lock.releases{kind=strong,outcome=ok}": 1,
			held:     0,
			bAcquire: 6, bDur + " count": 6, bDur + " sum": 0,
			"taskguard.lock.backend.calls{kind=strong,operation=renew,outcome=ok}":          2,
			"taskguard.lock.backend.duration{kind=strong,operation=renew,outcome=ok} count": 2,
			"taskguard.lock.backend.duration{kind=strong,operation=renew,outcome=ok} sum":   0,
			bRelease: 1, bRelDur + " count": 1, bRelDur + " sum": 0,
		},
	}, {
		name: "takeover",
		run: func(t *testing.T, o *observed, held *locking.Lock) error {
			time.Sleep(5 * time.Millisecond)
			l, err := o.c.Acquire(t.Context(), "job", locking.StealAfter(time.Millisecond))
			if err != nil {
				return err
			}
			return l.Release(t.Context())
		},
		want: map[string]float64{
			acq + " count": 1, acq + " sum": 0,
			polls + "acquired}":                               1,
			"taskguard.lock.takeovers{kind=strong}":           1,
			"taskguard.lock.releases{kind=strong,outcome=ok}": 1,
			held:     0,
			bAcquire: 1, bDur + " count": 1, bDur + " sum": 0,
			bRelease: 1, bRelDur + " count": 1, bRelDur + " sum": 0,
		},
	}, {
		name: "lost to a thief",
		run: func(t *testing.T, o *observed, held *locking.Lock) error {
			l, err := o.c.Acquire(t.Context(), "mine", locking.Lease(30*time.Millisecond))
			if err != nil {
				return err
			}
			time.Sleep(5 * time.Millisecond)
			stolen, err := o.other.Acquire(t.Context(), "mine", locking.StealAfter(time.Millisecond))
			if err != nil {
				return err
			}
			defer stolen.Release(context.WithoutCancel(t.Context()))
			<-l.Done() // the renewal at 10 ms finds the lock taken
			return wantErr(l.Release(t.Context()), locking.ErrLockLost)
		},
		want: map[string]float64{
			acq + " count": 1, acq + " sum": 0,
			polls + "acquired}": 1,
			"taskguard.lock.renewals{kind=strong,outcome=failed}":   1,
			"taskguard.lock.lost{kind=strong,reason=not_held}":      1,
			"taskguard.lock.releases{kind=strong,outcome=not_held}": 1,
			held:     0,
			bAcquire: 1, bDur + " count": 1, bDur + " sum": 0,
			"taskguard.lock.backend.calls{kind=strong,operation=renew,outcome=not_held}":          1,
			"taskguard.lock.backend.duration{kind=strong,operation=renew,outcome=not_held} count": 1,
			"taskguard.lock.backend.duration{kind=strong,operation=renew,outcome=not_held} sum":   0,
		},
	}, {
		name: "lost to failing renewals",
		run: func(t *testing.T, o *observed, held *locking.Lock) error {
			// Renewals at 10 and 20 ms fail; at 27 ms (lease less a tenth)
			// the lock is declared lost.
			l, err := o.c.Acquire(t.Context(), "mine", locking.Lease(30*time.Millisecond))
			if err != nil {
				return err
			}
			o.store.failRenew.Store(true)
			<-l.Done()
			return wantErr(l.Release(t.Context()), locking.ErrLockLost)
		},
		want: map[string]float64{
			acq + " count": 1, acq + " sum": 0,
			polls + "acquired}": 1,
			"taskguard.lock.renewals{kind=strong,outcome=failed}":   2,
			"taskguard.lock.lost{kind=strong,reason=expired}":       1,
			"taskguard.lock.releases{kind=strong,outcome=not_held}": 1,
			held:     0,
			bAcquire: 1, bDur + " count": 1, bDur + " sum": 0,
			"taskguard.lock.backend.calls{kind=strong,operation=renew,outcome=error}":          2,
			"taskguard.lock.backend.duration{kind=strong,operation=renew,outcome=error} count": 2,
			"taskguard.lock.backend.duration{kind=strong,operation=renew,outcome=error} sum":   0,
			// The holding the store may still keep is given back.
			"taskguard.lock.backend.calls{kind=strong,operation=release,outcome=ok}":          1,
			"taskguard.lock.backend.duration{kind=strong,operation=release,outcome=ok} count": 1,
			"taskguard.lock.backend.duration{kind=strong,operation=release,outcome=ok} sum":   0,
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				o := newObserved(t)
				// Another instance holds "job" for a minute.
				held, err := o.other.Acquire(t.Context(), "job", locking.Lease(time.Minute))
				if err != nil {
					t.Fatal(err)
				}
				if err := tt.run(t, o, held); err != nil {
					t.Fatal(err)
				}
				_ = held.Release(t.Context()) // fails when released or taken over in run
				got := metrics(t, o.reader)
				for _, k := range slices.Sorted(maps.Keys(got)) {
					if w, ok := tt.want[k]; !ok || math.Abs(got[k]-w) > 1e-9 {
						t.Errorf("%s = %v; want %v (present: %v)", k, got[k], w, ok)
					}
				}
				for _, k := range slices.Sorted(maps.Keys(tt.want)) {
					if _, ok := got[k]; !ok {
						t.Errorf("%s missing; want %v", k, tt.want[k])
					}
				}
			})
		})
	}
}

func wantErr(err, target error) error {
	if !errors.Is(err, target) {
		return fmt.Errorf("err = %v; want %v", err, target)
	}
	return nil
}

// TestTelemetrySpans checks the spans of a contended With, of a failed
// Acquire and of a With whose lock is lost: children of the caller's span,
// with the function's own spans under the hold span.
func TestTelemetrySpans(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		o := newObserved(t)
		test := o.tp.Tracer("test")
		ctx, root := test.Start(t.Context(), "request")

		held, err := o.other.Acquire(ctx, "job", locking.Lease(time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			time.Sleep(45 * time.Millisecond)
			_ = held.Release(context.Background())
		}()
		var token uint64
		err = o.c.With(ctx, "job", func(ctx context.Context) error {
			token = locking.FromContext(ctx).Token()
			_, work := test.Start(ctx, "work")
			time.Sleep(25 * time.Millisecond)
			work.End()
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := o.c.Acquire(ctx, "job", locking.Kind(locking.Weak)); !errors.Is(err, errUnavailable) {
			t.Fatalf("weak Acquire: %v; want %v", err, errUnavailable)
		}
		var mine uint64
		err = o.c.With(ctx, "mine", func(ctx context.Context) error {
			mine = locking.FromContext(ctx).Token()
			time.Sleep(5 * time.Millisecond)
			stolen, err := o.other.Acquire(ctx, "mine", locking.StealAfter(time.Millisecond))
			if err != nil {
				return err
			}
			defer stolen.Release(context.WithoutCancel(ctx))
			<-ctx.Done() // at the renewal at 10 ms
			return nil
		}, locking.Lease(30*time.Millisecond))
		if !errors.Is(err, locking.ErrLockLost) {
			t.Fatalf("With of a stolen lock: %v; want ErrLockLost", err)
		}
		root.End()

		type span struct {
			name, parent string
			dur          time.Duration
			attrs        string
			status       codes.Code
		}
		names := map[trace.SpanID]string{root.SpanContext().SpanID(): "request"}
		for _, s := range o.spans.Ended() {
			names[s.SpanContext().SpanID()] = s.Name()
		}
		var got []span
		for _, s := range o.spans.Ended() {
			if s.SpanContext().TraceID() != root.SpanContext().TraceID() {
				t.Errorf("span %s is in trace %s; want the request's, %s", s.Name(), s.SpanContext().TraceID(), root.SpanContext().TraceID())
			}
			var kvs []string
			for _, kv := range s.Attributes() {
				kvs = append(kvs, strings.TrimPrefix(string(kv.Key), "taskguard.lock.")+"="+kv.Value.String())
			}
			got = append(got, span{s.Name(), names[s.Parent().SpanID()], s.EndTime().Sub(s.StartTime()), strings.Join(kvs, " "), s.Status().Code})
		}
		tok, mineTok := fmt.Sprint(token), fmt.Sprint(mine)
		want := []span{
			{"taskguard.lock.acquire", "request", 50 * time.Millisecond, "id=job kind=strong outcome=acquired polls=6 token=" + tok + " took_over=false", codes.Unset},
			{"work", "taskguard.lock.hold", 25 * time.Millisecond, "", codes.Unset},
			{"taskguard.lock.hold", "request", 25 * time.Millisecond, "id=job kind=strong token=" + tok, codes.Unset},
			{"taskguard.lock.release", "request", 0, "id=job kind=strong token=" + tok + " outcome=ok", codes.Unset},
			{"taskguard.lock.acquire", "request", 0, "id=job kind=weak outcome=error polls=1", codes.Error},
			{"taskguard.lock.acquire", "request", 0, "id=mine kind=strong outcome=acquired polls=1 token=" + mineTok + " took_over=false", codes.Unset},
			{"taskguard.lock.hold", "request", 10 * time.Millisecond, "id=mine kind=strong token=" + mineTok, codes.Error},
			{"taskguard.lock.release", "request", 0, "id=mine kind=strong token=" + mineTok + " outcome=not_held", codes.Error},
			{"request", "", 85 * time.Millisecond, "", codes.Unset},
		}
		if !slices.Equal(got, want) {
			t.Errorf("spans:\n%s\nwant:\n%s", fmtSpans(got), fmtSpans(want))
		}
	})
}

func fmtSpans[S any](spans []S) string {
	var b strings.Builder
	for _, s := range spans {
		fmt.Fprintf(&b, "\t%+v\n", s)
	}
	return b.String()
}

// TestTelemetryGlobalProviders checks that a client configured without
// providers records into the OpenTelemetry global ones, even when the
// program installs them after New.
func TestTelemetryGlobalProviders(t *testing.T) {
	c := newClient(t, memlock.New(), locking.Config{})
	reader := sdkmetric.NewManualReader()
	spans := tracetest.NewSpanRecorder()
	otel.SetMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)))
	otel.SetTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans)))
	t.Cleanup(func() {
		otel.SetMeterProvider(metricnoop.NewMeterProvider())
		otel.SetTracerProvider(tracenoop.NewTracerProvider())
	})
	if err := c.With(t.Context(), "job", func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	got := metrics(t, reader)
	for _, k := range []string{
		"taskguard.lock.acquire.duration{kind=strong,outcome=acquired} count",
		"taskguard.lock.releases{kind=strong,outcome=ok}",
	} {
		if got[k] != 1 {
			t.Errorf("%s = %v; want 1 (all: %v)", k, got[k], got)
		}
	}
	var names []string
	for _, s := range spans.Ended() {
		names = append(names, s.Name())
	}
	if want := []string{"taskguard.lock.acquire", "taskguard.lock.hold", "taskguard.lock.release"}; !slices.Equal(names, want) {
		t.Errorf("spans %q; want %q", names, want)
	}
}

// BenchmarkWithTelemetry measures an uncontended With on the in-memory
// backend with the no-op providers (the default) and with SDK providers.
func BenchmarkWithTelemetry(b *testing.B) {
	sdkTP := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(tracetest.NewSpanRecorder()))
	for _, bc := range []struct {
		name string
		cfg  locking.Config
	}{
		{"noop", locking.Config{MeterProvider: metricnoop.NewMeterProvider(), TracerProvider: tracenoop.NewTracerProvider()}},
		{"sdk-metrics", locking.Config{MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader())), TracerProvider: tracenoop.NewTracerProvider()}},
		{"sdk-metrics-and-traces", locking.Config{MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader())), TracerProvider: sdkTP}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			bc.cfg.Strong = memlock.New()
			bc.cfg.Logger = slog.New(slog.DiscardHandler)
			c, err := locking.New(bc.cfg)
			if err != nil {
				b.Fatal(err)
			}
			fn := func(context.Context) error { return nil }
			b.ReportAllocs()
			for b.Loop() {
				if err := c.With(b.Context(), "job", fn); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
