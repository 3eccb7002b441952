// Package waitlisttest is the conformance suite of tasks.WaitList, in the
// manner of testing/fstest: every implementation runs Run.
package waitlisttest

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/tasks"
)

// Run checks the WaitList contract on lists made by newList, each test on a
// fresh list (or on fresh lock ids of a shared one: every test uses its own).
func Run(t *testing.T, newList func(t *testing.T) tasks.WaitList) {
	t.Run("ParkIsIdempotentAndKeepsFirstArrival", func(t *testing.T) { testPark(t, newList(t)) })
	t.Run("OldestIsFIFOByArrivalThenKey", func(t *testing.T) { testOldest(t, newList(t)) })
	t.Run("ClaimHasOneWinner", func(t *testing.T) { testClaim(t, newList(t)) })
	t.Run("FinishedIsRemembered", func(t *testing.T) { testFinish(t, newList(t)) })
	t.Run("LockIDsAreSeparate", func(t *testing.T) { testSeparate(t, newList(t)) })
	t.Run("CoalesceRecordIsRemovedByClaim", func(t *testing.T) { testCoalesce(t, newList(t)) })
}

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 123456000, time.UTC)

func lockID(t *testing.T) string { return "waitlisttest/" + t.Name() }

func park(t *testing.T, l tasks.WaitList, id string, w tasks.Waiter) tasks.WaiterState {
	t.Helper()
	st, err := l.Park(t.Context(), id, w)
	if err != nil {
		t.Fatalf("Park(%q, %q): %v", id, w.Key, err)
	}
	return st
}

func oldest(t *testing.T, l tasks.WaitList, id string) (tasks.Waiter, bool) {
	t.Helper()
	w, ok, err := l.Oldest(t.Context(), id)
	if err != nil {
		t.Fatalf("Oldest(%q): %v", id, err)
	}
	return w, ok
}

func state(t *testing.T, l tasks.WaitList, id, key string) (tasks.WaiterState, string) {
	t.Helper()
	st, runner, err := l.State(t.Context(), id, key)
	if err != nil {
		t.Fatalf("State(%q, %q): %v", id, key, err)
	}
	return st, runner
}

func claim(t *testing.T, l tasks.WaitList, id, key, runner string) bool {
	t.Helper()
	ok, err := l.Claim(t.Context(), id, key, runner)
	if err != nil {
		t.Fatalf("Claim(%q, %q, %q): %v", id, key, runner, err)
	}
	return ok
}

func testPark(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	if _, ok := oldest(t, l, id); ok {
		t.Fatal("a new lock id has a waiter")
	}
	if st, _ := state(t, l, id, "q/a"); st != tasks.Absent {
		t.Fatalf("state of a key never parked: %v, want absent", st)
	}
	body := []byte(`{"v":1,"job":"j","lockId":"l"}`)
	if st := park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: body}); st != tasks.Waiting {
		t.Fatalf("first Park: %v, want waiting", st)
	}
	if st := park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0.Add(time.Second), Body: []byte("other")}); st != tasks.Waiting {
		t.Fatalf("second Park of the key: %v, want waiting", st)
	}
	w, ok := oldest(t, l, id)
	if !ok || w.Key != "q/a" || !w.Arrived.Equal(t0) || string(w.Body) != string(body) {
		t.Fatalf("Oldest = %+v, %v; want q/a with the first Park's arrival %v and body", w, ok, t0)
	}

	// Concurrent parks of one new key leave one record, and nothing behind
	// once it is claimed.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Go(func() {
			st, err := l.Park(t.Context(), id, tasks.Waiter{Key: "q/b", Arrived: t0.Add(time.Duration(i+1) * time.Second), Body: body})
			if err == nil && st != tasks.Waiting {
				err = fmt.Errorf("concurrent Park: %v, want waiting", st)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, k := range []string{"q/a", "q/b"} {
		w, ok := oldest(t, l, id)
		if !ok || w.Key != k {
			t.Fatalf("Oldest = %q, %v; want %q", w.Key, ok, k)
		}
		if !claim(t, l, id, k, "r") {
			t.Fatalf("claim of %q failed", k)
		}
	}
	if w, ok := oldest(t, l, id); ok {
		t.Fatalf("after claiming every key, Oldest = %+v: a concurrent Park left a stray record", w)
	}
}

