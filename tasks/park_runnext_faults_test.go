package tasks_test

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// replyLostOnce is a wait list whose first FinishClaim is applied but
// answers an error, as a step whose commit applied and whose reply was lost
// (a gRPC UNAVAILABLE or a deadline after the commit reached the store).
type replyLostOnce struct {
	tasks.WaitList
	lost atomic.Bool
}

func (l *replyLostOnce) FinishClaim(ctx context.Context, lockID, done, runner string) (tasks.Waiter, bool, error) {
	wt, ok, err := l.WaitList.FinishClaim(ctx, lockID, done, runner)
	if err == nil && l.lost.CompareAndSwap(false, true) {
		return tasks.Waiter{}, false, errors.New("injected: FinishClaim applied, its reply lost")
	}
	return wt, ok, err
}

// TestParkRunNextStepReplyLost: a wake's step to the next parked task
// (FinishClaim) that the wait list applied but whose answer was an error
// claimed that task for the wake: the wake must still see that it runs.
// Three tasks parked behind a release: each runs once.
func TestParkRunNextStepReplyLost(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			var runs jobRuns
			f := newParkFleet(t, 2, time.Minute, &replyLostOnce{WaitList: list(t)}, nil, func(_ int, w *tasks.Worker) {
				w.Handle("job", runs.job)
			})
			<-parkBehind(t, f, "lost-step", time.Second, "A", "B", "C")
			runs.waitRuns(t, `"C"`, 1, 15*time.Second)
			deadline := time.Now().Add(5 * time.Second)
			for runs.count(`"B"`) == 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			runs.mu.Lock()
			got := slices.Clone(runs.runs)
			runs.mu.Unlock()
			for _, p := range []string{`"A"`, `"B"`, `"C"`} {
				if n := runs.count(p); n != 1 {
					t.Errorf("%s ran %d times, want once; runs %q, answers %v", p, n, got, f.statuses())
				}
			}
		})
	}
}

// TestParkRunNextStepReplyLostAtTheWire: as TestParkRunNextStepReplyLost,
// on Datastore, the reply of the step's commit lost at the wire: the
// emulator applied the commit, the client got UNAVAILABLE.
func TestParkRunNextStepReplyLostAtTheWire(t *testing.T) {
	var armed atomic.Bool
	list := dsWaitList(t, grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, method, req, reply, cc, opts...)
		if err == nil && strings.HasSuffix(method, "/Commit") && armed.CompareAndSwap(true, false) {
			return status.Error(codes.Unavailable, "injected: the commit applied, its reply lost")
		}
		return err
	}))
	var runs jobRuns
	f := newParkFleet(t, 2, time.Minute, list, nil, func(_ int, w *tasks.Worker) {
		w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
			if string(d.Payload) == `"A"` {
				armed.Store(true) // the next commit is the step from A to B
			}
			return runs.job(ctx, d)
		})
	})
	<-parkBehind(t, f, "lost-commit", time.Second, "A", "B", "C")
	runs.waitRuns(t, `"C"`, 1, 15*time.Second)
	deadline := time.Now().Add(5 * time.Second)
	for runs.count(`"B"`) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if armed.Load() {
		t.Fatal("no commit followed A's run")
	}
	runs.mu.Lock()
	got := slices.Clone(runs.runs)
	runs.mu.Unlock()
	for _, p := range []string{`"A"`, `"B"`, `"C"`} {
		if n := runs.count(p); n != 1 {
			t.Errorf("%s ran %d times, want once; runs %q, answers %v", p, n, got, f.statuses())
		}
	}
}

