package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/taskguard/taskguard/app"
	"github.com/taskguard/taskguard/internal/oauthdemo"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// demoJob is the job the demo enqueues: it holds its task's lock for a
// moment and records when it ran.
const demoJob = "demo-report"

// demoWork is how long one run of the demo job takes.
const demoWork = 300 * time.Millisecond

// demoWait bounds the wait for the demo's tasks.
const demoWait = 8 * time.Minute

// demoLease is the lease of the demo's task locks (unless TASKGUARD_LEASE
// says otherwise). Parked tasks' safety nets are due a lease after they
// park, and the demo waits for the queue to drain, so a short lease keeps
// the demo short; in 429 mode the worker's Retry-After is the holder's
// remaining lease, so it keeps the retries quick too.
const demoLease = 1500 * time.Millisecond

// section is one run of the demo job.
type section struct {
	LockID     string
	Token      uint64
	Task       string
	Start, End time.Time
}

type recorder struct {
	mu       sync.Mutex
	sections []section // guarded by mu
}

func (r *recorder) add(s section) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sections = append(r.sections, s)
}

func (r *recorder) snapshot() []section {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.sections)
}

// demoJobOption returns the demo job, for the App, and its recorder.
func demoJobOption() (*recorder, app.Option) {
	rec := &recorder{}
	return rec, app.WithJob(demoJob, func(ctx context.Context, d *tasks.Delivery) error {
		s := section{LockID: d.LockID, Token: d.Token, Task: d.TaskName, Start: time.Now()}
		select {
		case <-time.After(demoWork):
		case <-ctx.Done():
			return ctx.Err()
		}
		s.End = time.Now()
		rec.add(s)
		return nil
	}, tasks.LockOptions(locking.Lease(demoLease)))
}

