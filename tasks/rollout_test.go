package tasks_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
)

// TestRolloutAddingAJob: during a rolling deploy that adds a job, a task
// of the new job reaches an instance of the old revision first. It must
// not be dropped there (it used to be answered 200 "unknown job" and lost):
// it is answered 503, and its retry, reaching a new instance, runs it once.
func TestRolloutAddingAJob(t *testing.T) {
	store := memlock.New()
	old := newWorker(t, newLocker(t, store, 0), &logBuffer{}, tasks.WithQueue(queueName))
	current := newWorker(t, newLocker(t, store, 0), &logBuffer{}, tasks.WithQueue(queueName))
	var runs atomic.Int32
	current.Handle("new-job", func(context.Context, *tasks.Delivery) error { runs.Add(1); return nil })
	task := tasks.Task{Job: "new-job", LockID: "rollout", Name: "n1"}
	if code := deliverAttempt(t.Context(), t, old, task, 0); code != tasks.StatusRetry {
		t.Errorf("the old revision answered %d, want %d (retried: the job may be on its way)", code, tasks.StatusRetry)
	}
	if code := deliverAttempt(t.Context(), t, current, task, 1); code != tasks.StatusDone || runs.Load() != 1 {
		t.Errorf("the retry on the new revision answered %d and ran %d times, want %d and once", code, runs.Load(), tasks.StatusDone)
	}
}
