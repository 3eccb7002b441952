package tasks_test

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
)

// TestUnknownJobEnqueuedInTheFuture: a task of a job this Worker does not
// have is retried for UnknownJobGrace after it was enqueued, then dropped.
// Its enqueue time is the enqueuer's clock (or whatever a forged envelope
// says): one a day ahead of this instance's clock must not make it retried
// for a day and the grace (or, far ahead, until the queue gives up), since
// it can never have been enqueued within the grace.
func TestUnknownJobEnqueuedInTheFuture(t *testing.T) {
	w := newWorker(t, newLocker(t, memlock.New(), 0), &logBuffer{}, tasks.WithQueue(queueName))
	w.Handle("known", func(context.Context, *tasks.Delivery) error { return nil })
	for _, ahead := range []time.Duration{24 * time.Hour, 100 * 365 * 24 * time.Hour} {
		body, _ := json.Marshal(map[string]any{"v": 1, "job": "unknown", "lockId": "clock", "enqueuedAt": time.Now().Add(ahead).UTC()})
		rw := httptest.NewRecorder()
		w.ServeHTTP(rw, delivery(string(body)))
		if rw.Code != tasks.StatusDropped {
			t.Errorf("unknown job enqueued %v ahead of this clock: answered %d, want 200 (dropped: not enqueued within UnknownJobGrace)", ahead, rw.Code)
		}
	}
}