// runDemo drives the local functions over HTTP as a user would and checks
// what they did.
// park says whether the Worker parks busy tasks (TASKGUARD_BUSY is not
// 429).
func runDemo(ctx context.Context, out io.Writer, base string, rec *recorder, emu *taskstest.Server, endpoint *oauthdemo.Endpoint, park bool) error {
	const perID = 6
	start := time.Now()
	var (
		enqueued int
		names    = map[string]bool{} // the enqueued tasks' ids
	)
	enqueue := func(job, lockID string, payload any) error {
		body, _ := json.Marshal(map[string]any{"job": job, "lockId": lockID, "payload": payload})
		resp, err := http.Post(base+"/Enqueue", "application/json", bytes.NewReader(body))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			msg, _ := io.ReadAll(resp.Body)
			return fmt.Errorf("enqueue %s/%s: %s: %s", job, lockID, resp.Status, msg)
		}
		var answer struct {
			Task string `json:"task"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&answer); err != nil {
			return fmt.Errorf("enqueue %s/%s: the answer: %w", job, lockID, err)
		}
		names[path.Base(answer.Task)] = true
		enqueued++
		return nil
	}
	for i := range perID {
		if err := enqueue(demoJob, "report-A", map[string]int{"n": i}); err != nil {
			return err
		}
	}
	for i := range perID {
		if err := enqueue(demoJob, fmt.Sprintf("report-%c", 'B'+i), map[string]int{"n": i}); err != nil {
			return err
		}
	}
	const refreshes = 5
	if endpoint != nil {
		for i := range refreshes {
			// Distinct task lock ids: the tasks run at once, and only the
			// job's own lock on the user's token keeps the refreshes apart.
			if err := enqueue(exampleJob, fmt.Sprintf("refresh-42-%d", i), map[string]string{"user": "42"}); err != nil {
				return err
			}
		}
	}
	fmt.Fprintf(out, "enqueued %d tasks through %s/Enqueue\n\n", enqueued, base)

	if park {
		// A burst on one lock id is parked at enqueue, a task whose lock is
		// busy when delivered is parked (202), and each is handed the lock
		// by its holder; the queue drains when the parked tasks' safety nets,
		// which find nothing left to run, have come a lease later.
		fmt.Fprintf(out, "waiting for the queue to drain (busy tasks are parked and handed the lock; TASKGUARD_BUSY=429 shows the slow way)\n\n")
	} else {
		// A task whose lock is busy is answered 429 and comes back after the
		// queue's backoff (5, 15, 35, 75, 155 s with deploy's settings), so
		// the burst on one id takes minutes, as it would in production.
		fmt.Fprintf(out, "waiting for the queue to drain (busy tasks are retried after the queue's backoff: minutes)\n\n")
	}
	wctx, cancel := context.WithTimeout(ctx, demoWait)
	defer cancel()
	if emu != nil {
		if err := emu.WaitIdle(wctx, localQueue); err != nil {
			return fmt.Errorf("waiting for the queue to drain: %w", err)
		}
	} else {
		for len(rec.snapshot()) < 2*perID {
			select {
			case <-wctx.Done():
				return fmt.Errorf("waiting for the demo tasks: %w", wctx.Err())
			case <-time.After(100 * time.Millisecond):
			}
		}
	}

	secs := rec.snapshot()
	problems := printTimeline(out, start, secs, 2*perID)
	printBurst(out, start, secs, "report-A", perID)

	if emu != nil {
		var busy, unavailable, parked, done int
		queued := map[string]bool{}
		for _, a := range emu.Attempts() {
			queued[a.Task] = true
			switch {
			case a.Status == http.StatusTooManyRequests:
				busy++
			case a.Status == http.StatusServiceUnavailable:
				unavailable++
			case a.Status == tasks.StatusParked:
				parked++
			case a.Status >= 200 && a.Status < 300:
				done++
			}
		}
		if park {
			atEnqueue := 0
			for name := range names {
				if !queued[name] {
					atEnqueue++
				}
			}
			fmt.Fprintf(out, "deliveries: %d completed (runs, and wakes: hand-offs and safety nets), %d parked by the Worker (202: lock busy, handed off by its holder), %d answered 429, %d answered 503\n", done, parked, busy, unavailable)
			fmt.Fprintf(out, "parked at enqueue: %d of the %d tasks (the burst on report-A after its first went into the wait list, not through the queue)\n", atEnqueue, enqueued)
			if busy+unavailable > 0 {
				problems = append(problems, fmt.Sprintf("park mode answered %d deliveries 429 and %d 503; want none", busy, unavailable))
			}
			if parked+atEnqueue == 0 {
				problems = append(problems, "park mode parked no task of the burst, at enqueue or by the Worker")
			}
		} else {
			fmt.Fprintf(out, "deliveries: %d completed, %d answered 429 + Retry-After (lock busy; Cloud Tasks retried later, no billed waiting)\n", done, busy)
		}
	}
	if endpoint != nil {
		calls := endpoint.CallCount()
		fmt.Fprintf(out, "oauth example: %d concurrent refresh tasks for user 42 -> %d call(s) to the token endpoint, each with a valid refresh token\n", refreshes, calls)
		if calls != 1 {
			problems = append(problems, fmt.Sprintf("token endpoint called %d times for one expired token; want 1", calls))
		}
	}

	resp, err := http.Post(base+"/CleanupLocks", "application/json", nil)
	if err != nil {
		return err
	}
	report, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Fprintf(out, "CleanupLocks: %s %s", resp.Status, report)

	if len(problems) > 0 {
		return fmt.Errorf("demo checks failed:\n  %s", strings.Join(problems, "\n  "))
	}
	fmt.Fprintln(out, "\nOK: at most one task at a time per lock id, fencing tokens never decreasing, distinct ids in parallel")
	return nil
}

// printTimeline draws one row per run and returns what contradicts the
// guarantee.
func printTimeline(out io.Writer, origin time.Time, secs []section, want int) []string {
	var problems []string
	if len(secs) != want {
		problems = append(problems, fmt.Sprintf("%d demo tasks ran; want %d", len(secs), want))
	}
	if len(secs) == 0 {
		return problems
	}
	sort.Slice(secs, func(i, j int) bool {
		if secs[i].LockID != secs[j].LockID {
			return secs[i].LockID < secs[j].LockID
		}
		return secs[i].Start.Before(secs[j].Start)
	})
	end := origin
	for _, s := range secs {
		end = later(end, s.End)
	}
	const width = 60
	span := end.Sub(origin)
	col := func(t time.Time) int { return int(float64(width-1) * float64(t.Sub(origin)) / float64(span)) }
	fmt.Fprintf(out, "%-9s %6s  %-*s %s\n", "lock id", "token", width, "timeline (0 … "+span.Round(time.Millisecond).String()+")", "ran")
	for i, s := range secs {
		bar := []byte(strings.Repeat(" ", width))
		for c := col(s.Start); c <= col(s.End) && c < width; c++ {
			bar[c] = '#'
		}
		fmt.Fprintf(out, "%-9s %6d  %s %s–%s\n", s.LockID, s.Token, bar,
			s.Start.Sub(origin).Round(time.Millisecond), s.End.Sub(origin).Round(time.Millisecond))
		if i > 0 && secs[i-1].LockID == s.LockID {
			prev := secs[i-1]
			if s.Start.Before(prev.End) {
				problems = append(problems, fmt.Sprintf("%s: two tasks overlapped (tokens %d and %d)", s.LockID, prev.Token, s.Token))
			}
			// Parked tasks that one wake runs one after another are one
			// holding and share its token (tasks.WithRunNext).
			if s.Token < prev.Token {
				problems = append(problems, fmt.Sprintf("%s: token %d ran after %d", s.LockID, s.Token, prev.Token))
			}
		}
	}
	// Distinct ids must have run at the same time as one another.
	maxParallel := 0
	for _, s := range secs {
		n := 0
		for _, o := range secs {
			if o.Start.Before(s.End) && s.Start.Before(o.End) {
				n++
			}
		}
		maxParallel = max(maxParallel, n)
	}
	fmt.Fprintf(out, "\nat most %d tasks ran at once across ids; per id never more than 1\n", maxParallel)
	if maxParallel < 2 {
		problems = append(problems, "tasks on distinct ids never ran in parallel")
	}
	return problems
}

// printBurst prints how long the n runs on lockID took, from origin (when
// they were enqueued) to the end of the last, beside the ideal n × demoWork.
func printBurst(out io.Writer, origin time.Time, secs []section, lockID string, n int) {
	end, runs := origin, 0
	for _, s := range secs {
		if s.LockID == lockID {
			end = later(end, s.End)
			runs++
		}
	}
	ideal := time.Duration(n) * demoWork
	span := end.Sub(origin)
	fmt.Fprintf(out, "burst on %s: %d of %d runs of %v done %v after enqueueing (ideal %v, %.1f×)\n",
		lockID, runs, n, demoWork, span.Round(time.Millisecond), ideal, float64(span)/float64(ideal))
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