// TestParkRunNextStepReplyLostCoalescing: a coalescing task run by a wake
// whose step to the next task was applied but answered an error must not
// leave its key marked finished: a later delivery of that job on the lock
// id runs (it is not taken for a duplicate of a task that ran).
func TestParkRunNextStepReplyLostCoalescing(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			var runs jobRuns
			f := newParkFleet(t, 2, time.Minute, &replyLostOnce{WaitList: list(t)}, nil, func(_ int, w *tasks.Worker) {
				w.Handle("job", runs.job)
				w.Handle("sum", runs.job, tasks.Coalesce())
			})
			holder := outsider(t, f, time.Minute)
			if err := tasks.HandOff(holder, f.client, f.list, nil); err != nil {
				t.Fatal(err)
			}
			released := holdFor(t, holder, "lost-co", time.Second)
			enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "sum", LockID: "lost-co", Payload: payload("S1")} })
			waitAnswered(t, f, 1)
			enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "lost-co", Payload: payload("B")} })
			waitAnswered(t, f, 2)
			<-released
			deadline := time.Now().Add(5 * time.Second)
			for runs.count(`"B"`) == 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			// A new delivery of the coalescing job, nobody running it.
			enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "sum", LockID: "lost-co", Payload: payload("S2")} })
			deadline = time.Now().Add(5 * time.Second)
			for runs.count(`"S2"`) == 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			runs.mu.Lock()
			got := slices.Clone(runs.runs)
			runs.mu.Unlock()
			for _, p := range []string{`"S1"`, `"B"`, `"S2"`} {
				if n := runs.count(p); n != 1 {
					t.Errorf("%s ran %d times, want once; runs %q, answers %v", p, n, got, f.statuses())
				}
			}
		})
	}
}

// renewLoses makes the wrapped backend answer renewals of id with
// ErrNotHeld (the lock taken over) while lose is set.
type renewLoses struct {
	locking.Backend
	id   string
	lose *atomic.Bool
}

func (r renewLoses) Renew(ctx context.Context, req locking.Request) (locking.Grant, error) {
	if req.ID == r.id && r.lose.Load() {
		return locking.Grant{}, fmt.Errorf("injected: %w", locking.ErrNotHeld)
	}
	return r.Backend.Renew(ctx, req)
}

// loseLockInStep is a wait list whose step from the task named first to the
// next one is applied, then, before it answers, the wake's lock is lost
// (its renewal finds it taken over): the answer comes as the loss is known.
type loseLockInStep struct {
	tasks.WaitList
	first string // the done key of the step
	lose  *atomic.Bool
	fired atomic.Bool // the lock was lost in a step
}

func (l *loseLockInStep) FinishClaim(ctx context.Context, lockID, done, runner string) (tasks.Waiter, bool, error) {
	wt, ok, err := l.WaitList.FinishClaim(context.WithoutCancel(ctx), lockID, done, runner)
	if done == l.first && l.fired.CompareAndSwap(false, true) {
		l.lose.Store(true)
		select {
		case <-ctx.Done():
		case <-time.After(5 * time.Second):
		}
		l.lose.Store(false) // the lock's later holders renew
	}
	return wt, ok, err
}

// TestParkRunNextLockLostInStep: the wake's lock is lost during its step to
// the next parked task (the step applied): the next task must not start
// without the lock (its job's context already ended); it runs once, later,
// with a lock.
func TestParkRunNextLockLostInStep(t *testing.T) {
	const lease = time.Second
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			var runs jobRuns
			var lose atomic.Bool
			var unlocked atomic.Int32
			wl := &loseLockInStep{WaitList: list(t), lose: &lose}
			f := newParkFleet(t, 2, lease, wl, func(_ int, _ *atomic.Bool, b locking.Backend) locking.Backend {
				return renewLoses{Backend: b, id: "lost-lock", lose: &lose}
			}, func(_ int, w *tasks.Worker) {
				w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
					if ctx.Err() != nil {
						unlocked.Add(1)
						t.Logf("%s started with its context ended: %v", d.Payload, context.Cause(ctx))
					}
					if string(d.Payload) == `"A"` {
						wl.first = d.QueueName + "/" + d.TaskName
					}
					return runs.job(ctx, d)
				})
			})
			<-parkBehind(t, f, "lost-lock", time.Second, "A", "B", "C")
			runs.waitRuns(t, `"C"`, 1, 30*time.Second)
			runs.waitRuns(t, `"B"`, 1, 30*time.Second)
			time.Sleep(500 * time.Millisecond)
			if !wl.fired.Load() {
				t.Fatal("no step from A: the test tested nothing")
			}
			if n := unlocked.Load(); n != 0 {
				t.Errorf("%d jobs started with their lock lost, want none", n)
			}
			runs.mu.Lock()
			got := slices.Clone(runs.runs)
			runs.mu.Unlock()
			t.Logf("runs %q, answers %v", got, f.statuses())
		})
	}
}

