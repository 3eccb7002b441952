package tasks_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// The end-to-end tests run the real parts together: the real Cloud Tasks
// client enqueues through tasks.Client into the emulator, which delivers
// over HTTP to Workers (several "instances", each with its own
// locking.Client on one shared lock store) behind an httptest server.

// e2eBackend returns a function that makes the lock backends of the
// end-to-end tests: every call a new client of the same store, as separate
// instances of a function would have.
//
// It is memlock (one in-memory store shared by all) unless e2eStore is set:
// e2e_dslock_test.go sets it to dslock on a real Datastore emulator (that
// file carries an ignore build tag until locking/dslock is on main).
func e2eBackend(t testing.TB) func() locking.Backend {
	t.Helper()
	if e2eStore != nil {
		return e2eStore(t)
	}
	store := memlock.New()
	return func() locking.Backend { return store }
}

// e2eStore, when set, replaces memlock as the lock store of the end-to-end
// tests.
var e2eStore func(t testing.TB) func() locking.Backend

// answer is one HTTP answer a worker instance gave.
type answer struct {
	task       string
	status     int
	retryAfter string
	took       time.Duration
}

// fleet is a set of worker instances behind one URL, and the record of
// their answers.
type fleet struct {
	workers []*tasks.Worker
	lockers []*locking.Client
	server  *httptest.Server
	next    atomic.Uint64

	mu      sync.Mutex
	answers []answer
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

// newFleet starts n worker instances with locks of the given lease; register
// calls Handle on each of them.
func newFleet(t *testing.T, n int, lease time.Duration, register func(w *tasks.Worker), opts ...tasks.WorkerOption) *fleet {
	t.Helper()
	mk := e2eBackend(t)
	f := &fleet{}
	// Warnings and errors of the workers and their lock clients are shown
	// when the test fails.
	logs := &logBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("worker logs:\n%s", logs)
		}
	})
	for range n {
		locker, err := locking.New(locking.Config{Strong: mk(), Lease: lease, Logger: logger})
		if err != nil {
			t.Fatal(err)
		}
		w, err := tasks.NewWorker(locker, append([]tasks.WorkerOption{tasks.WithLogger(logger), tasks.WithQueue(queueName)}, opts...)...)
		if err != nil {
			t.Fatal(err)
		}
		register(w)
		f.workers = append(f.workers, w)
		f.lockers = append(f.lockers, locker)
	}
	f.server = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		w := f.workers[f.next.Add(1)%uint64(len(f.workers))]
		sw := &statusWriter{ResponseWriter: rw, status: 200}
		start := time.Now()
		w.ServeHTTP(sw, r)
		f.mu.Lock()
		f.answers = append(f.answers, answer{
			task:       r.Header.Get("X-CloudTasks-TaskName"),
			status:     sw.status,
			retryAfter: rw.Header().Get("Retry-After"),
			took:       time.Since(start),
		})
		f.mu.Unlock()
	}))
	t.Cleanup(f.server.Close)
	return f
}

func (f *fleet) snapshot() []answer {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.answers)
}

