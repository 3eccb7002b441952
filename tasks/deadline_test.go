package tasks_test

import (
	"context"
	"errors"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// TestJobDeadline: a job that overruns the Worker's job deadline is told so
// through its context (cause ErrJobDeadline), and the Worker answers at the
// deadline, before the attempt's dispatch deadline would end it, in both
// busy modes.
func TestJobDeadline(t *testing.T) {
	for _, mode := range []string{"429", "park"} {
		t.Run(mode, func(t *testing.T) {
			opts := []tasks.WorkerOption{tasks.WithQueue(queueName), tasks.WithJobDeadline(time.Second)}
			if mode == "park" {
				opts = append(opts, parking(t))
			}
			w := newWorker(t, newLocker(t, memlock.New(), 0), &logBuffer{}, opts...)
			var cause atomic.Value
			w.Handle("long", func(ctx context.Context, d *tasks.Delivery) error {
				select {
				case <-ctx.Done():
					cause.Store(context.Cause(ctx))
					return ctx.Err()
				case <-time.After(10 * time.Second):
					return nil
				}
			})
			r, err := taskstest.NewRequest(tasks.Task{Job: "long", LockID: "dl-" + mode})
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			rw := httptest.NewRecorder()
			w.ServeHTTP(rw, r)
			took := time.Since(start)
			if rw.Code != tasks.StatusFailed {
				t.Errorf("answer %d, want %d (retried)", rw.Code, tasks.StatusFailed)
			}
			if c, _ := cause.Load().(error); !errors.Is(c, tasks.ErrJobDeadline) {
				t.Errorf("the job's context ended with cause %v, want ErrJobDeadline", c)
			}
			if took < time.Second || took > 3*time.Second {
				t.Errorf("the Worker answered after %v, want at the 1 s job deadline", took)
			}
		})
	}
}

// TestRetryOfALongRunDoesNotRunAgain: Cloud Tasks retries an attempt at its
// dispatch deadline while the first run still runs; in park mode the retry
// parks behind that run, and once the run finished it is not run again.
func TestRetryOfALongRunDoesNotRunAgain(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			var runs atomic.Int32
			proceed := make(chan struct{})
			started := make(chan struct{}, 1)
			f := newParkFleet(t, 2, 2*time.Second, list(t), nil, func(_ int, w *tasks.Worker) {
				w.Handle("long", func(ctx context.Context, d *tasks.Delivery) error {
					runs.Add(1)
					started <- struct{}{}
					<-proceed
					return nil
				})
			})
			task := tasks.Task{Job: "long", LockID: "lr1", Name: "long-1"}
			deliver := func(retry int) int {
				r, err := taskstest.NewRequest(task, taskstest.RequestAttempt(retry, 0))
				if err != nil {
					t.Error(err)
					return 0
				}
				rw := httptest.NewRecorder()
				f.handler.ServeHTTP(rw, r)
				return rw.Code
			}
			first := make(chan int, 1)
			go func() { first <- deliver(0) }()
			<-started
			if code := deliver(1); code != tasks.StatusParked {
				t.Errorf("the retry during the first run answered %d, want %d (parked)", code, tasks.StatusParked)
			}
			close(proceed)
			if code := <-first; code != tasks.StatusDone {
				t.Errorf("the first run answered %d, want %d", code, tasks.StatusDone)
			}
			waitIdle(t, f.srv, 20*time.Second)
			time.Sleep(200 * time.Millisecond)
			if n := runs.Load(); n != 1 {
				t.Errorf("the task ran %d times, want once", n)
			}
			if _, _, st, _, err := f.list.Peek(t.Context(), "lr1", "jobs/"+tasks.TaskID("long", "long-1")); err != nil || st != tasks.Finished {
				t.Errorf("the parked retry's record is %v (%v), want finished", st, err)
			}
		})
	}
}

// hungStore is a lock store that never answers: every call waits until its
// context ends, as a store that is down or contended holds its callers.
type hungStore struct{ locking.Backend }

func (hungStore) Acquire(ctx context.Context, _ locking.Request) (locking.Grant, error) {
	<-ctx.Done()
	return locking.Grant{}, ctx.Err()
}

func (hungStore) Release(ctx context.Context, _, _ string) error {
	<-ctx.Done()
	return ctx.Err()
}

// TestStepBudget: a delivery whose lock store does not answer is answered
// 503 once the step budget is spent, instead of holding its handler until
// the request ends; its job does not run.
func TestStepBudget(t *testing.T) {
	for _, mode := range []string{"429", "park"} {
		t.Run(mode, func(t *testing.T) {
			opts := []tasks.WorkerOption{tasks.WithQueue(queueName), tasks.WithStepBudget(300 * time.Millisecond)}
			if mode == "park" {
				opts = append(opts, parking(t))
			}
			w := newWorker(t, newLocker(t, hungStore{memlock.New()}, 0), &logBuffer{}, opts...)
			var ran atomic.Bool
			w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error { ran.Store(true); return nil })
			r, err := taskstest.NewRequest(tasks.Task{Job: "job", LockID: "sb-" + mode})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second) // the request's own end, far off
			defer cancel()
			start := time.Now()
			rw := httptest.NewRecorder()
			w.ServeHTTP(rw, r.WithContext(ctx))
			took := time.Since(start)
			if rw.Code != tasks.StatusRetry {
				t.Errorf("answer %d, want %d", rw.Code, tasks.StatusRetry)
			}
			if took > 5*time.Second {
				t.Errorf("answered after %v; want soon after the 300 ms step budget", took)
			}
			if ran.Load() {
				t.Error("the job ran without its lock")
			}
			t.Logf("%s mode: answered %d after %v", mode, rw.Code, took.Round(time.Millisecond))
		})
	}
}