func testOldest(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	// Parked out of order; keys chosen so that key order differs from
	// arrival order.
	in := []tasks.Waiter{
		{Key: "q/c", Arrived: t0.Add(2 * time.Millisecond)},
		{Key: "q/a", Arrived: t0.Add(3 * time.Millisecond)},
		{Key: "q/z", Arrived: t0},
		{Key: "q/b", Arrived: t0.Add(2 * time.Millisecond)},
		{Key: "q/y", Arrived: t0.Add(time.Microsecond)},
	}
	for _, w := range in {
		w.Body = []byte(`{}`)
		park(t, l, id, w)
	}
	want := []string{"q/z", "q/y", "q/b", "q/c", "q/a"}
	for i, k := range want {
		w, ok := oldest(t, l, id)
		if !ok || w.Key != k {
			t.Fatalf("oldest #%d = %q (%v), want %q", i, w.Key, ok, k)
		}
		if !claim(t, l, id, k, fmt.Sprintf("runner-%d", i)) {
			t.Fatalf("claim of the oldest %q failed", k)
		}
	}
	if w, ok := oldest(t, l, id); ok {
		t.Fatalf("oldest after claiming all = %q", w.Key)
	}
}

func testClaim(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	if claim(t, l, id, "q/none", "r") {
		t.Fatal("claim of a key never parked succeeded")
	}
	park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: []byte(`{}`)})
	const n = 8
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		won  []string
		errs []error
	)
	for i := range n {
		wg.Go(func() {
			runner := fmt.Sprintf("r%d", i)
			ok, err := l.Claim(t.Context(), id, "q/a", runner)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
			}
			if ok {
				won = append(won, runner)
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("concurrent claims failed: %v", errs)
	}
	if len(won) != 1 {
		t.Fatalf("%d concurrent claims won (%v), want exactly 1", len(won), won)
	}
	if st, runner := state(t, l, id, "q/a"); st != tasks.Running || runner != won[0] {
		t.Fatalf("state after claim: %v by %q, want running by %q", st, runner, won[0])
	}
	if !claim(t, l, id, "q/a", won[0]) {
		t.Error("the winner's second claim (a retry of its run) failed")
	}
	if claim(t, l, id, "q/a", "another") {
		t.Error("another runner claimed a running record")
	}
	if _, ok := oldest(t, l, id); ok {
		t.Error("a running record is still in the list")
	}
	if st := park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: []byte(`{}`)}); st != tasks.Running {
		t.Errorf("Park of a running key: %v, want running (left as it is)", st)
	}
}

func testFinish(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: []byte(`{}`)})
	if !claim(t, l, id, "q/a", "r") {
		t.Fatal("claim failed")
	}
	if err := l.Finish(t.Context(), id, "q/a"); err != nil {
		t.Fatal(err)
	}
	if st, _ := state(t, l, id, "q/a"); st != tasks.Finished {
		t.Fatalf("state after Finish: %v", st)
	}
	if st := park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0.Add(time.Hour), Body: []byte(`{}`)}); st != tasks.Finished {
		t.Fatalf("Park of a finished key: %v, want finished (a late duplicate must not run)", st)
	}
	if claim(t, l, id, "q/a", "r") {
		t.Error("claim of a finished record succeeded")
	}
	if _, ok := oldest(t, l, id); ok {
		t.Error("a finished record is in the list")
	}
}

func testSeparate(t *testing.T, l tasks.WaitList) {
	a, b := lockID(t)+"/a", lockID(t)+"/b"
	park(t, l, a, tasks.Waiter{Key: "q/x", Arrived: t0, Body: []byte(`{}`)})
	if _, ok := oldest(t, l, b); ok {
		t.Fatal("a waiter of one lock id shows on another")
	}
	if st := park(t, l, b, tasks.Waiter{Key: "q/x", Arrived: t0, Body: []byte(`{}`)}); st != tasks.Waiting {
		t.Fatalf("the same key on another lock id: %v, want a new waiting record", st)
	}
}

func testCoalesce(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	c := tasks.Waiter{Key: "coalesce/q/job", Arrived: t0, Body: []byte(`{"first":true}`), Coalesce: true}
	park(t, l, id, c)
	if st := park(t, l, id, tasks.Waiter{Key: c.Key, Arrived: t0.Add(time.Second), Body: []byte(`{}`), Coalesce: true}); st != tasks.Waiting {
		t.Fatalf("second Park of a coalescing key: %v, want the waiting record", st)
	}
	w, ok := oldest(t, l, id)
	if !ok || w.Key != c.Key || !w.Coalesce || string(w.Body) != `{"first":true}` || !w.Arrived.Equal(t0) {
		t.Fatalf("Oldest = %+v, %v; want the first coalescing record, marked Coalesce", w, ok)
	}
	if !claim(t, l, id, c.Key, "r1") {
		t.Fatal("claim of a coalescing record failed")
	}
	if st, _ := state(t, l, id, c.Key); st != tasks.Absent {
		t.Fatalf("state after claiming a coalescing record: %v, want absent", st)
	}
	if claim(t, l, id, c.Key, "r1") {
		t.Error("a second claim of a removed coalescing record succeeded")
	}
	if st := park(t, l, id, tasks.Waiter{Key: c.Key, Arrived: t0.Add(2 * time.Second), Body: []byte(`{}`), Coalesce: true}); st != tasks.Waiting {
		t.Errorf("Park after the coalesced run was claimed: %v, want a new waiting record", st)
	}
}