// e2eQueue starts the emulator with a queue of the given concurrency and
// fast retries (millisecond backoffs), and a tasks.Client for the fleet.
func e2eQueue(t *testing.T, f *fleet, concurrency int32, opts taskstest.Options) (*taskstest.Server, *tasks.Client) {
	t.Helper()
	opts.SubsecondBackoffs = true
	srv := startQueue(t, opts, &cloudtaskspb.Queue{
		RateLimits: &cloudtaskspb.RateLimits{MaxConcurrentDispatches: concurrency, MaxDispatchesPerSecond: 500},
		RetryConfig: &cloudtaskspb.RetryConfig{
			MaxAttempts:  -1,
			MinBackoff:   durationpb.New(10 * time.Millisecond),
			MaxBackoff:   durationpb.New(100 * time.Millisecond),
			MaxDoublings: 3,
		},
	})
	c, err := tasks.NewClient(t.Context(), baseConfig(f.server.URL+"/Worker"), srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return srv, c
}

func enqueueAll(t *testing.T, c *tasks.Client, n int, mk func(i int) tasks.Task) {
	t.Helper()
	var g errgroup.Group
	for i := range n {
		g.Go(func() error {
			_, err := c.Enqueue(context.Background(), mk(i))
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}

func waitIdle(t *testing.T, srv *taskstest.Server, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	defer cancel()
	if err := srv.WaitIdle(ctx, queueName); err != nil {
		t.Fatal(err)
	}
}

func histogram(answers []answer) map[int]int {
	h := map[int]int{}
	for _, a := range answers {
		h[a.status]++
	}
	return h
}

func count(answers []answer, status int) int {
	n := 0
	for _, a := range answers {
		if a.status == status {
			n++
		}
	}
	return n
}

func TestE2EOneLockIDRunsOneAtATimeInTokenOrder(t *testing.T) {
	const n = 50
	type run struct {
		i          int
		token      uint64
		start, end time.Time
	}
	var (
		inside     atomic.Int32
		overlaps   atomic.Int32
		mu         sync.Mutex
		runs       []run
		lastToken  uint64
		tokenRaces int
	)
	// A long lease, so that a slow store (the legacy Datastore emulator under
	// -race on a busy machine took up to 2 s per transaction) does not lose
	// locks; a lost lock is tolerated below, as Cloud Tasks would.
	f := newFleet(t, 3, 10*time.Second, func(w *tasks.Worker) {
		w.Handle("serial", func(ctx context.Context, d *tasks.Delivery) error {
			if inside.Add(1) != 1 {
				overlaps.Add(1)
			}
			defer inside.Add(-1)
			var p struct{ I int }
			if err := d.Decode(&p); err != nil {
				return tasks.Permanent(err)
			}
			mu.Lock()
			if d.Token <= lastToken {
				tokenRaces++ // a holder after another with a token not above it
			}
			lastToken = d.Token
			r := run{i: p.I, token: d.Token, start: time.Now()}
			mu.Unlock()
			time.Sleep(5 * time.Millisecond)
			r.end = time.Now()
			mu.Lock()
			runs = append(runs, r)
			mu.Unlock()
			return nil
		})
	})
	// Retry-After (10 s here: the lease, capped) is honoured up to 20 ms so that 50
	// serialised tasks finish quickly; TestE2EContendedDeliveriesAreRetried
	// runs with it honoured in full.
	// The emulator's model of system throttling is off: it would pace the
	// many 429 answers' retries at about one a second, and this test is about
	// the lock, not the queue's speed.
	srv, c := e2eQueue(t, f, 10, taskstest.Options{MaxRetryAfter: 20 * time.Millisecond, NoSystemThrottling: true})
	start := time.Now()
	enqueueAll(t, c, n, func(i int) tasks.Task {
		return tasks.Task{Job: "serial", LockID: "one", Payload: map[string]int{"I": i}}
	})
	waitIdle(t, srv, 45*time.Second)
	elapsed := time.Since(start)

	if overlaps.Load() != 0 {
		t.Errorf("%d jobs ran while another held the lock", overlaps.Load())
	}
	if tokenRaces != 0 {
		t.Errorf("%d jobs started with a token not above the previous job's", tokenRaces)
	}
	answers := f.snapshot()
	// Every run ends in an answer: 204, or 503 when its lock was lost (it is
	// then retried and runs again: at least once, never at the same time).
	if want := count(answers, 204) + count(answers, 503); len(runs) != want || count(answers, 204) != n {
		t.Fatalf("%d runs, want %d, one per task plus one per lost lock; answers by status: %v", len(runs), want, histogram(answers))
	}
	if lost := count(answers, 503); lost > 0 {
		t.Logf("%d runs lost their lock and were retried", lost)
	}
	slices.SortFunc(runs, func(a, b run) int { return a.start.Compare(b.start) })
	seen := map[int]bool{}
	for k, r := range runs {
		seen[r.i] = true
		if k > 0 && (r.token <= runs[k-1].token || r.start.Before(runs[k-1].end)) {
			t.Errorf("run %d (token %d) started %v after run %d (token %d) ended", k, r.token,
				r.start.Sub(runs[k-1].end), k-1, runs[k-1].token)
		}
	}
	if len(seen) != n {
		t.Errorf("%d distinct tasks ran, want %d", len(seen), n)
	}
	busy := count(answers, 429)
	if busy == 0 {
		t.Error("no delivery was answered 429: the test did not contend")
	}
	if got := count(answers, 204); got != n {
		t.Errorf("%d answers 204, want %d", got, n)
	}
	if other := len(answers) - busy - count(answers, 204) - count(answers, 503); other != 0 {
		t.Errorf("%d answers other than 204, 429 and 503: %v", other, histogram(answers))
	}
	for _, l := range f.lockers {
		assertFree(t, l, "one")
	}
	t.Logf("%d tasks on one lock id: %v, %d deliveries, %d answered 429", n, elapsed.Round(time.Millisecond), len(answers), busy)
}

func TestE2EDistinctLockIDsRunConcurrently(t *testing.T) {
	const n, limit = 50, 10
	var inside, most atomic.Int32
	f := newFleet(t, 3, 0, func(w *tasks.Worker) {
		w.Handle("parallel", func(ctx context.Context, d *tasks.Delivery) error {
			now := inside.Add(1)
			defer inside.Add(-1)
			for {
				m := most.Load()
				if now <= m || most.CompareAndSwap(m, now) {
					break
				}
			}
			time.Sleep(100 * time.Millisecond)
			return nil
		})
	})
	srv, c := e2eQueue(t, f, limit, taskstest.Options{})
	start := time.Now()
	enqueueAll(t, c, n, func(i int) tasks.Task {
		return tasks.Task{Job: "parallel", LockID: fmt.Sprintf("id-%d", i)}
	})
	waitIdle(t, srv, 30*time.Second)
	elapsed := time.Since(start)
	answers := f.snapshot()
	if got := count(answers, 204); got != n || len(answers) != n {
		t.Errorf("%d answers, %d of them 204; want %d of %d", len(answers), got, n, n)
	}
	if m := most.Load(); m != limit {
		t.Errorf("at most %d jobs ran at once, want the dispatch limit %d", m, limit)
	}
	// Serially this is 5 s; at the limit, 5 waves of 100 ms.
	if elapsed > 3*time.Second {
		t.Errorf("took %v", elapsed)
	}
	t.Logf("%d tasks on distinct lock ids: %v, at most %d at once", n, elapsed.Round(time.Millisecond), most.Load())
}

func TestE2EContendedDeliveriesAreRetried(t *testing.T) {
	aStarted := make(chan struct{})
	var aEnded, bStarted atomic.Int64 // UnixNano
	var bRuns atomic.Int32
	f := newFleet(t, 2, time.Second, func(w *tasks.Worker) {
		w.Handle("first", func(ctx context.Context, d *tasks.Delivery) error {
			close(aStarted)
			time.Sleep(400 * time.Millisecond)
			aEnded.Store(time.Now().UnixNano())
			return nil
		})
		w.Handle("second", func(ctx context.Context, d *tasks.Delivery) error {
			bRuns.Add(1)
			bStarted.Store(time.Now().UnixNano())
			return nil
		})
	})
	// Retry-After honoured in full.
	srv, c := e2eQueue(t, f, 10, taskstest.Options{})
	if _, err := c.Enqueue(t.Context(), tasks.Task{Job: "first", LockID: "shared"}); err != nil {
		t.Fatal(err)
	}
	<-aStarted
	bName, err := c.Enqueue(t.Context(), tasks.Task{Job: "second", LockID: "shared"})
	if err != nil {
		t.Fatal(err)
	}
	waitIdle(t, srv, 10*time.Second)
	bID := bName[strings.LastIndexByte(bName, '/')+1:]

	var bAttempts []taskstest.Attempt
	for _, a := range srv.Attempts() {
		if a.Task == bID {
			bAttempts = append(bAttempts, a)
		}
	}
	if len(bAttempts) != 2 {
		t.Fatalf("task B had %d attempts, want 2: %+v", len(bAttempts), bAttempts)
	}
	first, retry := bAttempts[0], bAttempts[1]
	if first.Status != 429 || first.RetryAfter != time.Second {
		t.Errorf("first delivery of B: %d, Retry-After %v; want 429, 1s", first.Status, first.RetryAfter)
	}
	if retry.Status != 204 || retry.Header.Get("X-CloudTasks-TaskRetryCount") != "1" ||
		retry.Header.Get("X-CloudTasks-TaskPreviousResponse") != "429" {
		t.Errorf("retry of B: %d, headers %v", retry.Status, retry.Header)
	}
	if gap := retry.Dispatched.Sub(first.Responded); gap < time.Second {
		t.Errorf("retried %v after the 429, before its Retry-After of 1s", gap)
	}
	if bRuns.Load() != 1 || bStarted.Load() < aEnded.Load() {
		t.Errorf("B ran %d times, starting %v after A ended", bRuns.Load(), time.Duration(bStarted.Load()-aEnded.Load()))
	}
	// The 429 was answered at once: the handler never waited for the lock.
	for _, a := range f.snapshot() {
		if a.task == bID && a.status == 429 {
			if a.retryAfter != "1" || a.took > 200*time.Millisecond {
				t.Errorf("429 answer: Retry-After %q after %v", a.retryAfter, a.took)
			}
			t.Logf("contended delivery answered 429 in %v; retried %v later", a.took, retry.Dispatched.Sub(first.Responded).Round(time.Millisecond))
		}
	}
}

func TestE2EBadRequests(t *testing.T) {
	var calls atomic.Int32
	f := newFleet(t, 1, 0, func(w *tasks.Worker) {
		w.Handle("known", func(ctx context.Context, d *tasks.Delivery) error { calls.Add(1); return nil })
	}, tasks.WithMaxBodyBytes(1024))
	srv, _ := e2eQueue(t, f, 10, taskstest.Options{})
	admin, err := srv.NewClient(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()

	bodies := map[string]string{
		"malformed": `{"v":1,"job":"known"`,
		// Unknown for longer than UnknownJobGrace: dropped.
		"unknown-job": `{"v":1,"job":"unknown","lockId":"lock-u","enqueuedAt":"2026-01-01T00:00:00Z"}`,
		"oversized":   envelopeBody("known", "lock-o", strings.Repeat("x", 2000)),
	}
	for id, body := range bodies {
		_, err := admin.CreateTask(t.Context(), &cloudtaskspb.CreateTaskRequest{Parent: queueName, Task: &cloudtaskspb.Task{
			Name: queueName + "/tasks/" + id,
			MessageType: &cloudtaskspb.Task_HttpRequest{HttpRequest: &cloudtaskspb.HttpRequest{
				Url: f.server.URL + "/Worker", Body: []byte(body),
			}},
		}})
		if err != nil {
			t.Fatal(err)
		}
	}
	waitIdle(t, srv, 10*time.Second)
	byTask := map[string][]taskstest.Attempt{}
	for _, a := range srv.Attempts() {
		byTask[a.Task] = append(byTask[a.Task], a)
	}
	for id := range bodies {
		if a := byTask[id]; len(a) != 1 || a[0].Status != 200 || a[0].Outcome != "done" {
			t.Errorf("%s: attempts %+v, want one answered 200 and not retried", id, a)
		}
	}
	// Not through Cloud Tasks: no X-CloudTasks headers.
	resp, err := http.Post(f.server.URL+"/Worker", "application/json", strings.NewReader(envelopeBody("known", "lock-h", nil)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 403 {
		t.Errorf("header-less request: %d, want 403", resp.StatusCode)
	}
	if calls.Load() != 0 {
		t.Errorf("the job ran %d times", calls.Load())
	}
	for _, id := range []string{"lock-u", "lock-o", "lock-h"} {
		assertFree(t, f.lockers[0], id)
	}
}
