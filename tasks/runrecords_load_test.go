package tasks_test

import (
	"context"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// TestRunRecordsUnderLoad: in 429 mode with run records, a burst of
// deliveries of the same task (duplicates and retries, on two Workers that
// share the lock store and the run records) that wait for the lock in turn
// (MaxWait) runs the job once; every delivery is answered 204.
func TestRunRecordsUnderLoad(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			l := list(t)
			store := memlock.New()
			var runs atomic.Int32
			var workers []*tasks.Worker
			for range 2 {
				w := newWorker(t, newLocker(t, store, 0), &logBuffer{}, tasks.WithRunRecords(l))
				w.Handle("once", func(ctx context.Context, d *tasks.Delivery) error {
					runs.Add(1)
					time.Sleep(20 * time.Millisecond)
					return nil
				}, tasks.MaxWait(20*time.Second))
				workers = append(workers, w)
			}
			const n = 20
			codes := make([]int, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					r, err := taskstest.NewRequest(tasks.Task{Job: "once", LockID: "load-" + name, Name: "t"}, taskstest.RequestAttempt(i%3, 0))
					if err != nil {
						t.Error(err)
						return
					}
					rw := httptest.NewRecorder()
					workers[i%2].ServeHTTP(rw, r)
					codes[i] = rw.Code
				})
			}
			wg.Wait()
			for i, c := range codes {
				if c != tasks.StatusDone {
					t.Errorf("delivery %d answered %d, want %d", i, c, tasks.StatusDone)
				}
			}
			if got := runs.Load(); got != 1 {
				t.Errorf("the job ran %d times, want once", got)
			}
		})
	}
}
