package taskstest_test

import (
	"testing"
	"time"

	"github.com/taskguard/taskguard/tasks/taskstest"
)

// TestLatencyOptions: CreateTaskLatency is added to every CreateTask call, and
// every attempt's request is held back by DispatchDelay plus up to
// DispatchJitter after the task fell due.
func TestLatencyOptions(t *testing.T) {
	const (
		createLatency = 80 * time.Millisecond
		delay         = 60 * time.Millisecond
		jitter        = 40 * time.Millisecond
		slack         = 150 * time.Millisecond // a loaded machine's scheduling
	)
	rec := &recorder{}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{CreateTaskLatency: createLatency, DispatchDelay: delay, DispatchJitter: jitter}, nil, nil)
	const n = 5
	for range n {
		start := time.Now()
		e.create(t, httpTask(ts.URL, "x"))
		if took := time.Since(start); took < createLatency || took > createLatency+slack {
			t.Errorf("CreateTask took %v; want %v plus the call", took, createLatency)
		}
	}
	e.waitIdle(t, 10*time.Second)
	atts := e.srv.Attempts()
	if len(atts) != n || rec.count() != n {
		t.Fatalf("%d attempts, %d requests; want %d", len(atts), rec.count(), n)
	}
	for _, a := range atts {
		if held := a.Dispatched.Sub(a.Scheduled); held < delay || held > delay+jitter+slack {
			t.Errorf("attempt sent %v after it fell due; want %v to %v", held, delay, delay+jitter)
		}
	}
}
