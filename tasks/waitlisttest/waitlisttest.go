// Package waitlisttest is the conformance suite of tasks.WaitList, in the
// manner of testing/fstest: every implementation runs Run.
package waitlisttest

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/tasks"
)

// Run checks the WaitList contract on lists made by newList, each test on a
// fresh list (or on fresh lock ids of a shared one: every test uses its own).
func Run(t *testing.T, newList func(t *testing.T) tasks.WaitList) {
	t.Run("ParkIsIdempotent", func(t *testing.T) { testPark(t, newList(t)) })
	t.Run("FIFOByArrivalThenKey", func(t *testing.T) { testFIFO(t, newList(t)) })
	t.Run("ManyWaitersAndHoles", func(t *testing.T) { testMany(t, newList(t)) })
	t.Run("ClaimHasOneWinner", func(t *testing.T) { testClaim(t, newList(t)) })
	t.Run("FinishedIsRemembered", func(t *testing.T) { testFinish(t, newList(t)) })
	t.Run("FinishTakesAWaiterOut", func(t *testing.T) { testFinishWaiting(t, newList(t)) })
	t.Run("LockIDsAreSeparate", func(t *testing.T) { testSeparate(t, newList(t)) })
	t.Run("CoalesceRecordLeavesItsKey", func(t *testing.T) { testCoalesce(t, newList(t)) })
	t.Run("OneSafetyWake", func(t *testing.T) { testSafety(t, newList(t)) })
	t.Run("OneHandoffWake", func(t *testing.T) { testHandoff(t, newList(t)) })
	t.Run("StaleWakeIsArmedAgain", func(t *testing.T) { testStale(t, newList(t)) })
	t.Run("ConcurrentArmsArmOne", func(t *testing.T) { testConcurrentArm(t, newList(t)) })
	t.Run("LargeBody", func(t *testing.T) { testLargeBody(t, newList(t)) })
	t.Run("TakeClaimIsOneStep", func(t *testing.T) { testTakeClaim(t, newList(t)) })
	t.Run("TakeClaimHasOneWinner", func(t *testing.T) { testTakeClaimRace(t, newList(t)) })
	t.Run("FinishClaimIsOneStep", func(t *testing.T) { testFinishClaim(t, newList(t)) })
	t.Run("FinishClaimHasOneWinner", func(t *testing.T) { testFinishClaimRace(t, newList(t)) })
}

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 123456000, time.UTC)

func lockID(t *testing.T) string { return "waitlisttest/" + t.Name() }

// far is a safety due time far enough ahead never to be stale.
func far() time.Time { return time.Now().Add(time.Hour) }

func park(t *testing.T, l tasks.WaitList, id string, w tasks.Waiter) (tasks.WaiterState, bool, tasks.Wake) {
	t.Helper()
	if w.Job == "" {
		w.Job = "job"
	}
	st, created, wake, err := l.Park(t.Context(), id, w, far())
	if err != nil {
		t.Fatalf("Park(%q, %q): %v", id, w.Key, err)
	}
	return st, created, wake
}

func peek(t *testing.T, l tasks.WaitList, id, key string) (tasks.Waiter, bool, tasks.WaiterState, string) {
	t.Helper()
	w, ok, st, runner, err := l.Peek(t.Context(), id, key)
	if err != nil {
		t.Fatalf("Peek(%q, %q): %v", id, key, err)
	}
	if w.Body != nil {
		t.Fatalf("Peek returned a body")
	}
	return w, ok, st, runner
}

func oldest(t *testing.T, l tasks.WaitList, id string) (tasks.Waiter, bool) {
	t.Helper()
	w, ok, _, _ := peek(t, l, id, "")
	return w, ok
}

func state(t *testing.T, l tasks.WaitList, id, key string) (tasks.WaiterState, string) {
	t.Helper()
	_, _, st, runner := peek(t, l, id, key)
	return st, runner
}

func claim(t *testing.T, l tasks.WaitList, id, key, runner string) (tasks.Waiter, bool) {
	t.Helper()
	w, ok, err := l.Claim(t.Context(), id, key, runner)
	if err != nil {
		t.Fatalf("Claim(%q, %q, %q): %v", id, key, runner, err)
	}
	return w, ok
}

func finish(t *testing.T, l tasks.WaitList, id, key, runner string) {
	t.Helper()
	if err := l.Finish(t.Context(), id, key, runner); err != nil {
		t.Fatalf("Finish(%q, %q, %q): %v", id, key, runner, err)
	}
}

func arm(t *testing.T, l tasks.WaitList, id string, kind tasks.WakeKind, due time.Time) tasks.Wake {
	t.Helper()
	w, err := l.Arm(t.Context(), id, kind, due)
	if err != nil {
		t.Fatalf("Arm(%q, %v): %v", id, kind, err)
	}
	return w
}