// slowStep is a wait list whose step from the task named slow to the next
// one takes delay (a contended or slow store).
type slowStep struct {
	tasks.WaitList
	mu    sync.Mutex
	slow  string
	delay time.Duration
}

func (l *slowStep) FinishClaim(ctx context.Context, lockID, done, runner string) (tasks.Waiter, bool, error) {
	l.mu.Lock()
	slow := done != "" && done == l.slow
	l.mu.Unlock()
	if slow {
		time.Sleep(l.delay)
	}
	return l.WaitList.FinishClaim(ctx, lockID, done, runner)
}

// TestParkRunNextSlowStepDispatchDeadline: the run-next budget is cut so
// that a job started within it ends before the wake's dispatch deadline
// (15 s dispatch deadline, 10 s job deadline: 4 s). A step to the next task
// that began within it but ended after it (a slow store: 3 s) must not
// start that task's job there: started, it runs past the dispatch deadline,
// Cloud Tasks gives the wake up while it runs, and it starts again in the
// retry.
func TestParkRunNextSlowStepDispatchDeadline(t *testing.T) {
	var runs jobRuns
	var cStarts atomic.Int32
	wl := &slowStep{WaitList: &tasks.MemoryWaitList{}, delay: 3 * time.Second}
	env := fleetEnv{dispatch: 15 * time.Second, workers: []tasks.WorkerOption{tasks.WithJobDeadline(10 * time.Second)}}
	f := newParkFleetEnv(t, 2, time.Minute, wl, env, nil, func(_ int, w *tasks.Worker) {
		w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
			work := map[string]time.Duration{`"A"`: time.Second, `"B"`: 2500 * time.Millisecond, `"C"`: 9 * time.Second}[string(d.Payload)]
			switch string(d.Payload) {
			case `"B"`:
				wl.mu.Lock()
				wl.slow = d.QueueName + "/" + d.TaskName
				wl.mu.Unlock()
			case `"C"`:
				cStarts.Add(1)
			}
			select {
			case <-time.After(work):
			case <-ctx.Done():
				return context.Cause(ctx)
			}
			return runs.job(ctx, d)
		})
	})
	<-parkBehind(t, f, "slow-step", time.Second, "A", "B", "C")
	runs.waitRuns(t, `"C"`, 1, 60*time.Second)
	if n := cStarts.Load(); n != 1 {
		t.Errorf("C's job started %d times, want once", n)
	}
	for _, a := range f.srv.Attempts() {
		if a.Err != nil {
			t.Errorf("attempt %d of %s: %v (it ran %v)", a.Number, a.Task, a.Err, a.Responded.Sub(a.Dispatched).Round(time.Millisecond))
		}
	}
	t.Logf("answers %v", f.statuses())
}

// TestParkRunNextStepFaultsAtTheWire: the Datastore step to the next parked
// task (FinishClaim) meets an error at the wire, once, not applied: an
// ABORTED commit, an ABORTED lookup, an UNAVAILABLE begin, an UNAVAILABLE
// head query. Each parked task runs once, in the order parked.
func TestParkRunNextStepFaultsAtTheWire(t *testing.T) {
	for _, c := range []struct {
		method string
		code   codes.Code
	}{{"Commit", codes.Aborted}, {"Lookup", codes.Aborted}, {"BeginTransaction", codes.Unavailable}, {"RunQuery", codes.Unavailable}} {
		t.Run(c.method+"-"+c.code.String(), func(t *testing.T) {
			var armed, fired atomic.Bool
			list := dsWaitList(t, grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				if strings.HasSuffix(method, "/"+c.method) && armed.CompareAndSwap(true, false) {
					fired.Store(true)
					return status.Error(c.code, "injected")
				}
				return invoker(ctx, method, req, reply, cc, opts...)
			}))
			var runs jobRuns
			f := newParkFleet(t, 2, time.Minute, list, nil, func(_ int, w *tasks.Worker) {
				w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
					if string(d.Payload) == `"A"` {
						armed.Store(true) // the step from A to B meets the fault
					}
					return runs.job(ctx, d)
				})
			})
			<-parkBehind(t, f, "wire-"+c.method, time.Second, "A", "B", "C")
			runs.waitRuns(t, `"C"`, 1, 30*time.Second)
			time.Sleep(300 * time.Millisecond)
			if !fired.Load() {
				t.Fatal("the fault was not injected: the test tested nothing")
			}
			runs.mu.Lock()
			got := slices.Clone(runs.runs)
			runs.mu.Unlock()
			if want := []string{`"A"`, `"B"`, `"C"`}; !slices.Equal(got, want) {
				t.Errorf("runs %q, want %q; answers %v", got, want, f.statuses())
			}
		})
	}
}

