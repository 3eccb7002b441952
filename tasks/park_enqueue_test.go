package tasks_test

import (
	"bytes"
	"context"
	"errors"
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
)

// waitStarted waits until n runs started or d passed, and returns the
// task indexes in the order their runs started.
func (br *burstRuns) waitStarted(n int, d time.Duration) []int {
	limit := time.Now().Add(d)
	for time.Now().Before(limit) && len(br.order()) < n {
		time.Sleep(10 * time.Millisecond)
	}
	return br.order()
}

// creates counts the CreateTask calls through a connection, and fails
// those whose task body matches fail (when set).
type creates struct {
	n    atomic.Int64
	fail atomic.Pointer[[]byte]
}

func (c *creates) interceptor() option.ClientOption {
	return option.WithGRPCDialOption(grpc.WithChainUnaryInterceptor(
		func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if r, ok := req.(*cloudtaskspb.CreateTaskRequest); ok {
				c.n.Add(1)
				if f := c.fail.Load(); f != nil && bytes.Contains(r.GetTask().GetHttpRequest().GetBody(), *f) {
					return status.Error(codes.Unavailable, "injected: CreateTask unavailable")
				}
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}))
}

// TestParkAtEnqueueBurst enqueues a burst of 30 tasks on one lock id
// through a Client parking at enqueue, one after another as a loop in a
// program would: the first is created in the queue, the others are parked
// in the wait list, and the queue carries a handful of tasks in all (it
// carried 30 before: one per task). Each runs once, never two at once, in
// the order they were enqueued (the first may run second: the queue keeps
// no order, and may deliver it after the wake of those parked behind it).
func TestParkAtEnqueueBurst(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			const n, work = 30, 20 * time.Millisecond
			var (
				runs = newBurstRuns()
				cr   creates
			)
			f := newParkFleetWith(t, 3, 5*time.Second, list(t), nil, func(_ int, w *tasks.Worker) {
				w.Handle("serial", runs.job(work))
			}, cr.interceptor())
			if err := f.client.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
				t.Fatal(err)
			}
			for i := range n {
				if _, err := f.client.Enqueue(t.Context(), tasks.Task{Job: "serial", LockID: "hot", Payload: i}); err != nil {
					t.Fatal(err)
				}
			}
			runs.waitStarted(n, time.Minute)
			waitIdle(t, f.srv, time.Minute) // the wakes ran nothing more
			checkOnceInOrder(t, runs.order(), n)
			if o := runs.over.Load(); o > 0 {
				t.Errorf("%d runs overlapped another", o)
			}
			if c := cr.n.Load(); c > 5 {
				t.Errorf("%d CreateTask calls for a burst of %d parked at enqueue; want at most 5 (the first task, a hand-off and a safety wake or so)", c, n)
			}
			t.Logf("%d tasks: %d CreateTask, %d dispatches, answers %v", n, cr.n.Load(), len(f.srv.Attempts()), f.statuses())
		})
	}
}

// TestParkAtEnqueueConcurrentBurst enqueues a burst of 20 tasks on one
// lock id at once, from 20 goroutines (as an Enqueue function serving 20
// requests at a time would): one goes through the queue, and the others,
// begun while its CreateTask was under way, park (before, each found no
// task of the lock id sent yet, and all 20 went through the queue). Each
// runs once, never two at once.
func TestParkAtEnqueueConcurrentBurst(t *testing.T) {
	const n = 20
	var (
		runs = newBurstRuns()
		cr   creates
	)
	f := newParkFleetWith(t, 3, 5*time.Second, &tasks.MemoryWaitList{}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("serial", runs.job(10*time.Millisecond))
	}, cr.interceptor())
	if err := f.client.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
		t.Fatal(err)
	}
	enqueueAll(t, f.client, n, func(i int) tasks.Task {
		return tasks.Task{Job: "serial", LockID: "hot", Payload: i}
	})
	runs.waitStarted(n, time.Minute)
	waitIdle(t, f.srv, time.Minute)
	got := runs.order()
	seen := map[int]int{}
	for _, i := range got {
		seen[i]++
	}
	if len(got) != n || len(seen) != n {
		t.Errorf("runs %v; want each of 0..%d once", got, n-1)
	}
	if o := runs.over.Load(); o > 0 {
		t.Errorf("%d runs overlapped another", o)
	}
	if c := cr.n.Load(); c > 5 {
		t.Errorf("%d CreateTask calls for a concurrent burst of %d; want at most 5", c, n)
	}
	t.Logf("%d tasks enqueued at once: %d CreateTask, %d dispatches", n, cr.n.Load(), len(f.srv.Attempts()))
}