func take(t *testing.T, l tasks.WaitList, id string, w tasks.Wake, safetyDue time.Time) (bool, tasks.Wake) {
	t.Helper()
	ok, next, err := l.Take(t.Context(), id, w.Kind, w.Gen, safetyDue)
	if err != nil {
		t.Fatalf("Take(%q, %v %d): %v", id, w.Kind, w.Gen, err)
	}
	return ok, next
}

// sameWake reports whether a and b name the same wake task.
func sameWake(a, b tasks.Wake) bool { return a.Epoch == b.Epoch && a.Gen == b.Gen }

func testPark(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	if _, ok := oldest(t, l, id); ok {
		t.Fatal("a new lock id has a waiter")
	}
	if st, _ := state(t, l, id, "q/a"); st != tasks.Absent {
		t.Fatalf("state of a key never parked: %v, want absent", st)
	}
	body := []byte(`{"v":1,"job":"j","lockId":"l"}`)
	if st, created, _ := park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Job: "j", Body: body}); st != tasks.Waiting || !created {
		t.Fatalf("first Park: %v created=%v, want waiting, created", st, created)
	}
	if st, created, _ := park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0.Add(time.Second), Body: []byte("other")}); st != tasks.Waiting || created {
		t.Fatalf("second Park of the key: %v created=%v, want waiting, not created", st, created)
	}
	w, ok := oldest(t, l, id)
	if !ok || w.Key != "q/a" || !w.Arrived.Equal(t0) || w.Job != "j" {
		t.Fatalf("Peek = %+v, %v; want q/a of job j with the first Park's arrival %v", w, ok, t0)
	}

	// Concurrent parks of one new key leave one record, created once.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	creators := 0
	for i := range 8 {
		wg.Go(func() {
			st, created, _, err := l.Park(t.Context(), id, tasks.Waiter{Key: "q/b", Job: "j", Arrived: t0.Add(time.Duration(i+1) * time.Second), Body: body}, far())
			mu.Lock()
			defer mu.Unlock()
			if err == nil && st != tasks.Waiting {
				err = fmt.Errorf("concurrent Park: %v, want waiting", st)
			}
			if err != nil {
				errs = append(errs, err)
			}
			if created {
				creators++
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 || creators != 1 {
		t.Fatalf("concurrent parks of one key: %d created it, errors %v; want 1, none", creators, errs)
	}
	for _, k := range []string{"q/a", "q/b"} {
		w, ok := oldest(t, l, id)
		if !ok || w.Key != k {
			t.Fatalf("Peek = %q, %v; want %q", w.Key, ok, k)
		}
		got, ok := claim(t, l, id, k, "r-"+k)
		if !ok || !bytes.Equal(got.Body, body) {
			t.Fatalf("claim of %q: %v, body %q; want the first Park's body", k, ok, got.Body)
		}
	}
	if w, ok := oldest(t, l, id); ok {
		t.Fatalf("after claiming every key, Peek = %+v: a concurrent Park left a stray record", w)
	}
}

func testFIFO(t *testing.T, l tasks.WaitList) {
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
	for i, k := range []string{"q/z", "q/y", "q/b", "q/c", "q/a"} {
		got, ok := oldest(t, l, id)
		if !ok || got.Key != k {
			t.Fatalf("oldest #%d = %q (%v), want %q", i, got.Key, ok, k)
		}
		if _, ok := claim(t, l, id, k, fmt.Sprintf("runner-%d", i)); !ok {
			t.Fatalf("claim of the oldest %q failed", k)
		}
	}
	if w, ok := oldest(t, l, id); ok {
		t.Fatalf("oldest after claiming all = %q", w.Key)
	}
}

// testMany parks more waiters than an implementation may list in one
// place, takes some out of the middle and checks the order of the rest.
func testMany(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	const n = 75
	var want []string
	for i := range n {
		k := fmt.Sprintf("q/%03d", i)
		park(t, l, id, tasks.Waiter{Key: k, Arrived: t0, Body: []byte(`{}`)})
		want = append(want, k)
	}
	// Out of the middle and the front, as a late duplicate's run does.
	for _, i := range []int{0, 1, 2, 40, 41, 70} {
		finish(t, l, id, want[i], "")
	}
	var rest []string
	for i, k := range want {
		switch i {
		case 0, 1, 2, 40, 41, 70:
		default:
			rest = append(rest, k)
		}
	}
	for i := 0; i < len(rest); i++ {
		k := rest[i]
		got, ok := oldest(t, l, id)
		if !ok || got.Key != k {
			t.Fatalf("oldest #%d = %q (%v), want %q", i, got.Key, ok, k)
		}
		if _, ok := claim(t, l, id, k, "r-"+k); !ok {
			t.Fatalf("claim of %q failed", k)
		}
		if i == 10 {
			// A newcomer goes to the back.
			park(t, l, id, tasks.Waiter{Key: "q/late", Arrived: t0, Body: []byte(`{}`)})
			rest = append(rest, "q/late")
		}
	}
	if w, ok := oldest(t, l, id); ok {
		t.Fatalf("oldest after claiming all = %q", w.Key)
	}
}

func testClaim(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	if _, ok := claim(t, l, id, "q/none", "r"); ok {
		t.Fatal("claim of a key never parked succeeded")
	}
	park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: []byte(`{"a":1}`)})
	won := raceOnce(t, "claims", func(runner string) (tasks.Waiter, bool, error) {
		return l.Claim(t.Context(), id, "q/a", runner)
	})
	if st, runner := state(t, l, id, "q/a"); st != tasks.Running || runner != won[0] {
		t.Fatalf("state after claim: %v by %q, want running by %q", st, runner, won[0])
	}
	if w, ok := claim(t, l, id, "q/a", won[0]); !ok || string(w.Body) != `{"a":1}` {
		t.Errorf("the winner's second claim (a retry of its run): %v, body %q", ok, w.Body)
	}
	if _, ok := claim(t, l, id, "q/a", "another"); ok {
		t.Error("another runner claimed a running record")
	}
	if w, ok, err := l.Running(t.Context(), id, won[0]); err != nil || !ok || w.Key != "q/a" || string(w.Body) != `{"a":1}` {
		t.Errorf("Running(winner) = %+v, %v, %v; want q/a with its body", w, ok, err)
	}
	if _, ok, err := l.Running(t.Context(), id, "another"); err != nil || ok {
		t.Errorf("Running(another runner) = %v, %v; want nothing", ok, err)
	}
	if _, ok := oldest(t, l, id); ok {
		t.Error("a running record is still in the list")
	}
	if st, created, _ := park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: []byte(`{}`)}); st != tasks.Running || created {
		t.Errorf("Park of a running key: %v created=%v, want running (left as it is)", st, created)
	}
}

