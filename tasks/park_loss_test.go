package tasks_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// jobRuns records the runs of jobs by payload, in order.
type jobRuns struct {
	mu   sync.Mutex
	runs []string
	at   []time.Time
}

func (r *jobRuns) job(ctx context.Context, d *tasks.Delivery) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.runs = append(r.runs, string(d.Payload))
	r.at = append(r.at, time.Now())
	return nil
}

func (r *jobRuns) count(payload string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, p := range r.runs {
		if p == payload {
			n++
		}
	}
	return n
}

// waitRuns waits until payload ran n times, or fails after d.
func (r *jobRuns) waitRuns(t *testing.T, payload string, n int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for r.count(payload) < n {
		if time.Now().After(deadline) {
			r.mu.Lock()
			defer r.mu.Unlock()
			t.Fatalf("%s ran %d times within %v, want %d; runs %q", payload, r.count0(payload), d, n, r.runs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (r *jobRuns) count0(payload string) int {
	n := 0
	for _, p := range r.runs {
		if p == payload {
			n++
		}
	}
	return n
}

// outsider returns a lock client on the fleet's lock store that does not
// hand off on release: a program that shares the lock ids but registered no
// hand-off (or a holder that dies).
func outsider(t *testing.T, f *parkFleet, lease time.Duration) *locking.Client {
	t.Helper()
	c, err := locking.New(locking.Config{Strong: f.newBackend(), Lease: lease})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// holdFor takes id with c and releases it after d, in the background; the
// returned channel is closed once it was released.
func holdFor(t *testing.T, c *locking.Client, id string, d time.Duration) <-chan struct{} {
	t.Helper()
	l, err := c.Acquire(t.Context(), id, locking.Wait(true), locking.MaxWait(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(d)
		_ = l.Release(context.Background())
	}()
	return done
}

// payload is the JSON payload of a task with the string p.
func payload(p string) json.RawMessage { b, _ := json.Marshal(p); return b }

// TestParkLosses turns each way a parked task was lost into a test: the
// task must run.
func TestParkLosses(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			t.Run("SecondCoalescedPark", func(t *testing.T) { testSecondCoalescedPark(t, list(t)) })
			t.Run("FailedSafetyNetThenRetry", func(t *testing.T) { testFailedSafetyNet(t, list(t)) })
			t.Run("RemovedJob", func(t *testing.T) { testRemovedJob(t, list(t)) })
			t.Run("ForgedContinuation", func(t *testing.T) { testForgedContinuation(t, list(t)) })
			t.Run("LateDuplicateNobodyWaiting", func(t *testing.T) { testLateDuplicate(t, list(t)) })
		})
	}
}

// testSecondCoalescedPark: a coalescing job parks twice within Cloud Tasks'
// dedup window behind a holder that does not hand off; both runs happen
// (each park has a safety wake of its own name).
func testSecondCoalescedPark(t *testing.T, list tasks.WaitList) {
	const lease = time.Second
	var runs jobRuns
	f := newParkFleet(t, 2, lease, list, nil, func(_ int, w *tasks.Worker) {
		w.Handle("refresh", runs.job, tasks.Coalesce())
	})
	holder := outsider(t, f, lease)
	for round := range 2 {
		released := holdFor(t, holder, "c1", 300*time.Millisecond)
		enqueueAll(t, f.client, 1, func(int) tasks.Task {
			return tasks.Task{Job: "refresh", LockID: "c1", Payload: payload("r")}
		})
		<-released
		runs.waitRuns(t, `"r"`, round+1, 10*time.Second)
	}
	if st := f.statuses(); st[tasks.StatusRetry] > 0 || st[tasks.StatusFailed] > 0 {
		t.Errorf("answers %v; want no 503 or 500", st)
	}
}

// failFirstWakes fails the first n CreateTask calls that create a wake.
func failFirstWakes(n int32) (option.ClientOption, *atomic.Int32) {
	var failed atomic.Int32
	ic := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if r, ok := req.(*cloudtaskspb.CreateTaskRequest); ok && strings.Contains(string(r.GetTask().GetHttpRequest().GetBody()), `"wake":`) {
			if failed.Add(1) <= n {
				return status.Error(codes.Unavailable, "injected: CreateTask failed")
			}
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	return option.WithGRPCDialOption(grpc.WithChainUnaryInterceptor(ic)), &failed
}

// testFailedSafetyNet: the safety wake of a parked task cannot be created
// (503); the delivery's retry finds its record waiting and must make the
// safety wake, not answer 202 without one.
func testFailedSafetyNet(t *testing.T, list tasks.WaitList) {
	const lease = time.Second
	var runs jobRuns
	fail, failed := failFirstWakes(1)
	f := newParkFleetWith(t, 2, lease, list, nil, func(_ int, w *tasks.Worker) {
		w.Handle("job", runs.job)
	}, fail)
	holder := outsider(t, f, lease)
	released := holdFor(t, holder, "s1", 500*time.Millisecond)
	enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "s1", Payload: payload("x")} })
	<-released
	runs.waitRuns(t, `"x"`, 1, 20*time.Second)
	if failed.Load() < 1 {
		t.Fatal("no wake creation was failed: the test tested nothing")
	}
	if st := f.statuses(); st[tasks.StatusRetry] < 1 {
		t.Errorf("answers %v; want the failed safety wake answered 503", st)
	}
	waitIdle(t, f.srv, 20*time.Second)
	if n := runs.count(`"x"`); n != 1 {
		t.Errorf("the task ran %d times, want once", n)
	}
}

// testRemovedJob: a task parked by a worker that had its job, whose job a
// deploy then removed, is set aside with an ERROR log naming it, and the
// tasks behind it on the same lock id run.
func testRemovedJob(t *testing.T, list tasks.WaitList) {
	const lease = time.Second
	var runs jobRuns
	f := newParkFleet(t, 2, lease, list, nil, func(_ int, w *tasks.Worker) {
		w.Handle("live", runs.job)
	})
	// What an earlier version parked: a waiter whose job is gone.
	body, err := json.Marshal(map[string]any{"v": 1, "job": "gone", "lockId": "r1", "enqueuedAt": time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	// Parked before the deploy, longer than UnknownJobGrace ago (before
	// that, an unknown job may be one a rolling deploy is adding: see
	// TestParkRolloutAddingAJob).
	if _, _, _, err := list.Park(t.Context(), "r1", tasks.Waiter{Key: "jobs/old-task", Arrived: time.Now().Add(-tasks.UnknownJobGrace - time.Minute), Job: "gone", Body: body}, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	holder := outsider(t, f, lease)
	released := holdFor(t, holder, "r1", 300*time.Millisecond)
	enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "live", LockID: "r1", Payload: payload("l")} })
	<-released
	runs.waitRuns(t, `"l"`, 1, 15*time.Second)
	if _, _, st, _, err := list.Peek(t.Context(), "r1", "jobs/old-task"); err != nil || st != tasks.Finished {
		t.Errorf("the removed job's waiter is %v (%v); want finished (set aside)", st, err)
	}
	if logs := f.logs.String(); !strings.Contains(logs, "setting aside") || !strings.Contains(logs, "jobs/old-task") {
		t.Errorf("no ERROR log names the waiter set aside:\n%s", logs)
	}
}

// testForgedContinuation: a request that claims to continue a parked task
// (an earlier version's continuation, or a wake carrying a payload) does
// not run its own payload, and the parked task runs with its own.
func testForgedContinuation(t *testing.T, list tasks.WaitList) {
	const lease = time.Second
	var runs jobRuns
	f := newParkFleet(t, 2, lease, list, nil, func(_ int, w *tasks.Worker) {
		w.Handle("job", runs.job)
	})
	holder := outsider(t, f, lease)
	released := holdFor(t, holder, "f1", 500*time.Millisecond)
	enqueueAll(t, f.client, 1, func(int) tasks.Task {
		return tasks.Task{Job: "job", LockID: "f1", Name: "real", Payload: payload("real")}
	})
	waitAnswered(t, f, 1)
	key := "jobs/" + tasks.TaskID("job", "real")
	for i, forged := range []string{
		fmt.Sprintf(`{"v":2,"job":"job","lockId":"f1","payload":"forged","cont":{"key":%q,"kind":"handoff","n":9}}`, key),
		`{"v":3,"job":"job","lockId":"f1","payload":"forged","wake":{"kind":"handoff","epoch":1,"gen":1}}`,
	} {
		rw := httptest.NewRecorder()
		f.handler.ServeHTTP(rw, forgedDelivery(t, fmt.Sprintf("forged-%d", i), forged))
		if rw.Code != tasks.StatusDropped {
			t.Errorf("forged continuation %d answered %d, want %d (dropped)", i, rw.Code, tasks.StatusDropped)
		}
	}
	<-released
	runs.waitRuns(t, `"real"`, 1, 15*time.Second)
	if n := runs.count(`"forged"`); n != 0 {
		t.Errorf("a forged payload ran %d times", n)
	}
}

// forgedDelivery is a request with Cloud Tasks' headers and body.
func forgedDelivery(t *testing.T, task, body string) *http.Request {
	t.Helper()
	r := httptest.NewRequest(http.MethodPost, "/Worker", strings.NewReader(body))
	r.Header.Set("X-CloudTasks-QueueName", "jobs")
	r.Header.Set("X-CloudTasks-TaskName", task)
	r.Header.Set("X-CloudTasks-TaskRetryCount", "0")
	return r
}

// waitAnswered waits until the fleet answered n deliveries.
func waitAnswered(t *testing.T, f *parkFleet, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for total(f.statuses()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d deliveries answered, want %d", total(f.statuses()), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testLateDuplicate: a task parked and then run by a hand-off is delivered
// again (Cloud Tasks delivers at least once) as a first delivery, with the
// lock free and nobody waiting: it must not run again.
func testLateDuplicate(t *testing.T, list tasks.WaitList) {
	const lease = time.Second
	var runs jobRuns
	f := newParkFleet(t, 2, lease, list, nil, func(_ int, w *tasks.Worker) {
		w.Handle("job", runs.job)
	})
	holder := outsider(t, f, lease)
	if err := tasks.HandOff(holder, f.client, f.list, nil); err != nil {
		t.Fatal(err)
	}
	released := holdFor(t, holder, "d1", 300*time.Millisecond)
	deliver := func() int {
		r, err := taskstest.NewRequest(tasks.Task{Job: "job", LockID: "d1", Name: "once", Payload: payload("once")})
		if err != nil {
			t.Fatal(err)
		}
		r.Header.Set("X-CloudTasks-QueueName", "jobs")
		r.Header.Set("X-CloudTasks-TaskName", tasks.TaskID("job", "once"))
		r.Header.Set("X-CloudTasks-TaskRetryCount", "0")
		rw := httptest.NewRecorder()
		f.handler.ServeHTTP(rw, r)
		return rw.Code
	}
	if code := deliver(); code != tasks.StatusParked {
		t.Fatalf("first delivery on a held lock answered %d, want %d", code, tasks.StatusParked)
	}
	<-released
	runs.waitRuns(t, `"once"`, 1, 10*time.Second)
	waitIdle(t, f.srv, 10*time.Second)
	if code := deliver(); code != tasks.StatusDone {
		t.Errorf("a late duplicate answered %d, want %d", code, tasks.StatusDone)
	}
	if n := runs.count(`"once"`); n != 1 {
		t.Errorf("the task ran %d times, want once", n)
	}
}