// checkOnceInOrder checks that got holds 0..n-1 once each, in order, but
// for 0, which may come second.
func checkOnceInOrder(t *testing.T, got []int, n int) {
	t.Helper()
	if len(got) != n {
		t.Fatalf("%d runs, want %d: %v", len(got), n, got)
	}
	want := make([]int, 0, n)
	for i := range n {
		want = append(want, i)
	}
	if n > 1 && got[0] == 1 && got[1] == 0 {
		want[0], want[1] = 1, 0
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("runs in the order %v; want %v", got, want)
		}
	}
}

// TestParkAtEnqueueBehindAHolder parks tasks at enqueue while a program
// of its own (a lock client with the hand-off registered, as
// lockhttp.Guard's would be) holds the lock: none runs while it holds it,
// and its release hands the lock to them, in enqueue order. A coalescing
// job's tasks enqueued meanwhile are absorbed into one run.
func TestParkAtEnqueueBehindAHolder(t *testing.T) {
	var (
		runs      = newBurstRuns()
		coalesced atomic.Int32
		cr        creates
	)
	f := newParkFleetWith(t, 2, 5*time.Second, &tasks.MemoryWaitList{}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("serial", runs.job(0))
		w.Handle("refresh", func(context.Context, *tasks.Delivery) error {
			coalesced.Add(1)
			return nil
		}, tasks.Coalesce())
	}, cr.interceptor())
	if err := f.client.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
		t.Fatal(err)
	}
	other, err := locking.New(locking.Config{Strong: f.newBackend(), Lease: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := tasks.HandOff(other, f.client, f.list, nil); err != nil {
		t.Fatal(err)
	}
	held, err := other.Acquire(t.Context(), "tenant")
	if err != nil {
		t.Fatal(err)
	}
	// The first task goes through the queue and parks behind the holder at
	// the Worker; the id is then busy for the Client, which parks the rest.
	for i := range 5 {
		if _, err := f.client.Enqueue(t.Context(), tasks.Task{Job: "serial", LockID: "tenant", Payload: i}); err != nil {
			t.Fatal(err)
		}
	}
	for range 5 {
		if _, err := f.client.Enqueue(t.Context(), tasks.Task{Job: "refresh", LockID: "tenant"}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	if got := runs.order(); len(got) > 0 || coalesced.Load() > 0 {
		t.Fatalf("ran %v and %d refreshes while the lock was held", got, coalesced.Load())
	}
	released := time.Now()
	if err := held.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	got := runs.waitStarted(5, 10*time.Second)
	took := time.Since(released)
	waitIdle(t, f.srv, time.Minute)
	checkOnceInOrder(t, runs.order(), 5)
	if c := coalesced.Load(); c != 1 {
		t.Errorf("the coalescing job ran %d times for 5 tasks enqueued behind the holder; want 1", c)
	}
	if took > 2*time.Second {
		t.Errorf("the parked tasks ran %v after the release; want within one dispatch (under 2 s)", took)
	}
	t.Logf("runs %v within %v of the release; %d CreateTask for 10 tasks", got, took, cr.n.Load())
}

// TestParkAtEnqueueDedup: a task's Name dedups it whichever way it went,
// through the queue or into the wait list.
func TestParkAtEnqueueDedup(t *testing.T) {
	runs := newBurstRuns()
	f := newParkFleet(t, 2, 5*time.Second, &tasks.MemoryWaitList{}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("serial", runs.job(50*time.Millisecond))
	})
	if err := f.client.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
		t.Fatal(err)
	}
	enqueue := func(name string, i int) error {
		_, err := f.client.Enqueue(t.Context(), tasks.Task{Job: "serial", LockID: "d", Payload: i, Name: name})
		return err
	}
	// "a" goes through the queue; at once again, it is parked at enqueue
	// (the id is busy for the Client) while the queue's copy may wait or
	// run: one of them runs.
	if err := enqueue("a", 1); err != nil {
		t.Fatal(err)
	}
	if err := enqueue("a", 1); err != nil && !errors.Is(err, tasks.ErrDuplicate) {
		t.Fatal(err)
	}
	// "b" is parked at enqueue; again, it is a duplicate of the parked one.
	if err := enqueue("b", 2); err != nil {
		t.Fatal(err)
	}
	if err := enqueue("b", 2); !errors.Is(err, tasks.ErrDuplicate) {
		t.Errorf("a second Enqueue of parked \"b\": %v; want ErrDuplicate", err)
	}
	runs.waitStarted(2, 10*time.Second)
	waitIdle(t, f.srv, time.Minute)
	// "b" ran: within the dedup window it is a duplicate still. Parked at
	// enqueue, Enqueue says so; through the queue (the id idle for the
	// Client) the Worker finds its record and does not run it.
	tasks.MarkBusy(f.client, "d")
	if err := enqueue("b", 2); !errors.Is(err, tasks.ErrDuplicate) {
		t.Errorf("Enqueue of \"b\" after it ran, parked: %v; want ErrDuplicate", err)
	}
	time.Sleep(tasks.BurstWindow + 100*time.Millisecond)
	if err := enqueue("b", 2); err != nil && !errors.Is(err, tasks.ErrDuplicate) {
		t.Fatal(err)
	}
	waitIdle(t, f.srv, time.Minute)
	time.Sleep(200 * time.Millisecond)
	got := runs.order()
	count := map[int]int{}
	for _, i := range got {
		count[i]++
	}
	if count[1] != 1 || count[2] != 1 || len(got) != 2 {
		t.Errorf("runs %v; want \"a\" (1) and \"b\" (2) once each", got)
	}
}

// TestParkAtEnqueueWakeFails: a task parked at enqueue whose safety wake
// cannot be created (Cloud Tasks failing) is not left waiting without one.
// Without a Name it is withdrawn and Enqueue fails, so that a retry runs it
// once; with a Name it stays parked, Enqueue fails, and a retry with that
// Name makes its wake (and is a duplicate).
func TestParkAtEnqueueWakeFails(t *testing.T) {
	var (
		runs = newBurstRuns()
		cr   creates
	)
	f := newParkFleetWith(t, 2, 5*time.Second, &tasks.MemoryWaitList{}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("serial", runs.job(0))
	}, cr.interceptor())
	if err := f.client.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
		t.Fatal(err)
	}
	holder, err := f.lockers[1].Acquire(t.Context(), "w")
	if err != nil {
		t.Fatal(err)
	}
	enqueue := func(name string, i int) error {
		tasks.MarkBusy(f.client, "w")
		_, err := f.client.Enqueue(t.Context(), tasks.Task{Job: "serial", LockID: "w", Payload: i, Name: name})
		return err
	}
	wake := []byte(`"wake":`)
	cr.fail.Store(&wake)
	if err := enqueue("", 1); err == nil || errors.Is(err, tasks.ErrDuplicate) {
		t.Fatalf("Enqueue with no wake possible: %v; want an error", err)
	}
	if head, ok, _, _, err := f.list.Peek(t.Context(), "w", ""); err != nil || ok {
		t.Fatalf("after the failed Enqueue the list holds %+v (%v, %v); want the task withdrawn", head, ok, err)
	}
	if err := enqueue("named", 2); err == nil || errors.Is(err, tasks.ErrDuplicate) {
		t.Fatalf("Enqueue of a named task with no wake possible: %v; want an error", err)
	}
	cr.fail.Store(nil)
	if err := enqueue("", 1); err != nil {
		t.Fatalf("retry of the unnamed task: %v", err)
	}
	if err := enqueue("named", 2); !errors.Is(err, tasks.ErrDuplicate) {
		t.Fatalf("retry of the named task: %v; want ErrDuplicate (it is parked)", err)
	}
	if err := holder.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	runs.waitStarted(2, 10*time.Second)
	waitIdle(t, f.srv, time.Minute)
	got := runs.order()
	count := map[int]int{}
	for _, i := range got {
		count[i]++
	}
	if len(got) != 2 || count[1] != 1 || count[2] != 1 {
		t.Errorf("runs %v; want 1 and 2 once each", got)
	}
}

