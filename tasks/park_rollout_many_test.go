package tasks_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/taskguard/taskguard/tasks"
)

// TestParkRolloutManyWaiters: during a rolling deploy adding "new-job",
// two of its tasks and one of a job both revisions have wait behind a
// holder. Wakes reach the old revision (every other delivery): each
// unknown waiter is kept claimed by its wake (503) while the others are
// handed the lock. Every task must run exactly once, and none be left
// claimed (Running) or waiting.
func TestParkRolloutManyWaiters(t *testing.T) {
	const lease = time.Second
	list := &tasks.MemoryWaitList{}
	var runs jobRuns
	f := newParkFleet(t, 2, lease, list, nil, func(i int, w *tasks.Worker) {
		w.Handle("job", runs.job)
		if i == 0 {
			w.Handle("new-job", runs.job)
		}
	})
	waiters := []struct{ key, job, payload string }{{"jobs/a", "new-job", "a"}, {"jobs/b", "new-job", "b"}, {"jobs/c", "job", "c"}}
	for i, wt := range waiters {
		body, _ := json.Marshal(map[string]any{"v": 1, "job": wt.job, "lockId": "rm", "payload": wt.payload, "enqueuedAt": time.Now().UTC()})
		if _, _, _, err := list.Park(t.Context(), "rm", tasks.Waiter{Key: wt.key, Arrived: time.Now().Add(time.Duration(i) * time.Millisecond), Job: wt.job, Body: body}, time.Now().Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	holder := outsider(t, f, lease)
	if err := tasks.HandOff(holder, f.client, list, nil); err != nil {
		t.Fatal(err)
	}
	<-holdFor(t, holder, "rm", 100*time.Millisecond)
	for _, wt := range waiters {
		runs.waitRuns(t, `"`+wt.payload+`"`, 1, 20*time.Second)
	}
	waitIdle(t, f.srv, 20*time.Second)
	for _, wt := range waiters {
		if n := runs.count(`"` + wt.payload + `"`); n != 1 {
			t.Errorf("task %s ran %d times, want once", wt.key, n)
		}
		if _, _, st, runner, err := list.Peek(t.Context(), "rm", wt.key); err != nil || st != tasks.Finished {
			t.Errorf("task %s: state %v (runner %q), %v; want finished", wt.key, st, runner, err)
		}
	}
	if st := f.statuses(); st[tasks.StatusRetry] < 1 {
		t.Errorf("answers %v; want the old revision's 503 (else the test tested nothing)", st)
	}
	assertFree(t, holder, "rm")
}
