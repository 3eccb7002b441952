package tasks

import (
	"fmt"
	"testing"
	"time"
)

// TestMemoryWaitListForgetsOldRuns: a MemoryWaitList keeps a finished run
// for FinishedRetention, not for the life of the process. Every run of a
// Worker with it (park mode, and 429 mode's run records: app passes one
// with in-memory locks) finishes a record; with a lock id per user or per
// order, a long-running process must not keep one list per lock id it
// ever saw.
func TestMemoryWaitListForgetsOldRuns(t *testing.T) {
	now := time.Now()
	m := &MemoryWaitList{now: func() time.Time { return now }}
	for i := range 1000 {
		if err := m.Finish(t.Context(), fmt.Sprintf("user-%d", i), "jobs/t", ""); err != nil {
			t.Fatal(err)
		}
	}
	now = now.Add(2 * FinishedRetention)
	if err := m.Finish(t.Context(), "user-new", "jobs/t", ""); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if n := len(m.locks); n > 10 {
		t.Errorf("%d lock ids' lists kept, %v after their runs finished; want those past retention dropped", n, 2*FinishedRetention)
	}
}