// TestParkAtEnqueueWindow: a Client parks at enqueue only on a lock id it
// sent a task of through the queue within BurstWindow, or found held; a
// lone task, a delayed task, and a task after the window go through the
// queue.
func TestParkAtEnqueueWindow(t *testing.T) {
	var (
		runs = newBurstRuns()
		cr   creates
	)
	f := newParkFleetWith(t, 1, 5*time.Second, &tasks.MemoryWaitList{}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("serial", runs.job(0))
	}, cr.interceptor())
	if err := f.client.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
		t.Fatal(err)
	}
	step := func(what string, task tasks.Task, wantCreates int64) {
		t.Helper()
		before := cr.n.Load()
		if _, err := f.client.Enqueue(t.Context(), task); err != nil {
			t.Fatal(err)
		}
		runs.waitStarted(len(runs.order())+1, 5*time.Second)
		if got := cr.n.Load() - before; got != wantCreates {
			t.Errorf("%s: %d CreateTask; want %d", what, got, wantCreates)
		}
	}
	// Each runs before the next is enqueued: the lock is free each time.
	step("a lone task", tasks.Task{Job: "serial", LockID: "x", Payload: 0}, 1)
	step("a second task within the window (parked: its safety wake and a hand-off wake)", tasks.Task{Job: "serial", LockID: "x", Payload: 1}, 2)
	step("a task on another id", tasks.Task{Job: "serial", LockID: "y", Payload: 2}, 1)
	step("a delayed task", tasks.Task{Job: "serial", LockID: "y", Payload: 3, Delay: time.Millisecond}, 1)
	time.Sleep(tasks.BurstWindow)
	step("a task after the window", tasks.Task{Job: "serial", LockID: "x", Payload: 4}, 1)
	waitIdle(t, f.srv, time.Minute)
	if got := runs.order(); len(got) != 5 {
		t.Errorf("runs %v; want 5", got)
	}
	// The parked one was no Cloud Task: its wakes were.
	if a := len(f.srv.Attempts()); a != 6 {
		t.Errorf("%d dispatches; want 6 (4 tasks through the queue, 2 wakes)", a)
	}
	if err := (&tasks.Client{}).ParkAtEnqueue(nil, f.lockers[0]); !errors.Is(err, tasks.ErrInvalidConfig) {
		t.Errorf("ParkAtEnqueue without a wait list: %v; want ErrInvalidConfig", err)
	}
}

