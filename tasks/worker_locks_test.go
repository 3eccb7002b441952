package tasks_test

import (
	"context"
	"errors"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
)

// leaseRecorder is a memlock backend that records the leases it is asked
// for.
type leaseRecorder struct {
	*memlock.Backend
	mu     sync.Mutex
	leases []time.Duration
}

func (b *leaseRecorder) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	b.mu.Lock()
	b.leases = append(b.leases, r.Lease)
	b.mu.Unlock()
	return b.Backend.Acquire(ctx, r)
}

// TestWithLockOptions: the worker's lock options apply to every job's lock,
// and a job's own LockOptions win over them.
func TestWithLockOptions(t *testing.T) {
	b := &leaseRecorder{Backend: memlock.New()}
	w := newWorker(t, newLocker(t, b, 0), &logBuffer{}, tasks.WithLockOptions(locking.Lease(7*time.Second)))
	w.Handle("plain", func(context.Context, *tasks.Delivery) error { return nil })
	w.Handle("own", func(context.Context, *tasks.Delivery) error { return nil }, tasks.LockOptions(locking.Lease(3*time.Second)))
	for _, job := range []string{"plain", "own"} {
		rec := httptest.NewRecorder()
		w.ServeHTTP(rec, delivery(envelopeBody(job, "id-"+job, nil)))
		if rec.Code != tasks.StatusDone {
			t.Fatalf("%s: %d %s", job, rec.Code, rec.Body)
		}
	}
	if len(b.leases) != 2 || b.leases[0] != 7*time.Second || b.leases[1] != 3*time.Second {
		t.Errorf("leases asked for = %v; want [7s 3s]", b.leases)
	}
}

// TestNewWorkerDefaultClientError: a worker on the default client fails at
// once when that client cannot take locks (here: production settings with
// no Strong backend), instead of answering 503 to every task.
func TestNewWorkerDefaultClientError(t *testing.T) {
	for _, v := range []string{"GOOGLE_CLOUD_PROJECT", "DATASTORE_EMULATOR_HOST", locking.EnvAllowMemory} {
		t.Setenv(v, "")
	}
	t.Setenv("K_SERVICE", "worker")
	locking.SetDefault(nil)
	t.Cleanup(func() { locking.SetDefault(nil) })
	if _, err := tasks.NewWorker(nil); !errors.Is(err, locking.ErrNoStrongBackend) {
		t.Errorf("NewWorker(nil) on Cloud Run without a Strong backend = %v; want ErrNoStrongBackend", err)
	}
}
