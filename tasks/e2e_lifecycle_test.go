package tasks_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/tasks"
)

// TestE2ERequestEndsMidJob: two Worker instances, locks on the Datastore
// emulator (Firestore mode unless TASKS_E2E_DATASTORE says otherwise). The
// first delivery's request is cancelled 100 ms into a 600 ms step that does
// not watch its context (a client that went away, a request timeout); the
// redelivery reaches the other instance 250 ms into the step. The job's lock must stay
// held until the step returns: the redelivery is answered busy, and the job
// never runs twice at once. Once the step is over the lock is free.
func TestE2ERequestEndsMidJob(t *testing.T) {
	var running, most, runs atomic.Int32
	started := make(chan struct{}, 1)
	f := newFleet(t, 2, 2*time.Second, func(w *tasks.Worker) {
		w.Handle("step", func(ctx context.Context, d *tasks.Delivery) error {
			select {
			case started <- struct{}{}:
			default:
			}
			n := running.Add(1)
			defer running.Add(-1)
			for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
			}
			runs.Add(1)
			time.Sleep(600 * time.Millisecond) // a step that ignores ctx
			return nil
		})
	})
	body := envelopeBody("step", "user-42", nil)
	send := func(ctx context.Context, name string) (int, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, f.server.URL+"/Worker", strings.NewReader(body))
		if err != nil {
			return 0, err
		}
		req.Header.Set("X-CloudTasks-QueueName", "jobs")
		req.Header.Set("X-CloudTasks-TaskName", name)
		req.Header.Set("X-CloudTasks-TaskRetryCount", "0")
		req.Header.Set("X-CloudTasks-TaskExecutionCount", "0")
		req.Header.Set("X-CloudTasks-TaskETA", fmt.Sprintf("%d.0", time.Now().Unix()))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	firstDone := make(chan error, 1)
	go func() {
		_, err := send(ctx, "t1")
		firstDone <- err
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the first delivery's job did not start")
	}
	time.AfterFunc(100*time.Millisecond, cancel) // the request ends 100 ms into the step
	time.Sleep(250 * time.Millisecond)
	status, err := send(t.Context(), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if status != tasks.StatusBusy {
		t.Errorf("redelivery at 250 ms, while the first run's step still ran = %d; want %d (busy)", status, tasks.StatusBusy)
	}
	if err := <-firstDone; err == nil {
		t.Errorf("the first delivery's request was not cut 100 ms into the step")
	}
	deadline := time.Now().Add(10 * time.Second)
	for (runs.Load() == 0 || running.Load() != 0) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := most.Load(); n != 1 {
		t.Errorf("the job ran %d times at once; want 1", n)
	}
	if n := runs.Load(); n != 1 {
		t.Errorf("the job ran %d times before the third delivery; want 1", n)
	}
	// The step is over: the lock was released when it returned.
	deadline = time.Now().Add(5 * time.Second)
	for {
		status, err = send(t.Context(), "t1")
		if err != nil {
			t.Fatal(err)
		}
		if status == tasks.StatusDone || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // the release may still be on its way
	}
	if status != tasks.StatusDone {
		t.Errorf("delivery after the step returned = %d; want %d", status, tasks.StatusDone)
	}
}