// TestParkAtEnqueueNamedCoalescingOnce: a named task of a coalescing job,
// enqueued again under its Name within the dedup window after it ran, is a
// duplicate and does not run again, also on a lock id the Client parks at
// enqueue (a coalescing job's waiter is keyed by its job, not its Name, so
// the wait list cannot dedup it by name: the queue must).
func TestParkAtEnqueueNamedCoalescingOnce(t *testing.T) {
	var ran atomic.Int32
	f := newParkFleet(t, 1, 5*time.Second, &tasks.MemoryWaitList{}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("refresh", func(context.Context, *tasks.Delivery) error {
			ran.Add(1)
			return nil
		}, tasks.Coalesce())
	})
	if err := f.client.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
		t.Fatal(err)
	}
	task := tasks.Task{Job: "refresh", LockID: "c", Name: "daily-2026-12-07"}
	if _, err := f.client.Enqueue(t.Context(), task); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, f.srv, time.Minute)
	if n := ran.Load(); n != 1 {
		t.Fatalf("the named task ran %d times; want 1", n)
	}
	// The lock id is busy for the Client (another task of it went through
	// the queue just now): the same Name again is still a duplicate.
	tasks.MarkBusy(f.client, "c")
	if _, err := f.client.Enqueue(t.Context(), task); !errors.Is(err, tasks.ErrDuplicate) {
		t.Errorf("Enqueue of the same Name after it ran: %v; want ErrDuplicate", err)
	}
	waitIdle(t, f.srv, time.Minute)
	time.Sleep(200 * time.Millisecond)
	if n := ran.Load(); n != 1 {
		t.Errorf("the named task ran %d times for one Name within the dedup window; want 1", n)
	}
}

// TestParkAtEnqueueRetryOnFreeLock: a named task parked at enqueue whose
// Enqueue failed (its safety wake could not be made) stays parked; the
// retry with its Name, a duplicate, makes its wake — and, the lock being
// free, hands it the lock: it runs within a dispatch, not a lease later at
// its safety wake.
func TestParkAtEnqueueRetryOnFreeLock(t *testing.T) {
	const lease = 10 * time.Second
	var (
		runs = newBurstRuns()
		cr   creates
	)
	f := newParkFleetWith(t, 2, lease, &tasks.MemoryWaitList{}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("serial", runs.job(0))
	}, cr.interceptor())
	if err := f.client.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
		t.Fatal(err)
	}
	task := tasks.Task{Job: "serial", LockID: "r", Payload: 7, Name: "retried"}
	wake := []byte(`"wake":`)
	cr.fail.Store(&wake)
	tasks.MarkBusy(f.client, "r")
	if _, err := f.client.Enqueue(t.Context(), task); err == nil || errors.Is(err, tasks.ErrDuplicate) {
		t.Fatalf("Enqueue with no wake possible: %v; want an error", err)
	}
	cr.fail.Store(nil)
	retried := time.Now()
	tasks.MarkBusy(f.client, "r")
	if _, err := f.client.Enqueue(t.Context(), task); !errors.Is(err, tasks.ErrDuplicate) {
		t.Fatalf("retry of the named task: %v; want ErrDuplicate (it is parked)", err)
	}
	got := runs.waitStarted(1, 2*lease)
	took := time.Since(retried)
	if len(got) != 1 {
		t.Fatalf("runs %v; want the parked task's", got)
	}
	if took > 2*time.Second {
		t.Errorf("the parked task ran %v after the retry of its Enqueue, the lock free; want within a dispatch (under 2 s)", took)
	}
	waitIdle(t, f.srv, time.Minute)
}

