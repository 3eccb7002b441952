package tasks_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
)

// logBuffer collects log output; safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func newLocker(t *testing.T, b locking.Backend, lease time.Duration) *locking.Client {
	t.Helper()
	c, err := locking.New(locking.Config{Strong: b, Lease: lease, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newWorker(t *testing.T, locker *locking.Client, logs *logBuffer, opts ...tasks.WorkerOption) *tasks.Worker {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	w, err := tasks.NewWorker(locker, append([]tasks.WorkerOption{tasks.WithLogger(logger)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func envelopeBody(job, lockID string, payload any) string {
	env := map[string]any{"v": 1, "job": job, "lockId": lockID, "enqueuedAt": time.Now().UTC()}
	if payload != nil {
		env["payload"] = payload
	}
	b, _ := json.Marshal(env)
	return string(b)
}

// delivery makes a request as Cloud Tasks sends it.
func delivery(body string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/Worker", strings.NewReader(body))
	r.Header.Set("X-CloudTasks-QueueName", "jobs")
	r.Header.Set("X-CloudTasks-TaskName", "t1")
	r.Header.Set("X-CloudTasks-TaskRetryCount", "0")
	r.Header.Set("X-CloudTasks-TaskExecutionCount", "0")
	r.Header.Set("X-CloudTasks-TaskETA", fmt.Sprintf("%d.250000", time.Now().Unix()))
	return r
}

// assertFree fails unless lock id can be taken at once (nothing left held).
func assertFree(t *testing.T, locker *locking.Client, id string) {
	t.Helper()
	l, err := locker.Acquire(t.Context(), id, locking.Wait(false))
	if err != nil {
		t.Fatalf("lock %q left held: %v", id, err)
	}
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
}

func TestWorkerAnswers(t *testing.T) {
	locker := newLocker(t, memlock.New(), 0)
	logs := &logBuffer{}
	w := newWorker(t, locker, logs, tasks.WithQueue(queueName), tasks.WithMaxBodyBytes(4096))
	var calls atomic.Int32
	w.Handle("ok", func(ctx context.Context, d *tasks.Delivery) error { calls.Add(1); return nil })
	w.Handle("fail", func(ctx context.Context, d *tasks.Delivery) error { calls.Add(1); return errors.New("boom") })
	w.Handle("permanent", func(ctx context.Context, d *tasks.Delivery) error {
		calls.Add(1)
		return fmt.Errorf("wrapped: %w", tasks.Permanent(errors.New("bad input")))
	})
	w.Handle("panic", func(ctx context.Context, d *tasks.Delivery) error { calls.Add(1); panic("kaboom") })
	w.Handle("inner-busy", func(ctx context.Context, d *tasks.Delivery) error {
		calls.Add(1)
		return &locking.NotAcquiredError{ID: "inner", Remaining: 2500 * time.Millisecond}
	})

	tests := []struct {
		name      string
		req       func() *http.Request
		want      int
		wantCalls int32
		logLevel  string // a record at this level must be logged
	}{
		{"success", func() *http.Request { return delivery(envelopeBody("ok", "a", nil)) }, 204, 1, ""},
		{"job error", func() *http.Request { return delivery(envelopeBody("fail", "a", nil)) }, 500, 1, "ERROR"},
		{"permanent", func() *http.Request { return delivery(envelopeBody("permanent", "a", nil)) }, 200, 1, "ERROR"},
		{"panic", func() *http.Request { return delivery(envelopeBody("panic", "a", nil)) }, 500, 1, "ERROR"},
		{"inner lock busy", func() *http.Request { return delivery(envelopeBody("inner-busy", "a", nil)) }, 429, 1, "INFO"},
		{"unknown job, enqueued long ago", func() *http.Request {
			return delivery(`{"v":1,"job":"nope","lockId":"a","enqueuedAt":"2026-01-01T00:00:00Z"}`)
		}, 200, 0, "ERROR"},
		// A deploy adding the job may be rolling out: retried, not dropped.
		{"unknown job, enqueued now", func() *http.Request { return delivery(envelopeBody("nope", "a", nil)) }, 503, 0, "WARN"},
		{"not JSON", func() *http.Request { return delivery("hello") }, 200, 0, "ERROR"},
		{"unknown field", func() *http.Request {
			return delivery(`{"v":1,"job":"ok","lockId":"a","enqueuedAt":"2026-01-01T00:00:00Z","extra":1}`)
		}, 200, 0, "ERROR"},
		{"trailing data", func() *http.Request { return delivery(envelopeBody("ok", "a", nil) + "{}") }, 200, 0, "ERROR"},
		{"no lock id", func() *http.Request { return delivery(envelopeBody("ok", "", nil)) }, 200, 0, "ERROR"},
		{"version 0", func() *http.Request { return delivery(`{"job":"ok","lockId":"a"}`) }, 200, 0, "ERROR"},
		{"newer version", func() *http.Request { return delivery(`{"v":5,"job":"ok","lockId":"a","more":true}`) }, 503, 0, "ERROR"},
		{"oversized", func() *http.Request { return delivery(envelopeBody("ok", "a", strings.Repeat("x", 5000))) }, 200, 0, "ERROR"},
		{"GET", func() *http.Request {
			r := delivery("")
			r.Method = http.MethodGet
			return r
		}, 200, 0, "ERROR"},
		{"no headers", func() *http.Request {
			return httptest.NewRequest(http.MethodPost, "/Worker", strings.NewReader(envelopeBody("ok", "a", nil)))
		}, 403, 0, "WARN"},
		{"no queue header", func() *http.Request {
			r := delivery(envelopeBody("ok", "a", nil))
			r.Header.Del("X-CloudTasks-QueueName")
			return r
		}, 403, 0, "WARN"},
		{"other queue", func() *http.Request {
			r := delivery(envelopeBody("ok", "a", nil))
			r.Header.Set("X-CloudTasks-QueueName", "other")
			return r
		}, 403, 0, "WARN"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls.Store(0)
			before := len(logs.String())
			rec := httptest.NewRecorder()
			w.ServeHTTP(rec, tt.req())
			if rec.Code != tt.want {
				t.Errorf("status %d, want %d (body %q)", rec.Code, tt.want, rec.Body.String())
			}
			if got := calls.Load(); got != tt.wantCalls {
				t.Errorf("job ran %d times, want %d", got, tt.wantCalls)
			}
			if tt.want == 429 && rec.Header().Get("Retry-After") != "3" {
				t.Errorf("Retry-After %q, want 3 (2.5s rounded up)", rec.Header().Get("Retry-After"))
			}
			if tt.logLevel != "" && !strings.Contains(logs.String()[before:], "level="+tt.logLevel) {
				t.Errorf("no %s log; logs:\n%s", tt.logLevel, logs.String()[before:])
			}
			assertFree(t, locker, "a")
		})
	}
}

func TestPermanent(t *testing.T) {
	base := errors.New("x")
	err := tasks.Permanent(base)
	if !errors.Is(err, tasks.ErrPermanent) || !errors.Is(err, base) || tasks.Permanent(nil) != nil {
		t.Errorf("Permanent: %v", err)
	}
	if errors.Is(base, tasks.ErrPermanent) {
		t.Error("a plain error is permanent")
	}
}

func TestWorkerOptionsValidated(t *testing.T) {
	locker := newLocker(t, memlock.New(), 0)
	for name, opt := range map[string]tasks.WorkerOption{
		"nil logger":     tasks.WithLogger(nil),
		"bad queue":      tasks.WithQueue("projects/p/queues/x"),
		"empty queue":    tasks.WithQueue(""),
		"zero body":      tasks.WithMaxBodyBytes(0),
		"sub-second cap": tasks.WithMaxRetryAfter(500 * time.Millisecond),
	} {
		if _, err := tasks.NewWorker(locker, opt); !errors.Is(err, tasks.ErrInvalidConfig) {
			t.Errorf("%s: %v, want ErrInvalidConfig", name, err)
		}
	}
}

func TestWorkerDeliveryMetadata(t *testing.T) {
	locker := newLocker(t, memlock.New(), 0)
	w := newWorker(t, locker, &logBuffer{})
	var got *tasks.Delivery
	var fromCtx *tasks.Delivery
	var lockToken uint64
	w.Handle("meta", func(ctx context.Context, d *tasks.Delivery) error {
		got, fromCtx = d, tasks.FromContext(ctx)
		lockToken = locking.FromContext(ctx).Token()
		return nil
	})
	for i := range 2 {
		r := delivery(envelopeBody("meta", "user-42", map[string]int{"n": 5}))
		r.Header.Set("X-CloudTasks-TaskRetryCount", "3")
		r.Header.Set("X-CloudTasks-TaskExecutionCount", "2")
		r.Header.Set("X-CloudTasks-TaskPreviousResponse", "500")
		r.Header.Set("X-CloudTasks-TaskRetryReason", "HTTP status 500")
		r.Header.Set("X-CloudTasks-TaskETA", "1767225600.123456")
		rec := httptest.NewRecorder()
		prevToken := uint64(0)
		if got != nil {
			prevToken = got.Token
		}
		w.ServeHTTP(rec, r)
		if rec.Code != 204 {
			t.Fatalf("status %d", rec.Code)
		}
		if got == nil || fromCtx != got {
			t.Fatalf("FromContext returned %p, the job got %p", fromCtx, got)
		}
		var p struct{ N int }
		if err := got.Decode(&p); err != nil || p.N != 5 {
			t.Errorf("Decode: %+v, %v", p, err)
		}
		want := tasks.Delivery{
			Job: "meta", LockID: "user-42", TaskName: "t1", QueueName: "jobs",
			RetryCount: 3, ExecutionCount: 2, PreviousResponse: 500, RetryReason: "HTTP status 500",
			ETA: time.Unix(1767225600, 123456000).UTC(),
		}
		if got.Job != want.Job || got.LockID != want.LockID || got.TaskName != want.TaskName ||
			got.QueueName != want.QueueName || got.RetryCount != want.RetryCount ||
			got.ExecutionCount != want.ExecutionCount || got.PreviousResponse != want.PreviousResponse ||
			got.RetryReason != want.RetryReason || !got.ETA.Equal(want.ETA) || time.Since(got.EnqueuedAt) > time.Minute {
			t.Errorf("delivery %+v, want %+v", *got, want)
		}
		if got.Token == 0 || got.Token != lockToken || got.Token <= prevToken {
			t.Errorf("round %d: token %d (lock %d, previous %d)", i, got.Token, lockToken, prevToken)
		}
	}
	// Bytes payloads come back as the same bytes.
	w.Handle("bytes", func(ctx context.Context, d *tasks.Delivery) error {
		if !bytes.Equal(d.Payload, []byte{0, 1, 2}) {
			return tasks.Permanent(fmt.Errorf("payload %v", d.Payload))
		}
		return nil
	})
	rec := httptest.NewRecorder()
	w.ServeHTTP(rec, delivery(`{"v":1,"job":"bytes","lockId":"b","data":"AAEC","enqueuedAt":"2026-01-01T00:00:00Z"}`))
	if rec.Code != 204 {
		t.Errorf("bytes payload: status %d %s", rec.Code, rec.Body)
	}
}

func TestWorkerBusyAnswers429WithoutWaiting(t *testing.T) {
	tests := []struct {
		name      string
		lease     time.Duration
		opts      []tasks.WorkerOption
		wantAfter string
	}{
		{"remaining lease", 4 * time.Second, nil, "4"},
		{"capped", 30 * time.Second, nil, "10"},
		{"own cap", 30 * time.Second, []tasks.WorkerOption{tasks.WithMaxRetryAfter(2 * time.Second)}, "2"},
		{"at least a second", 300 * time.Millisecond, nil, "1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			locker := newLocker(t, memlock.New(), tt.lease)
			w := newWorker(t, locker, &logBuffer{}, tt.opts...)
			var calls atomic.Int32
			w.Handle("j", func(ctx context.Context, d *tasks.Delivery) error { calls.Add(1); return nil })
			held, err := locker.Acquire(t.Context(), "busy")
			if err != nil {
				t.Fatal(err)
			}
			defer held.Release(context.WithoutCancel(t.Context()))
			start := time.Now()
			rec := httptest.NewRecorder()
			w.ServeHTTP(rec, delivery(envelopeBody("j", "busy", nil)))
			took := time.Since(start)
			if rec.Code != 429 || rec.Header().Get("Retry-After") != tt.wantAfter {
				t.Errorf("answer %d Retry-After %q, want 429 %q", rec.Code, rec.Header().Get("Retry-After"), tt.wantAfter)
			}
			if calls.Load() != 0 {
				t.Error("the job ran while the lock was held")
			}
			if took > 50*time.Millisecond {
				t.Errorf("the handler took %v: it waited", took)
			}
		})
	}
}

// A second instance (another Client on the same store) gets 429 from the
// backend, not from the local queue.
func TestWorkerBusyAcrossInstances(t *testing.T) {
	store := memlock.New()
	holder := newLocker(t, store, 5*time.Second)
	w := newWorker(t, newLocker(t, store, 0), &logBuffer{})
	w.Handle("j", func(ctx context.Context, d *tasks.Delivery) error { return nil })
	held, err := holder.Acquire(t.Context(), "x")
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	w.ServeHTTP(rec, delivery(envelopeBody("j", "x", nil)))
	if rec.Code != 429 || rec.Header().Get("Retry-After") != "5" {
		t.Errorf("answer %d Retry-After %q, want 429 5", rec.Code, rec.Header().Get("Retry-After"))
	}
	if err := held.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	rec = httptest.NewRecorder()
	w.ServeHTTP(rec, delivery(envelopeBody("j", "x", nil)))
	if rec.Code != 204 {
		t.Errorf("after release: %d", rec.Code)
	}
}

func TestWorkerMaxWait(t *testing.T) {
	locker := newLocker(t, memlock.New(), 0)
	w := newWorker(t, locker, &logBuffer{})
	w.Handle("patient", func(ctx context.Context, d *tasks.Delivery) error { return nil }, tasks.MaxWait(300*time.Millisecond))
	tests := []struct {
		name string
		hold time.Duration
		want int
	}{
		{"released in time", 100 * time.Millisecond, 204},
		{"held too long", 2 * time.Second, 429},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			held, err := locker.Acquire(t.Context(), "m")
			if err != nil {
				t.Fatal(err)
			}
			released := make(chan struct{})
			go func() {
				defer close(released)
				time.Sleep(tt.hold)
				_ = held.Release(context.Background())
			}()
			defer func() { <-released }()
			start := time.Now()
			rec := httptest.NewRecorder()
			w.ServeHTTP(rec, delivery(envelopeBody("patient", "m", nil)))
			took := time.Since(start)
			if rec.Code != tt.want {
				t.Errorf("status %d, want %d", rec.Code, tt.want)
			}
			if tt.want == 204 && took < tt.hold {
				t.Errorf("ran after %v, before the holder released at %v", took, tt.hold)
			}
			// It gives up at the max wait, well before the holder releases
			// at 1 s; the upper bound leaves room for a loaded machine.
			if tt.want == 429 && (took < 300*time.Millisecond || took >= tt.hold) {
				t.Errorf("gave up after %v, want after the 300ms max wait and before the holder's release at %v", took, tt.hold)
			}
		})
	}
}

// losingBackend wraps a backend and, once lose is set, refuses renewals as a
// store does after another owner took the lock over.
type losingBackend struct {
	locking.Backend
	lose atomic.Bool
}

func (b *losingBackend) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if b.lose.Load() {
		return locking.Grant{}, fmt.Errorf("injected: %w", locking.ErrNotHeld)
	}
	return b.Backend.Renew(ctx, r)
}

func TestWorkerLockLostCancelsJob(t *testing.T) {
	b := &losingBackend{Backend: memlock.New()}
	locker := newLocker(t, b, 300*time.Millisecond)
	w := newWorker(t, locker, &logBuffer{})
	var cause error
	w.Handle("long", func(ctx context.Context, d *tasks.Delivery) error {
		b.lose.Store(true)
		select {
		case <-ctx.Done():
			cause = context.Cause(ctx)
			return ctx.Err()
		case <-time.After(5 * time.Second):
			return nil
		}
	})
	start := time.Now()
	rec := httptest.NewRecorder()
	w.ServeHTTP(rec, delivery(envelopeBody("long", "lost", nil)))
	if rec.Code != 503 {
		t.Errorf("status %d, want 503", rec.Code)
	}
	if !errors.Is(cause, locking.ErrLockLost) {
		t.Errorf("job context cause %v, want ErrLockLost", cause)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the job was cancelled only after %v", took)
	}
}

// failingRelease wraps a backend whose Release fails with a store error.
type failingRelease struct{ locking.Backend }

func (failingRelease) Release(ctx context.Context, id, owner string) error {
	return errors.New("injected: store unavailable")
}

// A job that finished is not run again because only the release failed: the
// lock was not lost, and it expires with its lease.
func TestWorkerReleaseFailureAfterSuccess(t *testing.T) {
	locker := newLocker(t, failingRelease{memlock.New()}, 0)
	logs := &logBuffer{}
	w := newWorker(t, locker, logs)
	w.Handle("j", func(ctx context.Context, d *tasks.Delivery) error { return nil })
	w.Handle("bad", func(ctx context.Context, d *tasks.Delivery) error { return errors.New("boom") })
	for _, tt := range []struct {
		job, lock string
		want      int
	}{{"j", "r1", 204}, {"bad", "r2", 500}} {
		rec := httptest.NewRecorder()
		w.ServeHTTP(rec, delivery(envelopeBody(tt.job, tt.lock, nil)))
		if rec.Code != tt.want {
			t.Errorf("job %s: status %d, want %d", tt.job, rec.Code, tt.want)
		}
	}
	if !strings.Contains(logs.String(), "releasing its lock failed") {
		t.Errorf("no warning about the release; logs:\n%s", logs)
	}
}