// TestParkRunNextHandOffClientDeadline: a program that shares lock ids with
// parked tasks registers HandOff with its own Client (as HandOff's
// documentation says), whose dispatch deadline (15 s) is shorter than the
// Worker's (10 min, no job deadline: a 30 s run-next budget). The wake its
// release creates runs parked tasks of 4 s one after another: it must stop
// in time for its own dispatch deadline, not the Worker's; otherwise Cloud
// Tasks gives the wake up while a job runs (its context cancelled) and
// that job starts again in the retry.
func TestParkRunNextHandOffClientDeadline(t *testing.T) {
	var runs jobRuns
	var mu sync.Mutex
	starts := map[string]int{}
	f := newParkFleet(t, 2, time.Minute, &tasks.MemoryWaitList{}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
			mu.Lock()
			starts[string(d.Payload)]++
			mu.Unlock()
			select {
			case <-time.After(4 * time.Second):
			case <-ctx.Done():
				return context.Cause(ctx)
			}
			return runs.job(ctx, d)
		})
	})
	cfg := baseConfig(f.url)
	cfg.DispatchDeadline = 15 * time.Second
	other, err := tasks.NewClient(t.Context(), cfg, f.srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Close() })
	holder := outsider(t, f, time.Minute)
	if err := tasks.HandOff(holder, other, f.list, nil); err != nil {
		t.Fatal(err)
	}
	released := holdFor(t, holder, "other-deadline", time.Second)
	in := []string{"A", "B", "C", "D", "E"}
	for i, p := range in {
		enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "other-deadline", Payload: payload(p)} })
		waitAnswered(t, f, i+1)
	}
	<-released
	for _, p := range in {
		runs.waitRuns(t, `"`+p+`"`, 1, 90*time.Second)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, p := range in {
		if n := starts[`"`+p+`"`]; n != 1 {
			t.Errorf("%s's job started %d times, want once", p, n)
		}
	}
	for _, a := range f.srv.Attempts() {
		if a.Err != nil {
			t.Errorf("attempt %d of %s: %v", a.Number, a.Task, a.Err)
		}
	}
	t.Logf("answers %v", f.statuses())
}

// cancelInStep is a wait list whose step from the task first to the next
// one is applied, and then the delivery's context is cancelled (cancel),
// as DrainOnSIGTERM cancels the requests in flight at SIGTERM.
type cancelInStep struct {
	tasks.WaitList
	first  string
	cancel func()
}

func (l *cancelInStep) FinishClaim(ctx context.Context, lockID, done, runner string) (tasks.Waiter, bool, error) {
	wt, ok, err := l.WaitList.FinishClaim(ctx, lockID, done, runner)
	if done == l.first && l.cancel != nil {
		l.cancel()
		l.cancel = nil
	}
	return wt, ok, err
}

// TestParkRunNextShutdownInStep: the wake's request is cancelled (SIGTERM,
// DrainOnSIGTERM) during its step to the next parked task: that task's job
// does not start in the cancelled request, the wake is not answered done
// (it keeps the task claimed), and its retry runs it, once.
func TestParkRunNextShutdownInStep(t *testing.T) {
	mem := &tasks.MemoryWaitList{}
	list := &cancelInStep{WaitList: mem, first: "jobs/task-A"}
	srv := startQueue(t, taskstest.Options{}, nil) // wakes go to a queue nobody serves
	w := memoryParkWorker(t, list, srv.ClientOptions()...)
	var runs jobRuns
	var lateStarts atomic.Int32
	w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
		if ctx.Err() != nil {
			lateStarts.Add(1)
		}
		return runs.job(ctx, d)
	})
	now := time.Now()
	parkJobs(t, mem, "w1", now, "A", "B")
	ctx, cancel := context.WithCancelCause(t.Context())
	list.cancel = func() { cancel(errors.New("shutting down")) }
	rw := httptest.NewRecorder()
	w.ServeHTTP(rw, wakeRequest("wake-1", 0).WithContext(ctx))
	if n := lateStarts.Load(); n != 0 {
		t.Errorf("%d jobs started in the cancelled request, want none; runs %q", n, runs.runs)
	}
	if rw.Code/100 == 2 {
		t.Errorf("the cancelled wake was answered %d: nothing retries it, and B is its claim", rw.Code)
	}
	rw = httptest.NewRecorder()
	w.ServeHTTP(rw, wakeRequest("wake-1", 1))
	t.Logf("retry answered %d; runs %q", rw.Code, runs.runs)
	for _, p := range []string{`"A"`, `"B"`} {
		if n := runs.count(p); n != 1 {
			t.Errorf("%s ran %d times, want once; runs %q", p, n, runs.runs)
		}
	}
}