// cancelAfterPark is a WaitList whose Park ends the caller's request (calls
// cancel) once the record is made: the caller of Enqueue went away then.
type cancelAfterPark struct {
	tasks.WaitList
	cancel atomic.Pointer[context.CancelFunc]
}

func (l *cancelAfterPark) Park(ctx context.Context, lockID string, w tasks.Waiter, due time.Time) (tasks.WaiterState, bool, tasks.Wake, error) {
	st, created, wake, err := l.WaitList.Park(ctx, lockID, w, due)
	if c := l.cancel.Swap(nil); c != nil {
		(*c)()
	}
	return st, created, wake, err
}

// TestParkAtEnqueueCallerGone: a task parked at enqueue whose caller's
// context ends right after the park (the caller gave up: a timeout, a
// closed connection) still gets its wakes, and runs: nobody may retry it.
// Without a Name it would otherwise be withdrawn and lost with the
// caller's error unseen; with one it would wait, with no wake, on a free
// lock that nobody releases.
func TestParkAtEnqueueCallerGone(t *testing.T) {
	for _, name := range []string{"", "gone"} {
		t.Run("name="+name, func(t *testing.T) {
			runs := newBurstRuns()
			list := &cancelAfterPark{WaitList: &tasks.MemoryWaitList{}}
			f := newParkFleet(t, 2, 5*time.Second, list, nil, func(_ int, w *tasks.Worker) {
				w.Handle("serial", runs.job(0))
			})
			if err := f.client.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			list.cancel.Store(&cancel)
			tasks.MarkBusy(f.client, "g")
			_, err := f.client.Enqueue(ctx, tasks.Task{Job: "serial", LockID: "g", Payload: 3, Name: name})
			t.Logf("Enqueue, its caller gone after the park: %v", err)
			if got := runs.waitStarted(1, 15*time.Second); len(got) != 1 {
				t.Errorf("runs %v; want the parked task's once", got)
			}
			waitIdle(t, f.srv, time.Minute)
		})
	}
}

// TestParkAtEnqueueLazyClient: a LazyClient (the README's way to enqueue
// from a function of your own) parks bursts at enqueue too, given the wait
// list and lock client before its Client is built.
func TestParkAtEnqueueLazyClient(t *testing.T) {
	const n = 10
	var (
		runs = newBurstRuns()
		cr   creates
	)
	f := newParkFleetWith(t, 2, 5*time.Second, &tasks.MemoryWaitList{}, nil, func(_ int, w *tasks.Worker) {
		w.Handle("serial", runs.job(20*time.Millisecond))
	}, cr.interceptor())
	l := tasks.LazyClientFromEnv()
	tasks.SetConnect(l, func(context.Context, func(context.Context) (*tasks.Client, error)) (*tasks.Client, error) {
		return f.client, nil
	})
	if err := l.ParkAtEnqueue(nil, f.lockers[0]); !errors.Is(err, tasks.ErrInvalidConfig) {
		t.Errorf("ParkAtEnqueue without a wait list: %v; want ErrInvalidConfig", err)
	}
	if err := l.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if _, err := l.Enqueue(t.Context(), tasks.Task{Job: "serial", LockID: "lazy", Payload: i}); err != nil {
			t.Fatal(err)
		}
	}
	runs.waitStarted(n, time.Minute)
	waitIdle(t, f.srv, time.Minute)
	checkOnceInOrder(t, runs.order(), n)
	if c := cr.n.Load(); c > 5 {
		t.Errorf("%d CreateTask calls for a burst of %d through a LazyClient parking at enqueue; want at most 5", c, n)
	}
}