func testFinish(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: []byte(`{}`)})
	if _, ok := claim(t, l, id, "q/a", "r"); !ok {
		t.Fatal("claim failed")
	}
	finish(t, l, id, "q/a", "r")
	if st, _ := state(t, l, id, "q/a"); st != tasks.Finished {
		t.Fatalf("state after Finish: %v", st)
	}
	if _, ok, err := l.Running(t.Context(), id, "r"); err != nil || ok {
		t.Fatalf("Running after Finish: %v, %v; want nothing", ok, err)
	}
	if st, created, _ := park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0.Add(time.Hour), Body: []byte(`{}`)}); st != tasks.Finished || created {
		t.Fatalf("Park of a finished key: %v, want finished (a late duplicate must not run)", st)
	}
	if _, ok := claim(t, l, id, "q/a", "r"); ok {
		t.Error("claim of a finished record succeeded")
	}
	if _, ok := oldest(t, l, id); ok {
		t.Error("a finished record is in the list")
	}
	// A key that never parked (a run with no record) is remembered too.
	finish(t, l, id, "q/direct", "")
	if st, _ := state(t, l, id, "q/direct"); st != tasks.Finished {
		t.Errorf("state of a key finished without a record: %v, want finished", st)
	}
}

func testFinishWaiting(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: []byte(`{}`)})
	park(t, l, id, tasks.Waiter{Key: "q/b", Arrived: t0, Body: []byte(`{}`)})
	finish(t, l, id, "q/a", "")
	if w, ok := oldest(t, l, id); !ok || w.Key != "q/b" {
		t.Fatalf("after finishing the waiting q/a, oldest = %q (%v), want q/b", w.Key, ok)
	}
	if _, ok := claim(t, l, id, "q/a", "r"); ok {
		t.Error("a waiter finished while it waited was claimed")
	}
	finish(t, l, id, "q/b", "")
	if w, ok := oldest(t, l, id); ok {
		t.Errorf("oldest after finishing every waiter = %q", w.Key)
	}
	if w := arm(t, l, id, tasks.Handoff, time.Now()); !w.IsZero() {
		t.Errorf("a wake armed with no waiter: %+v", w)
	}
}

