package tasks_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/tasks"
)

// parkBehind parks the tasks named by payloads, in that order, on lock id
// behind a holding of the fleet's lock store that the test releases after
// hold (its release hands off through HandOff), and returns when the
// release was made.
func parkBehind(t *testing.T, f *parkFleet, id string, hold time.Duration, payloads ...string) <-chan struct{} {
	t.Helper()
	holder := outsider(t, f, time.Minute)
	if err := tasks.HandOff(holder, f.client, f.list, nil); err != nil {
		t.Fatal(err)
	}
	released := holdFor(t, holder, id, hold)
	for i, p := range payloads {
		enqueueAll(t, f.client, 1, func(int) tasks.Task { return tasks.Task{Job: "job", LockID: id, Payload: payload(p)} })
		waitAnswered(t, f, i+1)
	}
	if st := f.statuses(); st[tasks.StatusParked] != len(payloads) {
		t.Fatalf("answers before the release: %v, want %d parked (hold the lock longer)", st, len(payloads))
	}
	return released
}

// wakes counts the wake tasks the fleet's queue dispatched: its tasks
// other than the enqueued ones.
func wakes(f *parkFleet, enqueued int) int {
	var names []string
	for _, a := range f.srv.Attempts() {
		names = append(names, a.Task)
	}
	slices.Sort(names)
	return len(slices.Compact(names)) - enqueued
}

// TestParkWakeRunsTheNextWaiters: a wake that ran a parked task runs the
// next ones in the same request (WithRunNext), in FIFO order, each once:
// five tasks parked behind a release take one wake, not five (with
// WithRunNext(0), as before, five).
func TestParkWakeRunsTheNextWaiters(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			for _, c := range []struct {
				opts  []tasks.WorkerOption
				wakes int
			}{{nil, 1}, {[]tasks.WorkerOption{tasks.WithRunNext(0)}, 5}} {
				t.Run(fmt.Sprintf("wakes=%d", c.wakes), func(t *testing.T) {
					var runs jobRuns
					var tokens []uint64
					f := newParkFleetEnv(t, 2, time.Minute, list(t), fleetEnv{workers: c.opts}, nil, func(_ int, w *tasks.Worker) {
						w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
							runs.mu.Lock()
							tokens = append(tokens, d.Token)
							runs.mu.Unlock()
							return runs.job(ctx, d)
						})
					})
					in := []string{"A", "B", "C", "D", "E"}
					<-parkBehind(t, f, "n1", time.Second, in...)
					runs.waitRuns(t, `"E"`, 1, 15*time.Second)
					time.Sleep(300 * time.Millisecond) // a rerun would show
					runs.mu.Lock()
					got := slices.Clone(runs.runs)
					toks := slices.Clone(tokens)
					runs.mu.Unlock()
					want := []string{`"A"`, `"B"`, `"C"`, `"D"`, `"E"`}
					if !slices.Equal(got, want) {
						t.Fatalf("runs %q, want each once in the order parked %q", got, want)
					}
					if n := wakes(f, len(in)); n != c.wakes {
						t.Errorf("%d wakes ran the 5 parked tasks, want %d", n, c.wakes)
					}
					if c.wakes == 1 && slices.Min(toks) != slices.Max(toks) {
						t.Errorf("tokens %v: the runs of one wake are one holding, want one token", toks)
					}
					t.Logf("answers %v, tokens %v", f.statuses(), toks)
				})
			}
		})
	}
}

// TestParkRunNextJobFailure: a job that fails in a wake's run of several
// tasks ends it: its delivery is answered 500, the release hands the lock
// to the next task, and the wake's retry runs the failed task again:
// nothing lost, nothing run twice but the failed task.
func TestParkRunNextJobFailure(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) {
			var runs jobRuns
			var failed atomic.Bool
			f := newParkFleet(t, 2, time.Minute, list(t), nil, func(_ int, w *tasks.Worker) {
				w.Handle("job", func(ctx context.Context, d *tasks.Delivery) error {
					err := runs.job(ctx, d)
					if string(d.Payload) == `"B"` && failed.CompareAndSwap(false, true) {
						return errors.New("injected: B fails once")
					}
					return err
				})
			})
			<-parkBehind(t, f, "n2", time.Second, "A", "B", "C", "D")
			runs.waitRuns(t, `"B"`, 2, 60*time.Second)
			runs.waitRuns(t, `"D"`, 1, 10*time.Second)
			time.Sleep(300 * time.Millisecond)
			runs.mu.Lock()
			got := slices.Clone(runs.runs)
			runs.mu.Unlock()
			for p, n := range map[string]int{`"A"`: 1, `"B"`: 2, `"C"`: 1, `"D"`: 1} {
				if c := runs.count(p); c != n {
					t.Errorf("%s ran %d times, want %d; runs %q", p, c, n, got)
				}
			}
			if !slices.Equal(got[:3], []string{`"A"`, `"B"`, `"C"`}) {
				t.Errorf("runs %q: want A, B (failed), then C by the release's hand-off", got)
			}
			if st := f.statuses(); st[500] != 1 {
				t.Errorf("answers %v, want one 500 (the wake whose run of B failed)", st)
			}
		})
	}
}

// TestRunNextBudget: the run-next budget is cut so that a job started
// within it ends, at the job deadline, before the wake's dispatch deadline.
func TestRunNextBudget(t *testing.T) {
	d := func(v time.Duration) *time.Duration { return &v }
	for _, c := range []struct {
		set                   *time.Duration
		dispatch, jobDeadline time.Duration
		want                  time.Duration
	}{
		{nil, 30 * time.Minute, 27 * time.Minute, tasks.DefaultRunNext}, // app's default: 3 min of slack
		{nil, 15 * time.Second, 10 * time.Second, 4 * time.Second},      // app's shortest: 5 s of slack
		{nil, 10 * time.Minute, 0, tasks.DefaultRunNext},                // no job deadline: a tenth, 1 min
		{nil, 2 * time.Minute, 0, 12 * time.Second},                     // a tenth
		{d(0), 30 * time.Minute, 27 * time.Minute, 0},                   // off
		{d(time.Hour), 30 * time.Minute, 27 * time.Minute, 3*time.Minute - time.Second},
		{d(5 * time.Second), 30 * time.Second, 30 * time.Second, 0}, // no slack: off
	} {
		if got := tasks.RunNextBudget(c.set, c.dispatch, c.jobDeadline); got != c.want {
			t.Errorf("budget(%v, dispatch %v, job deadline %v) = %v, want %v", c.set, c.dispatch, c.jobDeadline, got, c.want)
		}
	}
	for _, bad := range []time.Duration{-time.Second, tasks.MaxDispatchDeadline + time.Second} {
		if _, err := tasks.NewWorker(nil, tasks.WithRunNext(bad)); !errors.Is(err, tasks.ErrInvalidConfig) {
			t.Errorf("WithRunNext(%v): %v, want ErrInvalidConfig", bad, err)
		}
	}
}