// TestParkRunNextCoalescingParkedWhileItRuns: a coalescing job run by a
// wake after another task, whose job is delivered again while it runs,
// parks a new run (its key's record, waiting again), which the wake's step
// claims and runs next: the job runs once more after the delivery, not
// less, not twice more.
func TestParkRunNextCoalescingParkedWhileItRuns(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			var runs jobRuns
			s1Running := make(chan struct{})
			s2Parked := make(chan struct{})
			f := newParkFleet(t, 2, time.Minute, list(t), nil, func(_ int, w *tasks.Worker) {
				w.Handle("job", runs.job)
				w.Handle("sum", func(ctx context.Context, d *tasks.Delivery) error {
					if string(d.Payload) == `"S1"` {
						close(s1Running)
						select {
						case <-s2Parked:
						case <-time.After(10 * time.Second):
						}
					}
					return runs.job(ctx, d)
				}, tasks.Coalesce())
			})
			holder := outsider(t, f, time.Minute)
			if err := tasks.HandOff(holder, f.client, f.list, nil); err != nil {
				t.Fatal(err)
			}
			released := holdFor(t, holder, "co-chain", time.Second)
			enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: "co-chain", Payload: payload("A")} })
			waitAnswered(t, f, 1)
			enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "sum", LockID: "co-chain", Payload: payload("S1")} })
			waitAnswered(t, f, 2)
			<-released
			select {
			case <-s1Running:
			case <-time.After(15 * time.Second):
				t.Fatal("S1 did not run")
			}
			enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "sum", LockID: "co-chain", Payload: payload("S2")} })
			waitAnswered(t, f, 3)
			close(s2Parked)
			runs.waitRuns(t, `"S2"`, 1, 15*time.Second)
			time.Sleep(300 * time.Millisecond)
			runs.mu.Lock()
			got := slices.Clone(runs.runs)
			runs.mu.Unlock()
			if want := []string{`"A"`, `"S1"`, `"S2"`}; !slices.Equal(got, want) {
				t.Errorf("runs %q, want %q; answers %v", got, want, f.statuses())
			}
			if n := wakes(f, 3); n != 1 {
				t.Errorf("%d wakes ran them, want 1 (S2 claimed by the step after S1)", n)
			}
		})
	}
}

// TestParkRunNextPermanentFailure: a job that fails for good (Permanent)
// in a wake's run of parked tasks ends it: that task is finished (never run
// again), and the next ones run, each once, in order.
func TestParkRunNextPermanentFailure(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			var runs jobRuns
			f := newParkFleet(t, 2, time.Minute, list(t), nil, func(_ int, w *tasks.Worker) {
				w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
					err := runs.job(ctx, d)
					if string(d.Payload) == `"B"` {
						return tasks.Permanent(errors.New("injected: B cannot succeed"))
					}
					return err
				})
			})
			<-parkBehind(t, f, "perm", time.Second, "A", "B", "C", "D")
			runs.waitRuns(t, `"D"`, 1, 15*time.Second)
			time.Sleep(500 * time.Millisecond)
			runs.mu.Lock()
			got := slices.Clone(runs.runs)
			runs.mu.Unlock()
			if want := []string{`"A"`, `"B"`, `"C"`, `"D"`}; !slices.Equal(got, want) {
				t.Errorf("runs %q, want %q; answers %v", got, want, f.statuses())
			}
			if st := f.statuses(); st[500]+st[503]+st[429] != 0 {
				t.Errorf("answers %v: a permanent failure is not retried", st)
			}
		})
	}
}