func testSeparate(t *testing.T, l tasks.WaitList) {
	a, b := lockID(t)+"/a", lockID(t)+"/b"
	park(t, l, a, tasks.Waiter{Key: "q/x", Arrived: t0, Body: []byte(`{}`)})
	if _, ok := oldest(t, l, b); ok {
		t.Fatal("a waiter of one lock id shows on another")
	}
	if st, created, _ := park(t, l, b, tasks.Waiter{Key: "q/x", Arrived: t0, Body: []byte(`{}`)}); st != tasks.Waiting || !created {
		t.Fatalf("the same key on another lock id: %v, want a new waiting record", st)
	}
	if w := arm(t, l, b, tasks.Handoff, time.Now()); w.IsZero() {
		t.Fatal("no hand-off armed on b")
	}
	if w := arm(t, l, a, tasks.Handoff, time.Now()); w.IsZero() {
		t.Fatal("a's hand-off is taken for b's")
	}
}

func testCoalesce(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	c := tasks.Waiter{Key: "coalesce/q/job", Arrived: t0, Body: []byte(`{"first":true}`), Coalesce: true}
	park(t, l, id, c)
	if st, created, _ := park(t, l, id, tasks.Waiter{Key: c.Key, Arrived: t0.Add(time.Second), Body: []byte(`{}`), Coalesce: true}); st != tasks.Waiting || created {
		t.Fatalf("second Park of a coalescing key: %v created=%v, want the waiting record", st, created)
	}
	w, ok := oldest(t, l, id)
	if !ok || w.Key != c.Key || !w.Coalesce || !w.Arrived.Equal(t0) {
		t.Fatalf("Peek = %+v, %v; want the first coalescing record, marked Coalesce", w, ok)
	}
	got, ok := claim(t, l, id, c.Key, "r1")
	if !ok || string(got.Body) != `{"first":true}` || !got.Coalesce {
		t.Fatalf("claim of a coalescing record: %v, %+v", ok, got)
	}
	if st, _ := state(t, l, id, c.Key); st != tasks.Absent {
		t.Fatalf("state after claiming a coalescing record: %v, want absent", st)
	}
	if st, created, _ := park(t, l, id, tasks.Waiter{Key: c.Key, Arrived: t0.Add(2 * time.Second), Body: []byte(`{"second":true}`), Coalesce: true}); st != tasks.Waiting || !created {
		t.Fatalf("Park after the coalesced run was claimed: %v, want a new waiting record", st)
	}
	// The first run's retry still finds what it runs.
	if w, ok, err := l.Running(t.Context(), id, "r1"); err != nil || !ok || string(w.Body) != `{"first":true}` {
		t.Fatalf("Running(r1) = %+v, %v, %v", w, ok, err)
	}
	finish(t, l, id, c.Key, "r1")
	if st, _ := state(t, l, id, c.Key); st != tasks.Waiting {
		t.Fatalf("finishing the first coalesced run changed the newer waiting record: %v, want waiting", st)
	}
	if got, ok := claim(t, l, id, c.Key, "r2"); !ok || string(got.Body) != `{"second":true}` {
		t.Fatalf("claim of the second coalescing record: %v, %q", ok, got.Body)
	}
}

func testSafety(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	due := time.Now().Add(30 * time.Second)
	_, _, w1, err := l.Park(t.Context(), id, tasks.Waiter{Key: "q/a", Job: "ja", Arrived: t0, Body: []byte(`{}`)}, due)
	if err != nil {
		t.Fatal(err)
	}
	if w1.Kind != tasks.Safety || w1.Gen == 0 || !w1.Due.Equal(due) || w1.Job != "ja" {
		t.Fatalf("first Park armed %+v; want a Safety wake due %v for the head's job ja", w1, due)
	}
	// Later parks behind the same holding: the pending safety wake covers them.
	for i := range 5 {
		_, _, w, err := l.Park(t.Context(), id, tasks.Waiter{Key: fmt.Sprintf("q/b%d", i), Job: "jb", Arrived: t0, Body: []byte(`{}`)}, due.Add(time.Duration(i)*time.Second))
		if err != nil || !w.IsZero() {
			t.Fatalf("park #%d armed %+v (%v); want none: one safety wake per lock id", i, w, err)
		}
	}
	// An earlier due time supersedes it.
	_, _, w2, err := l.Park(t.Context(), id, tasks.Waiter{Key: "q/c", Job: "jc", Arrived: t0, Body: []byte(`{}`)}, due.Add(-10*time.Second))
	if err != nil || w2.Kind != tasks.Safety || sameWake(w2, w1) {
		t.Fatalf("an earlier due armed %+v (%v); want a new Safety wake after gen %d", w2, err, w1.Gen)
	}
	if ok, _ := take(t, l, id, w1, time.Time{}); ok {
		t.Error("the superseded safety wake was taken")
	}
	ok, next := take(t, l, id, w2, due.Add(5*time.Second))
	if !ok || next.Kind != tasks.Safety || sameWake(next, w2) {
		t.Fatalf("Take of the pending safety wake: %v, next %+v; want taken and a new one armed", ok, next)
	}
	if ok, _ := take(t, l, id, w2, time.Time{}); ok {
		t.Error("a safety wake was taken twice")
	}
	// The handoff slot is separate.
	if h := arm(t, l, id, tasks.Handoff, time.Now()); h.Kind != tasks.Handoff {
		t.Errorf("a pending safety wake kept a hand-off from being armed: %+v", h)
	}
}

