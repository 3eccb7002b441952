package tasks_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/tasks"
)

// TestParkCoalescing: 50 deliveries of a coalescing job on a held lock run
// the job at most twice, and a run starts after the last delivery.
func TestParkCoalescing(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) { testParkCoalescing(t, list(t)) })
	}
}

func testParkCoalescing(t *testing.T, list tasks.WaitList) {
	const n = 50
	var (
		mu      sync.Mutex
		starts  []time.Time
		held    = make(chan struct{})
		release = make(chan struct{})
	)
	f := newParkFleet(t, 3, 5*time.Second, list, nil, func(_ int, w *tasks.Worker) {
		w.Handle("hold", func(ctx context.Context, d *tasks.Delivery) error {
			close(held)
			<-release
			return nil
		})
		w.Handle("refresh", func(ctx context.Context, d *tasks.Delivery) error {
			mu.Lock()
			starts = append(starts, time.Now())
			mu.Unlock()
			time.Sleep(20 * time.Millisecond)
			return nil
		}, tasks.Coalesce())
	})
	enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "hold", LockID: "user-7"} })
	<-held
	enqueueAll(t, f.client, n, func(i int) tasks.Task {
		return tasks.Task{Job: "refresh", LockID: "user-7", Payload: map[string]int{"I": i}}
	})
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	for total(f.statuses()) < n {
		select {
		case <-ctx.Done():
			t.Fatalf("%d of %d deliveries answered: %v", total(f.statuses()), n, f.statuses())
		case <-time.After(10 * time.Millisecond):
		}
	}
	lastDelivery := time.Now()
	answered := f.statuses()
	close(release)
	waitIdle(t, f.srv, time.Minute)

	mu.Lock()
	defer mu.Unlock()
	if len(starts) == 0 || len(starts) > 2 {
		t.Errorf("the coalescing job ran %d times for %d deliveries on a held lock; want 1 or 2", len(starts), n)
	}
	if len(starts) > 0 && starts[len(starts)-1].Before(lastDelivery) {
		t.Errorf("no run started after the last delivery was answered")
	}
	if got := f.metrics(t)["taskguard.tasks.coalesced"]; got != int64(answered[tasks.StatusDone]) {
		t.Errorf("taskguard.tasks.coalesced = %d, want the %d deliveries absorbed", got, answered[tasks.StatusDone])
	}
	for status, c := range f.statuses() {
		if status != tasks.StatusParked && status != tasks.StatusDone {
			t.Errorf("%d deliveries answered %d", c, status)
		}
	}
	t.Logf("%d deliveries on a held lock: %d parked, %d coalesced; the job ran %d time(s)",
		n, answered[tasks.StatusParked], answered[tasks.StatusDone], len(starts))
}

func total(m map[int]int) int {
	s := 0
	for _, c := range m {
		s += c
	}
	return s
}
