package tasks_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// failHandoffs fails the first n CreateTask calls that create a Handoff wake.
func failHandoffs(n int32) (option.ClientOption, *atomic.Int32) {
	var failed atomic.Int32
	ic := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if r, ok := req.(*cloudtaskspb.CreateTaskRequest); ok && strings.Contains(string(r.GetTask().GetHttpRequest().GetBody()), `"kind":"handoff"`) {
			if failed.Add(1) <= n {
				return status.Error(codes.Unavailable, "injected: CreateTask failed")
			}
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	return option.WithGRPCDialOption(grpc.WithChainUnaryInterceptor(ic)), &failed
}

// TestParkSafetyWakeSurvivesItsOwnRun: a Safety wake that finds the lock
// free runs the oldest waiter; when the release that follows cannot create
// its Handoff (one CreateTask failure), the next waiter still has a Safety
// wake (taking a Safety arms the next one while waiters wait). The wakes
// run one task each (WithRunNext(0)): otherwise the Safety wake runs B
// after A itself, and no release hands off between them.
func TestParkSafetyWakeSurvivesItsOwnRun(t *testing.T) {
	const lease = time.Second
	var runs jobRuns
	fail, failed := failHandoffs(1)
	f := newParkFleetEnv(t, 2, lease, &tasks.MemoryWaitList{}, fleetEnv{workers: []tasks.WorkerOption{tasks.WithRunNext(0)}}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
			time.Sleep(200 * time.Millisecond)
			return runs.job(ctx, d)
		})
	}, fail)
	holder := outsider(t, f, lease) // no HandOff: its release hands off nothing
	released := holdFor(t, holder, "z1", 300*time.Millisecond)
	enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "z1", Payload: payload("A")} })
	waitAnswered(t, f, 1)
	enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "z1", Payload: payload("B")} })
	waitAnswered(t, f, 2)
	<-released
	runs.waitRuns(t, `"A"`, 1, 10*time.Second)
	time.Sleep(500 * time.Millisecond)
	if failed.Load() < 1 {
		t.Fatal("no handoff creation failed: the test tested nothing")
	}
	runs.waitRuns(t, `"B"`, 1, 15*time.Second) // lease is 1 s: any safety wake would be due long before
}

