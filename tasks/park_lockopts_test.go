package tasks_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
)

// parking turns park mode on, with an in-memory wait list and a tasks
// client whose calls go nowhere.
func parking(t *testing.T) tasks.WorkerOption {
	t.Helper()
	c, err := tasks.NewClient(t.Context(), baseConfig("https://worker.example/"), deadEndpoint(t)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return tasks.WithParking(c, &tasks.MemoryWaitList{})
}

// TestWorkerLockOptionsInEveryMode checks that the options every job's
// lock takes (WithLockOptions) apply in park mode as in 429 mode, on the
// Strong and on the Weak backend.
func TestWorkerLockOptionsInEveryMode(t *testing.T) {
	const lease = 7 * time.Second
	for _, mode := range []string{"429", "park"} {
		for _, kind := range []locking.LockKind{locking.Strong, locking.Weak} {
			t.Run(mode+"/"+kind.String(), func(t *testing.T) {
				strong, weak := &leaseRecorder{Backend: memlock.New()}, &leaseRecorder{Backend: memlock.New()}
				locker, err := locking.New(locking.Config{Strong: strong, Weak: weak})
				if err != nil {
					t.Fatal(err)
				}
				opts := []tasks.WorkerOption{tasks.WithQueue(queueName), tasks.WithLockOptions(locking.Lease(lease), locking.Kind(kind))}
				if mode == "park" {
					opts = append(opts, parking(t))
				}
				w := newWorker(t, locker, &logBuffer{}, opts...)
				w.Handle("ok", func(ctx context.Context, d *tasks.Delivery) error { return nil })
				rec := httptest.NewRecorder()
				w.ServeHTTP(rec, delivery(envelopeBody("ok", "id-1", nil)))
				if rec.Code != http.StatusOK && rec.Code != http.StatusNoContent {
					t.Fatalf("answer %d %s", rec.Code, rec.Body)
				}
				used, unused := strong, weak
				if kind == locking.Weak {
					used, unused = weak, strong
				}
				if len(used.leases) == 0 || len(unused.leases) != 0 {
					t.Fatalf("%v lock asked of the Strong backend %d times, of the Weak %d", kind, len(strong.leases), len(weak.leases))
				}
				for _, l := range used.leases {
					if l != lease {
						t.Errorf("lock asked with lease %v; want %v (WithLockOptions)", l, lease)
					}
				}
			})
		}
	}
}

// TestWorkerMisconfiguredLockInEveryMode: a lock the client refuses before
// any I/O (here a lease above locking.MaxLease) is answered 500, as the
// lockhttp.Policy says, in park mode as in 429 mode; retrying (503) could
// not mend it.
func TestWorkerMisconfiguredLockInEveryMode(t *testing.T) {
	for _, mode := range []string{"429", "park"} {
		t.Run(mode, func(t *testing.T) {
			locker, err := locking.New(locking.Config{Strong: memlock.New()})
			if err != nil {
				t.Fatal(err)
			}
			opts := []tasks.WorkerOption{tasks.WithQueue(queueName), tasks.WithLockOptions(locking.Lease(locking.MaxLease + time.Hour))}
			if mode == "park" {
				opts = append(opts, parking(t))
			}
			w := newWorker(t, locker, &logBuffer{}, opts...)
			w.Handle("ok", func(ctx context.Context, d *tasks.Delivery) error { return nil })
			rec := httptest.NewRecorder()
			w.ServeHTTP(rec, delivery(envelopeBody("ok", "id-1", nil)))
			if rec.Code != http.StatusInternalServerError {
				t.Errorf("%s mode: answer %d %q; want 500 (lock misconfigured)", mode, rec.Code, rec.Body)
			}
		})
	}
}