func testHandoff(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	if w := arm(t, l, id, tasks.Handoff, time.Now()); !w.IsZero() {
		t.Fatalf("a hand-off armed for a lock id nobody waits for: %+v", w)
	}
	park(t, l, id, tasks.Waiter{Key: "q/a", Job: "ja", Arrived: t0, Body: []byte(`{}`)})
	park(t, l, id, tasks.Waiter{Key: "q/b", Job: "jb", Arrived: t0, Body: []byte(`{}`)})
	h1 := arm(t, l, id, tasks.Handoff, time.Now())
	if h1.Kind != tasks.Handoff || h1.Job != "ja" {
		t.Fatalf("first hand-off: %+v; want one for the head's job ja", h1)
	}
	for range 5 {
		if w := arm(t, l, id, tasks.Handoff, time.Now()); !w.IsZero() {
			t.Fatalf("a second hand-off armed while one is pending: %+v", w)
		}
	}
	if err := l.Disarm(t.Context(), id, h1); err != nil {
		t.Fatal(err)
	}
	h2 := arm(t, l, id, tasks.Handoff, time.Now())
	if h2.IsZero() || sameWake(h2, h1) {
		t.Fatalf("after Disarm, Arm gave %+v; want a new hand-off", h2)
	}
	if ok, _ := take(t, l, id, h1, time.Time{}); ok {
		t.Error("a disarmed hand-off was taken")
	}
	if ok, _ := take(t, l, id, h2, time.Time{}); !ok {
		t.Fatal("the pending hand-off was not taken")
	}
	h3 := arm(t, l, id, tasks.Handoff, time.Now())
	if h3.IsZero() || sameWake(h3, h2) {
		t.Fatalf("after Take, Arm gave %+v; want a new hand-off", h3)
	}
	if _, ok := claim(t, l, id, "q/a", "r"); !ok {
		t.Fatal("claim failed")
	}
	if ok, _ := take(t, l, id, h3, time.Time{}); !ok {
		t.Fatal("take failed")
	}
	if h := arm(t, l, id, tasks.Handoff, time.Now()); h.Job != "jb" {
		t.Errorf("hand-off after the head was claimed: %+v; want one for the new head's job jb", h)
	}
}

func testStale(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	old := time.Now().Add(-tasks.StaleWake - time.Minute)
	_, _, w1, err := l.Park(t.Context(), id, tasks.Waiter{Key: "q/a", Job: "j", Arrived: t0, Body: []byte(`{}`)}, old)
	if err != nil || w1.IsZero() {
		t.Fatalf("park armed %+v (%v)", w1, err)
	}
	// Its creation failed and was never undone: after StaleWake it is
	// armed anew under a new name.
	_, _, w2, err := l.Park(t.Context(), id, tasks.Waiter{Key: "q/b", Job: "j", Arrived: t0, Body: []byte(`{}`)}, time.Now().Add(time.Minute))
	if err != nil || w2.IsZero() || sameWake(w2, w1) {
		t.Fatalf("park behind a stale safety wake armed %+v (%v); want a new one", w2, err)
	}
}

