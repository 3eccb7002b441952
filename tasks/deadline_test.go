package tasks_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
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
// parks behind that run, and once the run finished it is not run again,
// nor is a later retry, also when the first attempt's request ended before
// its job did.
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
			deliver := func(ctx context.Context, retry int) int { return deliverAttempt(ctx, t, f.handler, task, retry) }
			attempt, giveUp := context.WithCancel(t.Context())
			first := make(chan int, 1)
			go func() { first <- deliver(attempt, 0) }()
			<-started
			if code := deliver(t.Context(), 1); code != tasks.StatusParked {
				t.Errorf("the retry during the first run answered %d, want %d (parked)", code, tasks.StatusParked)
			}
			giveUp() // the first attempt's dispatch deadline: its request ends before its job
			close(proceed)
			<-first
			if code := deliver(t.Context(), 2); code != tasks.StatusDone {
				t.Errorf("a retry after the run answered %d, want %d (ran already)", code, tasks.StatusDone)
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

// TestRetryOfALongRunDoesNotRunAgainIn429Mode: in 429 mode with run
// records, a retry that comes while the first run runs is answered 429, and
// one that comes after it finished is answered 204 without running the job.
// The first run's request ends before its job does (Cloud Tasks gave up on
// the attempt at its dispatch deadline): the record is kept all the same.
// Without run records the late retry runs the job a second time.
func TestRetryOfALongRunDoesNotRunAgainIn429Mode(t *testing.T) {
	for name, list := range waitLists {
		for _, records := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/records=%v", name, records), func(t *testing.T) {
				opts := []tasks.WorkerOption{tasks.WithQueue(queueName)}
				l := list(t)
				if records {
					opts = append(opts, tasks.WithRunRecords(l))
				}
				w := newWorker(t, newLocker(t, memlock.New(), 0), &logBuffer{}, opts...)
				var runs atomic.Int32
				started, proceed := make(chan struct{}, 1), make(chan struct{})
				w.Handle("long", func(ctx context.Context, d *tasks.Delivery) error {
					runs.Add(1)
					started <- struct{}{}
					<-proceed // ignores its context: runs on past its request
					return nil
				})
				task := tasks.Task{Job: "long", LockID: "lr429-" + name, Name: "long-429"}
				deliver := func(ctx context.Context, retry int) int { return deliverAttempt(ctx, t, w, task, retry) }
				attempt, giveUp := context.WithCancel(t.Context())
				first := make(chan int, 1)
				go func() { first <- deliver(attempt, 0) }()
				<-started
				if code := deliver(t.Context(), 1); code != tasks.StatusBusy {
					t.Errorf("the retry during the first run answered %d, want %d", code, tasks.StatusBusy)
				}
				giveUp() // the attempt's dispatch deadline: its request ends
				close(proceed)
				<-first
				code := deliver(t.Context(), 2)
				if records {
					if code != tasks.StatusDone || runs.Load() != 1 {
						t.Errorf("the retry after the run answered %d and the job ran %d times, want %d and once", code, runs.Load(), tasks.StatusDone)
					}
					if _, _, st, _, err := l.Peek(t.Context(), task.LockID, "jobs/"+tasks.TaskID("long", "long-429")); err != nil || st != tasks.Finished {
						t.Errorf("the run's record is %v (%v), want finished", st, err)
					}
				} else if runs.Load() != 2 {
					// The retry ran the job again: what run records prevent.
					t.Errorf("without run records the job ran %d times, want twice", runs.Load())
				}
			})
		}
	}
}

// TestRunRecordsFailClosed: a run record that cannot be read is answered
// 503 without running the job; WithRunRecords refuses a nil list and park
// mode.
func TestRunRecordsFailClosed(t *testing.T) {
	w := newWorker(t, newLocker(t, memlock.New(), 0), &logBuffer{}, tasks.WithRunRecords(brokenList{}))
	var ran atomic.Bool
	w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error { ran.Store(true); return nil })
	r, err := taskstest.NewRequest(tasks.Task{Job: "job", LockID: "rr-broken"})
	if err != nil {
		t.Fatal(err)
	}
	rw := httptest.NewRecorder()
	w.ServeHTTP(rw, r)
	if rw.Code != tasks.StatusRetry || ran.Load() {
		t.Errorf("answer %d, job ran %v; want %d and not run", rw.Code, ran.Load(), tasks.StatusRetry)
	}
	if _, err := tasks.NewWorker(newLocker(t, memlock.New(), 0), tasks.WithRunRecords(nil)); !errors.Is(err, tasks.ErrInvalidConfig) {
		t.Errorf("WithRunRecords(nil): %v, want ErrInvalidConfig", err)
	}
	if _, err := tasks.NewWorker(newLocker(t, memlock.New(), 0), parking(t), tasks.WithRunRecords(&tasks.MemoryWaitList{})); !errors.Is(err, tasks.ErrInvalidConfig) {
		t.Errorf("WithRunRecords with WithParking: %v, want ErrInvalidConfig", err)
	}
}

// brokenList is a wait list whose every call fails.
type brokenList struct{ tasks.WaitList }

func (brokenList) Peek(context.Context, string, string) (tasks.Waiter, bool, tasks.WaiterState, string, error) {
	return tasks.Waiter{}, false, 0, "", errors.New("wait list down")
}

// deliverAttempt delivers task to h as its attempt after retry earlier
// ones, with the request's context ctx, and returns the answer's status.
func deliverAttempt(ctx context.Context, t *testing.T, h http.Handler, task tasks.Task, retry int) int {
	t.Helper()
	r, err := taskstest.NewRequest(task, taskstest.RequestAttempt(retry, 0))
	if err != nil {
		t.Error(err)
		return 0
	}
	rw := httptest.NewRecorder()
	h.ServeHTTP(rw, r.WithContext(ctx))
	return rw.Code
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
