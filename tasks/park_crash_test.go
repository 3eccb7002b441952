package tasks_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/tasks"
)

// errKilled is what a killed process's lock backend answers: its calls never
// reach the store.
var errKilled = errors.New("process killed")

// killable is a lock backend that stops reaching the store when its process
// is killed: no renewal, no release, as after SIGKILL.
type killable struct {
	locking.Backend
	dead *atomic.Bool
}

func (k killable) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if k.dead.Load() {
		return locking.Grant{}, errKilled
	}
	return k.Backend.Acquire(ctx, r)
}

func (k killable) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if k.dead.Load() {
		return locking.Grant{}, errKilled
	}
	return k.Backend.Renew(ctx, r)
}

func (k killable) Release(ctx context.Context, id, owner string) error {
	if k.dead.Load() {
		return errKilled
	}
	return k.Backend.Release(ctx, id, owner)
}

// TestParkHolderKilled kills the process holding a lock while its job runs,
// with tasks parked behind it: every parked task still runs (its safety net
// takes over once the dead holder's lease ends), once, never beside
// another, and the killed task runs again on Cloud Tasks' retry.
func TestParkHolderKilled(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) { testParkHolderKilled(t, list(t)) })
	}
}

func testParkHolderKilled(t *testing.T, list tasks.WaitList) {
	const parked, lease = 5, 2 * time.Second
	var (
		mu       sync.Mutex
		runs     = map[int]int{} // task -> completed runs
		last     time.Time       // end of the last completed run
		inside   atomic.Int32
		over     atomic.Int32
		victim   = make(chan int, 1) // worker index of the doomed run
		kill     = make(chan struct{})
		doomed   atomic.Bool
		killedAt time.Time
	)
	f := newParkFleet(t, 3, lease, list, func(_ int, dead *atomic.Bool, b locking.Backend) locking.Backend {
		return killable{Backend: b, dead: dead}
	}, func(i int, w *tasks.Worker) {
		w.Handle("crashy", func(ctx context.Context, d *tasks.Delivery) error {
			var p struct{ I int }
			if err := d.Decode(&p); err != nil {
				return tasks.Permanent(err)
			}
			if p.I == 0 && doomed.CompareAndSwap(false, true) {
				// The first run of task 0 dies in the middle: it never
				// ends, renews or releases; its request gets no answer.
				victim <- i
				<-kill
				return errKilled
			}
			if inside.Add(1) != 1 {
				over.Add(1)
			}
			defer inside.Add(-1)
			time.Sleep(100 * time.Millisecond)
			mu.Lock()
			runs[p.I]++
			last = time.Now()
			mu.Unlock()
			return nil
		})
	})
	enqueueAll(t, f.client, 1, func(int) tasks.Task {
		return tasks.Task{Job: "crashy", LockID: "doomed", Payload: map[string]int{"I": 0}}
	})
	dying := <-victim
	enqueueAll(t, f.client, parked, func(i int) tasks.Task {
		return tasks.Task{Job: "crashy", LockID: "doomed", Payload: map[string]int{"I": i + 1}}
	})
	// Let every delivery park behind the doomed holder.
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for f.statuses()[tasks.StatusParked] < parked {
		select {
		case <-ctx.Done():
			t.Fatalf("only %d deliveries parked; answers %v", f.statuses()[tasks.StatusParked], f.statuses())
		case <-time.After(10 * time.Millisecond):
		}
	}
	killedAt = time.Now()
	f.dead[dying].Store(true)
	close(kill)

	// Every parked task runs; then the killed one on its retry (the queue's
	// backoff, 5 s with deploy's settings).
	ctx, cancel = context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	var parkedDone time.Time
	for {
		mu.Lock()
		n, zero := 0, runs[0]
		for i := 1; i <= parked; i++ {
			if runs[i] > 0 {
				n++
			}
		}
		if n == parked && parkedDone.IsZero() {
			parkedDone = last
		}
		mu.Unlock()
		if n == parked && zero > 0 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%d of %d parked tasks ran, the killed one %d times; answers %v", n, parked, zero, f.statuses())
		case <-time.After(20 * time.Millisecond):
		}
	}
	waitIdle(t, f.srv, time.Minute)
	mu.Lock()
	defer mu.Unlock()
	for i := 0; i <= parked; i++ {
		if runs[i] != 1 {
			t.Errorf("task %d completed %d times, want once", i, runs[i])
		}
	}
	if over.Load() != 0 {
		t.Errorf("%d runs overlapped another", over.Load())
	}
	m := f.metrics(t)
	if got := m["taskguard.tasks.safety_nets{ran=true}"] + m["taskguard.tasks.safety_nets{ran=false}"]; got < 1 {
		t.Errorf("taskguard.tasks.safety_nets = %d; a safety net must have resumed the parked tasks", got)
	}
	t.Logf("holder killed with %d tasks parked (lease %v): they all ran %v after the kill; answers %v",
		parked, lease, parkedDone.Sub(killedAt).Round(time.Millisecond), f.statuses())
}
