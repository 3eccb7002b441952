package taskstest_test

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// fakeEnqueuer is what a project's test passes for a tasks.Enqueuer: it
// keeps the tasks.
type fakeEnqueuer struct{ tasks []tasks.Task }

func (f *fakeEnqueuer) Enqueue(_ context.Context, t tasks.Task) (string, error) {
	f.tasks = append(f.tasks, t)
	return "task", nil
}

// TestNewRequestDeliversToWorker: the code under test enqueues through a
// tasks.Enqueuer fake; NewRequest turns each task into the Worker's request,
// with no hand-written envelope or header, and the Worker runs the job
// under the task's lock with the task's payload and delivery metadata.
func TestNewRequestDeliversToWorker(t *testing.T) {
	var q tasks.Enqueuer = &fakeEnqueuer{}
	checkout := func(ctx context.Context, customer string) error {
		_, err := q.Enqueue(ctx, tasks.Task{Job: "charge", LockID: "customer-" + customer, Payload: map[string]int{"cents": 1250}})
		return err
	}
	if err := checkout(t.Context(), "z"); err != nil {
		t.Fatal(err)
	}

	locks, err := locking.New(locking.Config{Strong: memlock.New(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	w, err := tasks.NewWorker(locks, tasks.WithLogger(slog.New(slog.DiscardHandler)), tasks.WithQueue("jobs"))
	if err != nil {
		t.Fatal(err)
	}
	var got *tasks.Delivery
	var cents int
	w.Handle("charge", func(ctx context.Context, d *tasks.Delivery) error {
		got = d
		var p struct{ Cents int }
		if err := d.Decode(&p); err != nil {
			return tasks.Permanent(err)
		}
		cents = p.Cents
		return nil
	})
	req, err := taskstest.NewRequest(q.(*fakeEnqueuer).tasks[0], taskstest.RequestTaskID("t-1"), taskstest.RequestAttempt(2, 1))
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	w.ServeHTTP(rec, req)
	if rec.Code != tasks.StatusDone || got == nil {
		t.Fatalf("Worker answered %d %s; want %d and the job run", rec.Code, rec.Body, tasks.StatusDone)
	}
	if got.LockID != "customer-z" || got.Token == 0 || cents != 1250 || got.TaskName != "t-1" || got.QueueName != "jobs" ||
		got.RetryCount != 2 || got.ExecutionCount != 1 || time.Since(got.ETA) > time.Minute {
		t.Errorf("delivery = %+v (cents %d); want customer-z's lock, the payload, task t-1 from queue jobs, retry 2, execution 1, ETA now", got, cents)
	}
}

// TestNewRequestRefusesWhatEnqueueRefuses: a task Enqueue would refuse
// makes no request.
func TestNewRequestRefusesWhatEnqueueRefuses(t *testing.T) {
	if _, err := taskstest.NewRequest(tasks.Task{Job: "charge"}); !errors.Is(err, tasks.ErrInvalidTask) {
		t.Errorf("NewRequest without a lock id = %v; want ErrInvalidTask", err)
	}
	if _, err := taskstest.NewRequest(tasks.Task{Job: "charge", LockID: "x"}, taskstest.RequestQueue("jobs")); !errors.Is(err, tasks.ErrInvalidConfig) {
		t.Errorf("NewRequest with a short queue name = %v; want ErrInvalidConfig", err)
	}
	req, err := taskstest.NewRequest(tasks.Task{Job: "charge", LockID: "x", Name: "order-7"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := req.Header.Get(taskstest.HeaderTaskName), tasks.TaskID("charge", "order-7"); got != want || req.Method != http.MethodPost {
		t.Errorf("named task's request: %s task %q; want POST task %q", req.Method, got, want)
	}
}