// TestParkSetAsideCoalescingWaiterFreesItsKey: a wake that sets aside a
// coalescing waiter (its job unknown on the instance the wake reached, and
// parked longer than UnknownJobGrace ago) must not mark the shared coalesce
// key finished: the next delivery of that job runs.
func TestParkSetAsideCoalescingWaiterFreesItsKey(t *testing.T) {
	const lease = time.Second
	list := &tasks.MemoryWaitList{}
	var runs jobRuns
	old := newParkFleet(t, 1, lease, list, nil, func(_ int, w *tasks.Worker) { w.Handle("other", runs.job) })
	body, _ := json.Marshal(map[string]any{"v": 1, "job": "refresh", "lockId": "c9", "enqueuedAt": time.Now().UTC()})
	key := "coalesce/jobs/refresh"
	if _, _, _, err := list.Park(t.Context(), "c9", tasks.Waiter{Key: key, Arrived: time.Now().Add(-tasks.UnknownJobGrace - time.Minute), Job: "refresh", Body: body, Coalesce: true}, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	holder := outsider(t, old, lease)
	if err := tasks.HandOff(holder, old.client, list, nil); err != nil {
		t.Fatal(err)
	}
	<-holdFor(t, holder, "c9", 100*time.Millisecond) // its release wakes the old worker, which sets the waiter aside
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, _, st, _, _ := list.Peek(t.Context(), "c9", key)
		if st != tasks.Waiting {
			t.Logf("the set-aside coalesce record is %v", st)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("coalesce record is %v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The new revision, which has the coalescing job, on the same wait list.
	nw := newParkFleet(t, 1, lease, list, nil, func(_ int, w *tasks.Worker) { w.Handle("refresh", runs.job, tasks.Coalesce()) })
	enqueueAll(t, nw.client, 1, func(int) tasks.Task { return tasks.Task{Job: "refresh", LockID: "c9", Payload: payload("new")} })
	runs.waitRuns(t, `"new"`, 1, 5*time.Second)
}

// TestParkRolloutAddingAJob: during a rolling deploy that adds a job, the
// wake of a task of that job parked a moment ago reaches an instance of the
// old revision first. It must not set the task aside (it did: the task was
// lost): the wake is answered 503 and keeps its claim, and its retry, on an
// instance that has the job, runs the task once.
func TestParkRolloutAddingAJob(t *testing.T) {
	const lease = time.Second
	list := &tasks.MemoryWaitList{}
	var runs jobRuns
	// The fleet's first delivery goes to worker 1, of the old revision;
	// worker 0 is of the new one.
	f := newParkFleet(t, 2, lease, list, nil, func(i int, w *tasks.Worker) {
		if i == 0 {
			w.Handle("new-job", runs.job)
		}
	})
	body, _ := json.Marshal(map[string]any{"v": 1, "job": "new-job", "lockId": "ro", "payload": "n", "enqueuedAt": time.Now().UTC()})
	if _, _, _, err := list.Park(t.Context(), "ro", tasks.Waiter{Key: "jobs/n1", Arrived: time.Now(), Job: "new-job", Body: body}, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	holder := outsider(t, f, lease)
	if err := tasks.HandOff(holder, f.client, list, nil); err != nil {
		t.Fatal(err)
	}
	<-holdFor(t, holder, "ro", 100*time.Millisecond) // its release hands off: a wake
	runs.waitRuns(t, `"n"`, 1, 20*time.Second)
	waitIdle(t, f.srv, 20*time.Second)
	if n := runs.count(`"n"`); n != 1 {
		t.Errorf("the task ran %d times, want once", n)
	}
	if st := f.statuses(); st[tasks.StatusRetry] < 1 {
		t.Errorf("answers %v; want the old revision's 503 (else the test tested nothing)", st)
	}
	if logs := f.logs.String(); strings.Contains(logs, "setting aside") {
		t.Errorf("the task was set aside:\n%s", logs)
	}
}

// memoryParkWorker is a Worker in park mode on an in-memory lock store
// (1 s leases) and list, creating its wakes through a client with opts.
func memoryParkWorker(t *testing.T, list tasks.WaitList, opts ...option.ClientOption) *tasks.Worker {
	t.Helper()
	locker, err := locking.New(locking.Config{Strong: memlock.New(), Lease: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	c, err := tasks.NewClient(t.Context(), baseConfig("http://127.0.0.1:1/Worker"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	w, err := tasks.NewWorker(locker, tasks.WithQueue("jobs"), tasks.WithParking(c, list))
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// wakeRequest is a delivery of a wake task (as the worker's own wakes are).
func wakeRequest(task string, retry int) *http.Request {
	body := fmt.Sprintf(`{"v":3,"job":"job","lockId":"w1","enqueuedAt":%q,"wake":{"kind":"handoff","epoch":1,"gen":7,"at":%q}}`,
		time.Now().UTC().Format(time.RFC3339Nano), time.Now().UTC().Format(time.RFC3339Nano))
	r := httptest.NewRequest(http.MethodPost, "/Worker", strings.NewReader(body))
	r.Header.Set("X-CloudTasks-QueueName", "jobs")
	r.Header.Set("X-CloudTasks-TaskName", task)
	r.Header.Set("X-CloudTasks-TaskRetryCount", fmt.Sprint(retry))
	return r
}

// TestParkOneRunnerOneClaim: a wake's run of A fails (A stays Running by
// the wake); a duplicate delivery of the same wake (retry count 0) must run
// A again, not claim B under the same runner and orphan A.
func TestParkOneRunnerOneClaim(t *testing.T) {
	list := &tasks.MemoryWaitList{}
	srv := startQueue(t, taskstest.Options{}, nil) // wakes go to a queue nobody serves
	w := memoryParkWorker(t, list, srv.ClientOptions()...)
	var runs jobRuns
	var failA atomic.Bool
	failA.Store(true)
	w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
		if string(d.Payload) == `"A"` && failA.Swap(false) {
			return errors.New("transient")
		}
		return runs.job(ctx, d)
	})
	now := time.Now()
	parkJobs(t, list, "w1", now, "A", "B")
	serve := func(r *http.Request) int {
		rw := httptest.NewRecorder()
		w.ServeHTTP(rw, r)
		return rw.Code
	}
	t.Logf("wake, first attempt: %d", serve(wakeRequest("wake-1", 0)))
	t.Logf("wake, duplicate delivery: %d", serve(wakeRequest("wake-1", 0)))
	t.Logf("wake, retry: %d", serve(wakeRequest("wake-1", 1)))
	_, _, st, runner, _ := list.Peek(t.Context(), "w1", "jobs/task-A")
	t.Logf("A: %v by %q; runs %q", st, runner, runs.runs)
	if runs.count(`"A"`) != 1 {
		t.Errorf("A ran %d times (successfully), want 1: it is %v by %q with nobody to run it", runs.count(`"A"`), st, runner)
	}
}

// TestParkDuplicateOfADirectRunDoesNotRun: a task that ran at once (lock
// free, nobody waiting) is remembered: a duplicate delivery does not run it
// again.
func TestParkDuplicateOfADirectRunDoesNotRun(t *testing.T) {
	list := &tasks.MemoryWaitList{}
	w := memoryParkWorker(t, list, deadEndpoint(t)...)
	var runs jobRuns
	w.Handle("job", runs.job)
	for range 2 {
		rw := httptest.NewRecorder()
		body := fmt.Sprintf(`{"v":1,"job":"job","lockId":"d1","payload":"once","enqueuedAt":%q}`, time.Now().UTC().Format(time.RFC3339Nano))
		w.ServeHTTP(rw, forgedDelivery(t, "same-task", body))
	}
	if n := runs.count(`"once"`); n != 1 {
		t.Errorf("one task name ran %d times", n)
	}
}

// disarmFails is a WaitList whose Disarm fails (the store is unreachable
// for that one call).
type disarmFails struct{ tasks.WaitList }

func (disarmFails) Disarm(context.Context, string, tasks.Wake) error {
	return errors.New("injected: disarm failed")
}

// TestParkRetryRecreatesAnUncreatedSafetyWake: the safety wake's
// CreateTask fails and so does its Disarm, so the wake stays pending,
// never created; the delivery's retry parks again and must create the
// pending wake under its name, behind a holder that does not hand off.
func TestParkRetryRecreatesAnUncreatedSafetyWake(t *testing.T) {
	const lease = time.Second
	var runs jobRuns
	fail, failed := failFirstWakes(1)
	f := newParkFleetWith(t, 2, lease, disarmFails{&tasks.MemoryWaitList{}}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("job", runs.job)
	}, fail)
	holder := outsider(t, f, lease)
	released := holdFor(t, holder, "o1", 8*time.Second)
	enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "o1", Payload: payload("x")} })
	<-released
	t.Logf("answers so far %v, wake creations failed %d", f.statuses(), failed.Load())
	runs.waitRuns(t, `"x"`, 1, 15*time.Second)
}

// failRelease fails the first Release of id on the wrapped backend.
type failRelease struct {
	locking.Backend
	id   string
	done *atomic.Bool
}

func (f failRelease) Release(ctx context.Context, id, owner string) error {
	if id == f.id && f.done.CompareAndSwap(false, true) {
		return errors.New("injected: release RPC failed")
	}
	return f.Backend.Release(ctx, id, owner)
}

// TestParkFailedReleaseLeavesASafetyWake: the release after a safety
// wake's run fails once (the lock then expires with its lease; no hook
// runs): the next waiter runs by the next Safety wake.
func TestParkFailedReleaseLeavesASafetyWake(t *testing.T) {
	const lease = time.Second
	var runs jobRuns
	var once atomic.Bool
	f := newParkFleet(t, 2, lease, &tasks.MemoryWaitList{}, func(_ int, _ *atomic.Bool, b locking.Backend) locking.Backend {
		return failRelease{Backend: b, id: "z2", done: &once}
	}, func(_ int, w *tasks.Worker) {
		w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
			time.Sleep(200 * time.Millisecond)
			return runs.job(ctx, d)
		})
	})
	holder := outsider(t, f, lease)
	released := holdFor(t, holder, "z2", 300*time.Millisecond)
	enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "z2", Payload: payload("A")} })
	waitAnswered(t, f, 1)
	enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "z2", Payload: payload("B")} })
	waitAnswered(t, f, 2)
	<-released
	runs.waitRuns(t, `"A"`, 1, 10*time.Second)
	time.Sleep(500 * time.Millisecond)
	if !once.Load() {
		t.Fatal("no release failed: the test tested nothing")
	}
	runs.waitRuns(t, `"B"`, 1, 15*time.Second)
}