func testConcurrentArm(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	park(t, l, id, tasks.Waiter{Key: "q/a", Job: "j", Arrived: t0, Body: []byte(`{}`)})
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		armed []tasks.Wake
		errs  []error
	)
	for range 8 {
		wg.Go(func() {
			w, err := l.Arm(t.Context(), id, tasks.Handoff, time.Now())
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
			}
			if !w.IsZero() {
				armed = append(armed, w)
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 || len(armed) != 1 {
		t.Fatalf("8 concurrent Arms armed %d hand-offs (%v), errors %v; want 1", len(armed), armed, errs)
	}
}

func testLargeBody(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	body := bytes.Repeat([]byte("0123456789abcdef"), (1<<20)/16) // 1 MiB
	if st, created, _ := park(t, l, id, tasks.Waiter{Key: "q/big", Arrived: t0, Body: body}); st != tasks.Waiting || !created {
		t.Fatalf("Park of a 1 MiB body: %v created=%v", st, created)
	}
	if w, ok := oldest(t, l, id); !ok || w.Key != "q/big" {
		t.Fatalf("a parked 1 MiB waiter is not listed: %+v, %v", w, ok)
	}
	w, ok := claim(t, l, id, "q/big", "r")
	if !ok || !bytes.Equal(w.Body, body) {
		t.Fatalf("claim of the 1 MiB waiter: %v, body of %d bytes, equal=%v", ok, len(w.Body), bytes.Equal(w.Body, body))
	}
	if w, ok, err := l.Running(t.Context(), id, "r"); err != nil || !ok || !bytes.Equal(w.Body, body) {
		t.Fatalf("Running of the 1 MiB waiter: %v, %v, body of %d bytes", ok, err, len(w.Body))
	}
	finish(t, l, id, "q/big", "r")
}

// RunRetention checks that a Finished record counts as absent once
// tasks.FinishedRetention has passed: a task re-enqueued under the same name
// after Cloud Tasks' dedup window parks and runs. advance moves l's clock
// forward.
func RunRetention(t *testing.T, l tasks.WaitList, advance func(time.Duration)) {
	id := lockID(t)
	park(t, l, id, tasks.Waiter{Key: "q/named", Arrived: t0, Body: []byte(`{"first":1}`)})
	if _, ok := claim(t, l, id, "q/named", "r1"); !ok {
		t.Fatal("claim failed")
	}
	finish(t, l, id, "q/named", "r1")
	advance(tasks.FinishedRetention - time.Minute)
	if st, created, _ := park(t, l, id, tasks.Waiter{Key: "q/named", Arrived: t0, Body: []byte(`{}`)}); st != tasks.Finished || created {
		t.Fatalf("Park within the dedup window: %v created=%v, want finished", st, created)
	}
	advance(2 * time.Minute)
	if st, _ := state(t, l, id, "q/named"); st != tasks.Absent {
		t.Fatalf("state after the dedup window: %v, want absent", st)
	}
	if st, created, _ := park(t, l, id, tasks.Waiter{Key: "q/named", Arrived: t0, Body: []byte(`{"again":1}`)}); st != tasks.Waiting || !created {
		t.Fatalf("Park of the name re-enqueued after the dedup window: %v created=%v, want a new waiting record", st, created)
	}
	if w, ok := claim(t, l, id, "q/named", "r2"); !ok || string(w.Body) != `{"again":1}` {
		t.Fatalf("claim of the re-enqueued task: %v, body %q", ok, w.Body)
	}
}

func takeClaim(t *testing.T, l tasks.WaitList, id string, w tasks.Wake, key, runner string) (tasks.Waiter, bool) {
	t.Helper()
	wt, ok, err := l.TakeClaim(t.Context(), id, w.Kind, w.Gen, key, runner)
	if err != nil {
		t.Fatalf("TakeClaim(%q, %v %d, %q, %q): %v", id, w.Kind, w.Gen, key, runner, err)
	}
	return wt, ok
}

func testTakeClaim(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	park(t, l, id, tasks.Waiter{Key: "q/a", Job: "ja", Arrived: t0, Body: []byte(`{"a":1}`)})
	park(t, l, id, tasks.Waiter{Key: "q/b", Job: "jb", Arrived: t0.Add(time.Second), Body: []byte(`{"b":1}`)})
	h1 := arm(t, l, id, tasks.Handoff, time.Now())
	if h1.IsZero() {
		t.Fatal("no hand-off armed")
	}
	// A stale generation claims but takes nothing.
	stale := h1
	stale.Gen++
	if w, ok := takeClaim(t, l, id, stale, "q/a", "r1"); !ok || w.Key != "q/a" || string(w.Body) != `{"a":1}` {
		t.Fatalf("TakeClaim of the head with another wake's generation: %+v, %v; want q/a claimed with its body", w, ok)
	}
	if w := arm(t, l, id, tasks.Handoff, time.Now()); !w.IsZero() {
		t.Fatalf("a TakeClaim with another generation took the pending hand-off: Arm gave %+v", w)
	}
	finish(t, l, id, "q/a", "r1")
	// The pending wake's generation takes it, with the claim.
	if w, ok := takeClaim(t, l, id, h1, "q/b", "r2"); !ok || w.Key != "q/b" || w.Job != "jb" || string(w.Body) != `{"b":1}` {
		t.Fatalf("TakeClaim of q/b: %+v, %v; want q/b claimed with its body", w, ok)
	}
	if st, runner := state(t, l, id, "q/b"); st != tasks.Running || runner != "r2" {
		t.Fatalf("q/b after TakeClaim: %v by %q; want running by r2", st, runner)
	}
	if ok, _ := take(t, l, id, h1, time.Time{}); ok {
		t.Error("the hand-off TakeClaim took is still pending")
	}
	// A retry of r2's wake gets r2's unfinished claim back, whatever key it
	// names, and claims nothing else.
	park(t, l, id, tasks.Waiter{Key: "q/c", Job: "jc", Arrived: t0.Add(2 * time.Second), Body: []byte(`{"c":1}`)})
	h2 := arm(t, l, id, tasks.Handoff, time.Now())
	if h2.IsZero() || sameWake(h2, h1) {
		t.Fatalf("after the take, Arm gave %+v; want a new hand-off", h2)
	}
	if w, ok := takeClaim(t, l, id, h1, "q/c", "r2"); !ok || w.Key != "q/b" || string(w.Body) != `{"b":1}` {
		t.Fatalf("TakeClaim by a runner with an unfinished claim: %+v, %v; want its claim of q/b back", w, ok)
	}
	if st, _ := state(t, l, id, "q/c"); st != tasks.Waiting {
		t.Fatalf("q/c after a TakeClaim that returned another claim: %v; want waiting", st)
	}
	if w, ok := takeClaim(t, l, id, h1, "", "r2"); !ok || w.Key != "q/b" {
		t.Fatalf("TakeClaim with no key by a runner with an unfinished claim: %+v, %v; want q/b", w, ok)
	}
	finish(t, l, id, "q/b", "r2")
	// With no key, it takes the wake and claims nothing.
	if w, ok := takeClaim(t, l, id, h2, "", "r3"); ok {
		t.Fatalf("TakeClaim with no key claimed %+v", w)
	}
	if ok, _ := take(t, l, id, h2, time.Time{}); ok {
		t.Error("the hand-off a TakeClaim with no key took is still pending")
	}
	if st, _ := state(t, l, id, "q/c"); st != tasks.Waiting {
		t.Fatalf("q/c after a TakeClaim with no key: %v; want waiting", st)
	}
	// A Safety wake is taken the same way.
	park(t, l, id, tasks.Waiter{Key: "q/d", Job: "jd", Arrived: t0.Add(3 * time.Second), Body: []byte(`{}`)})
	// (Park armed one due an hour ahead: an earlier one supersedes it.)
	safety := arm(t, l, id, tasks.Safety, time.Now().Add(time.Minute))
	if safety.IsZero() {
		t.Fatal("no Safety wake armed")
	}
	if _, ok := takeClaim(t, l, id, safety, "q/c", "r4"); !ok {
		t.Fatal("TakeClaim by a Safety wake claimed nothing")
	}
	if w := arm(t, l, id, tasks.Safety, time.Now().Add(time.Hour)); w.IsZero() {
		t.Error("the Safety wake TakeClaim took is still pending")
	}
}

// raceOnce runs claim by 8 runners at once ("r0" ... "r7") and fails t
// unless none failed and exactly one won; it returns the winners.
func raceOnce(t *testing.T, what string, claim func(runner string) (tasks.Waiter, bool, error)) []string {
	t.Helper()
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
			_, ok, err := claim(runner)
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
		t.Fatalf("concurrent %s failed: %v", what, errs)
	}
	if len(won) != 1 {
		t.Fatalf("%d concurrent %s won (%v), want exactly 1", len(won), what, won)
	}
	return won
}

func testTakeClaimRace(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	park(t, l, id, tasks.Waiter{Key: "q/a", Job: "j", Arrived: t0, Body: []byte(`{}`)})
	h := arm(t, l, id, tasks.Handoff, time.Now())
	raceOnce(t, "TakeClaims", func(runner string) (tasks.Waiter, bool, error) {
		return l.TakeClaim(t.Context(), id, h.Kind, h.Gen, "q/a", runner)
	})
	if ok, _ := take(t, l, id, h, time.Time{}); ok {
		t.Error("the hand-off is still pending after concurrent TakeClaims")
	}
}

func finishClaim(t *testing.T, l tasks.WaitList, id, done, runner string) (tasks.Waiter, bool) {
	t.Helper()
	w, ok, err := l.FinishClaim(t.Context(), id, done, runner)
	if err != nil {
		t.Fatalf("FinishClaim(%q, %q, %q): %v", id, done, runner, err)
	}
	return w, ok
}

func testFinishClaim(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: []byte(`{"a":1}`)})
	park(t, l, id, tasks.Waiter{Key: "q/c", Arrived: t0.Add(2 * time.Second), Body: []byte(`{"c":1}`)})
	park(t, l, id, tasks.Waiter{Key: "q/b", Job: "jb", Arrived: t0.Add(time.Second), Body: []byte(`{"b":1}`)})
	if w, ok := finishClaim(t, l, id, "", "r1"); !ok || w.Key != "q/a" || string(w.Body) != `{"a":1}` {
		t.Fatalf("FinishClaim with nothing done = %+v, %v; want the oldest, q/a", w, ok)
	}
	// From a to the oldest waiter, b, in one step.
	if w, ok := finishClaim(t, l, id, "q/a", "r1"); !ok || w.Key != "q/b" || w.Job != "jb" || string(w.Body) != `{"b":1}` {
		t.Fatalf("FinishClaim(q/a) = %+v, %v; want q/b claimed with its body", w, ok)
	}
	if st, _ := state(t, l, id, "q/a"); st != tasks.Finished {
		t.Fatalf("q/a after FinishClaim: %v, want finished", st)
	}
	if st, runner := state(t, l, id, "q/b"); st != tasks.Running || runner != "r1" {
		t.Fatalf("q/b after FinishClaim: %v by %q, want running by r1", st, runner)
	}
	if w, ok, err := l.Running(t.Context(), id, "r1"); err != nil || !ok || w.Key != "q/b" {
		t.Fatalf("Running(r1) = %+v, %v, %v; want q/b", w, ok, err)
	}
	if w, ok := oldest(t, l, id); !ok || w.Key != "q/c" {
		t.Fatalf("oldest after FinishClaim = %+v, %v; want q/c", w, ok)
	}
	// done not the runner's claim: an error, and nothing changes.
	for _, c := range []struct{ done, runner string }{{"q/other", "r1"}, {"", "r1"}, {"q/c", "r9"}} {
		if _, _, err := l.FinishClaim(t.Context(), id, c.done, c.runner); err == nil {
			t.Errorf("FinishClaim(%q) by %s, whose claim is not that, succeeded", c.done, c.runner)
		}
	}
	if st, runner := state(t, l, id, "q/b"); st != tasks.Running || runner != "r1" {
		t.Fatalf("q/b after a refused FinishClaim: %v by %q, want running by r1", st, runner)
	}
	for _, k := range []string{"q/c", "q/other"} {
		if st, _ := state(t, l, id, k); st != map[string]tasks.WaiterState{"q/c": tasks.Waiting, "q/other": tasks.Absent}[k] {
			t.Fatalf("%s after a refused FinishClaim: %v", k, st)
		}
	}
	if w, ok := finishClaim(t, l, id, "q/b", "r1"); !ok || w.Key != "q/c" {
		t.Fatalf("FinishClaim(q/b) = %+v, %v; want q/c", w, ok)
	}
	// Nobody waits: done is finished all the same.
	if w, ok := finishClaim(t, l, id, "q/c", "r1"); ok {
		t.Fatalf("FinishClaim with nobody waiting claimed %+v", w)
	}
	if st, _ := state(t, l, id, "q/c"); st != tasks.Finished {
		t.Fatalf("q/c after FinishClaim with nobody waiting: %v, want finished", st)
	}
	if _, ok, err := l.Running(t.Context(), id, "r1"); err != nil || ok {
		t.Fatalf("Running(r1) after its claim was finished: %v, %v", ok, err)
	}
	if w, ok := finishClaim(t, l, id, "", "r1"); ok {
		t.Fatalf("FinishClaim with nothing done and nobody waiting claimed %+v", w)
	}
	// A coalescing record parked again while its run ran: the run is
	// finished and the newer record, under the same key, claimed.
	c := tasks.Waiter{Key: "coalesce/q/job", Arrived: t0.Add(3 * time.Second), Body: []byte(`{"first":true}`), Coalesce: true}
	park(t, l, id, c)
	if w, ok := finishClaim(t, l, id, "", "r2"); !ok || w.Key != c.Key {
		t.Fatalf("FinishClaim of the coalescing record = %+v, %v", w, ok)
	}
	park(t, l, id, tasks.Waiter{Key: c.Key, Arrived: t0.Add(4 * time.Second), Body: []byte(`{"second":true}`), Coalesce: true})
	if w, ok := finishClaim(t, l, id, c.Key, "r2"); !ok || string(w.Body) != `{"second":true}` {
		t.Fatalf("FinishClaim from a coalesced run to its newer record = %+v, %v; want the second body", w, ok)
	}
	if w, ok, err := l.Running(t.Context(), id, "r2"); err != nil || !ok || string(w.Body) != `{"second":true}` {
		t.Fatalf("Running(r2) = %+v, %v, %v; want the second coalesced run", w, ok, err)
	}
	if _, ok := finishClaim(t, l, id, c.Key, "r2"); ok {
		t.Fatal("a waiter is left")
	}
	if st, _ := state(t, l, id, c.Key); st != tasks.Absent {
		t.Fatalf("the coalescing key after its runs: %v, want absent", st)
	}
}

func testFinishClaimRace(t *testing.T, l tasks.WaitList) {
	id := lockID(t)
	park(t, l, id, tasks.Waiter{Key: "q/a", Arrived: t0, Body: []byte(`{}`)})
	raceOnce(t, "FinishClaims", func(runner string) (tasks.Waiter, bool, error) {
		return l.FinishClaim(t.Context(), id, "", runner)
	})
}
