package tasks_test

import (
	"context"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// TestLockLostRunIsRunAgain: a job whose lock was lost while it ran is
// answered 503, "retrying": its retry must run it again (the run was not
// exclusive; the job's writes may have been fenced off). A job that
// returned nil after the loss must not leave a run record that turns the
// retry into a 204 that runs nothing. In 429 mode with run records and in
// park mode.
func TestLockLostRunIsRunAgain(t *testing.T) {
	for _, mode := range []string{"429+records", "park"} {
		t.Run(mode, func(t *testing.T) {
			b := &losingBackend{Backend: memlock.New()}
			locker := newLocker(t, b, 300*time.Millisecond)
			opt := tasks.WithRunRecords(&tasks.MemoryWaitList{})
			if mode == "park" {
				opt = parking(t)
			}
			w := newWorker(t, locker, &logBuffer{}, opt)
			var runs atomic.Int32
			w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
				if runs.Add(1) == 1 {
					b.lose.Store(true)
					<-ctx.Done() // the lock is lost ...
					b.lose.Store(false)
				}
				return nil // ... and the job says it is done all the same
			})
			task := tasks.Task{Job: "job", LockID: "lost-" + mode, Name: "once"}
			var codes []int
			for attempt := range 2 {
				if attempt > 0 {
					time.Sleep(400 * time.Millisecond) // the lost holding's lease ends: the retry finds the lock free
				}
				r, err := taskstest.NewRequest(task, taskstest.RequestAttempt(attempt, 0))
				if err != nil {
					t.Fatal(err)
				}
				rw := httptest.NewRecorder()
				w.ServeHTTP(rw, r)
				codes = append(codes, rw.Code)
			}
			if codes[0] != tasks.StatusRetry {
				t.Fatalf("the attempt that lost its lock answered %d, want %d", codes[0], tasks.StatusRetry)
			}
			if runs.Load() != 2 || codes[1] != tasks.StatusDone {
				t.Errorf("the retry of a run that lost its lock answered %d and the job ran %d times; want 204 and twice (503 asked for the retry)", codes[1], runs.Load())
			}
		})
	}
}

// slowPeek is a wait list whose Peek answers late, ignoring its context,
// as a store under load may.
type slowPeek struct {
	tasks.WaitList
	delay time.Duration
}

func (l slowPeek) Peek(ctx context.Context, lockID, key string) (tasks.Waiter, bool, tasks.WaiterState, string, error) {
	time.Sleep(l.delay)
	return l.WaitList.Peek(ctx, lockID, key)
}

// TestStepBudgetSpentOnRunRecords: a run-record read that outlasts the step
// budget leaves the job unrun, and the delivery is answered 503 (as every
// delivery whose steps overran: WithStepBudget), not 500 "job failed".
func TestStepBudgetSpentOnRunRecords(t *testing.T) {
	logs := &logBuffer{}
	w := newWorker(t, newLocker(t, memlock.New(), 0), logs,
		tasks.WithRunRecords(slowPeek{&tasks.MemoryWaitList{}, 300 * time.Millisecond}), tasks.WithStepBudget(100*time.Millisecond))
	var ran atomic.Bool
	w.Handle("job", func(context.Context, *tasks.Delivery) error { ran.Store(true); return nil })
	r, err := taskstest.NewRequest(tasks.Task{Job: "job", LockID: "slow-peek"})
	if err != nil {
		t.Fatal(err)
	}
	rw := httptest.NewRecorder()
	w.ServeHTTP(rw, r)
	if rw.Code != tasks.StatusRetry || ran.Load() || strings.Contains(logs.String(), "job failed") {
		t.Errorf("answer %d, job ran %v; want %d, not run, and no \"job failed\" log; logs:\n%s", rw.Code, ran.Load(), tasks.StatusRetry, logs)
	}
}

// TestRunRecordsWithParkingLeaseOnly: WithParkingLease without WithParking
// is refused for what it is, also beside WithRunRecords (a 429-mode
// Worker's options): the error must not blame a WithParking never given.
func TestRunRecordsWithParkingLeaseOnly(t *testing.T) {
	_, err := tasks.NewWorker(newLocker(t, memlock.New(), 0), tasks.WithRunRecords(&tasks.MemoryWaitList{}), tasks.WithParkingLease(time.Minute))
	if err == nil || !strings.Contains(err.Error(), "WithParkingLease without WithParking") {
		t.Errorf("WithRunRecords and WithParkingLease: %v; want the error of WithParkingLease without WithParking", err)
	}
}