// takeFailsOnce fails the first take of a Handoff wake: made inside the
// lock, with the wake's claim (TakeClaim), or alone (Take).
type takeFailsOnce struct {
	tasks.WaitList
	done *atomic.Bool
}

func (l takeFailsOnce) Take(ctx context.Context, id string, kind tasks.WakeKind, gen uint64, due time.Time) (bool, tasks.Wake, error) {
	if kind == tasks.Handoff && l.done.CompareAndSwap(false, true) {
		return false, tasks.Wake{}, errors.New("injected: take failed")
	}
	return l.WaitList.Take(ctx, id, kind, gen, due)
}

func (l takeFailsOnce) TakeClaim(ctx context.Context, id string, kind tasks.WakeKind, gen uint64, key, runner string) (tasks.Waiter, bool, error) {
	if kind == tasks.Handoff && l.done.CompareAndSwap(false, true) {
		return tasks.Waiter{}, false, errors.New("injected: take failed")
	}
	return l.WaitList.TakeClaim(ctx, id, kind, gen, key, runner)
}

// TestParkWakeWhoseTakeFailedDoesNotRun: when a wake's Take fails, its job
// must not run (the wake would stay pending, and no release would hand
// off); the wake's retry runs it, and every waiter runs.
func TestParkWakeWhoseTakeFailedDoesNotRun(t *testing.T) {
	const lease = time.Second
	var runs jobRuns
	var once atomic.Bool
	f := newParkFleet(t, 2, lease, takeFailsOnce{&tasks.MemoryWaitList{}, &once}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
			time.Sleep(200 * time.Millisecond)
			return runs.job(ctx, d)
		})
	})
	holder := outsider(t, f, lease)
	if err := tasks.HandOff(holder, f.client, f.list, nil); err != nil {
		t.Fatal(err)
	}
	released := holdFor(t, holder, "t1", 300*time.Millisecond)
	for i, p := range []string{"A", "B", "C"} {
		enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "t1", Payload: payload(p)} })
		waitAnswered(t, f, i+1)
	}
	<-released
	runs.waitRuns(t, `"A"`, 1, 10*time.Second)
	if !once.Load() {
		t.Fatal("no Take failed: the test tested nothing")
	}
	runs.waitRuns(t, `"C"`, 1, 15*time.Second)
	runs.mu.Lock()
	t.Logf("runs %q at %v", runs.runs, runs.at)
	runs.mu.Unlock()
}

// parkJobs parks, in list on lockID, one task of job "job" per payload (a
// JSON string), in that order, 1 ms apart from now, keyed "jobs/task-"+p,
// with their safety wakes an hour away.
func parkJobs(t *testing.T, list tasks.WaitList, lockID string, now time.Time, payloads ...string) {
	t.Helper()
	for i, p := range payloads {
		body, _ := json.Marshal(map[string]any{"v": 1, "job": "job", "lockId": lockID, "payload": p, "enqueuedAt": now.UTC()})
		if _, _, _, err := list.Park(t.Context(), lockID, tasks.Waiter{Key: "jobs/task-" + p, Arrived: now.Add(time.Duration(i) * time.Millisecond), Job: "job", Body: body}, now.Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
}
