package tasks_test

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"google.golang.org/api/option"

	"github.com/taskguard/taskguard/deploy"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// recordingList is a WaitList that records the parks that created a record
// and the claims that won, in the order they happened, and checks FIFO at
// each claim: the claimed waiter is the oldest (first to arrive) of those
// parked (their Park returned) and neither claimed nor finished since.
type recordingList struct {
	tasks.WaitList
	mu       sync.Mutex
	parked   map[string]time.Time // key -> Arrived
	claimed  map[string]bool
	claims   []string // keys, in claim order
	unfairly []string // claims that overtook an older parked waiter
}

func (l *recordingList) Park(ctx context.Context, lockID string, w tasks.Waiter, due time.Time) (tasks.WaiterState, bool, tasks.Wake, error) {
	st, created, wake, err := l.WaitList.Park(ctx, lockID, w, due)
	if err == nil && created {
		l.mu.Lock()
		l.parked[w.Key] = w.Arrived
		delete(l.claimed, w.Key)
		l.mu.Unlock()
	}
	return st, created, wake, err
}

func (l *recordingList) Finish(ctx context.Context, lockID, key, runner string) error {
	err := l.WaitList.Finish(ctx, lockID, key, runner)
	if err == nil && runner == "" {
		l.mu.Lock()
		l.claimed[key] = true // out of the list
		l.mu.Unlock()
	}
	return err
}

func (l *recordingList) Claim(ctx context.Context, lockID, key, runner string) (tasks.Waiter, bool, error) {
	return l.record(key, func() (tasks.Waiter, bool, error) { return l.WaitList.Claim(ctx, lockID, key, runner) })
}

func (l *recordingList) TakeClaim(ctx context.Context, lockID string, kind tasks.WakeKind, gen uint64, key, runner string) (tasks.Waiter, bool, error) {
	return l.record(key, func() (tasks.Waiter, bool, error) {
		return l.WaitList.TakeClaim(ctx, lockID, kind, gen, key, runner)
	})
}

func (l *recordingList) FinishClaim(ctx context.Context, lockID, done, runner string) (tasks.Waiter, bool, error) {
	l.mu.Lock()
	var older []string // parked before this claim, unclaimed
	for k := range l.parked {
		if !l.claimed[k] {
			older = append(older, k)
		}
	}
	l.mu.Unlock()
	w, ok, err := l.WaitList.FinishClaim(ctx, lockID, done, runner)
	if err == nil && ok {
		l.mu.Lock()
		if !l.claimed[w.Key] {
			l.claims = append(l.claims, w.Key)
			l.claimed[w.Key] = true
		}
		for _, k := range older {
			if !l.claimed[k] && l.parked[k].Before(w.Arrived) {
				l.unfairly = append(l.unfairly, fmt.Sprintf("%s claimed before the older %s", w.Key, k))
			}
		}
		l.mu.Unlock()
	}
	return w, ok, err
}

// record records the claim of key that claim makes.
func (l *recordingList) record(key string, claim func() (tasks.Waiter, bool, error)) (tasks.Waiter, bool, error) {
	l.mu.Lock()
	var older []string // parked before this claim, older than key, unclaimed
	for k, at := range l.parked {
		if !l.claimed[k] && k != key && at.Before(l.parked[key]) {
			older = append(older, k)
		}
	}
	l.mu.Unlock()
	w, ok, err := claim()
	if err == nil && ok && w.Key == key {
		l.mu.Lock()
		if !l.claimed[key] {
			l.claims = append(l.claims, key)
			l.claimed[key] = true
		}
		for _, k := range older {
			if !l.claimed[k] {
				l.unfairly = append(l.unfairly, fmt.Sprintf("%s claimed before the older %s", key, k))
			}
		}
		l.mu.Unlock()
	}
	return w, ok, err
}

// parkFleet is n Workers in park mode behind one URL, enqueueing their
// continuations through the real client into the emulator, on a queue with
// deploy's settings.
type parkFleet struct {
	srv     *taskstest.Server
	client  *tasks.Client
	list    *recordingList
	lockers []*locking.Client
	reader  *sdkmetric.ManualReader // the workers' park metrics

	logs *logBuffer // the workers' WARN and ERROR lines
	url  string     // the workers' URL
	// handler is what the queue delivers to (the workers behind one URL).
	handler http.Handler
	// newBackend returns a backend on the workers' lock store, for a holder
	// of the workers' locks outside the fleet (a program of its own).
	newBackend func() locking.Backend

	// dead[i] marks worker i as a killed process: it serves no more
	// requests, and a request it was serving ends without an answer.
	dead []atomic.Bool

	mu      sync.Mutex
	answers map[int]int // HTTP status -> count
}

// newParkFleet starts n workers; wrap (when not nil) wraps worker i's lock
// backend, given the flag that marks worker i dead, and register registers
// worker i's jobs.
func newParkFleet(t testing.TB, n int, lease time.Duration, list tasks.WaitList,
	wrap func(i int, dead *atomic.Bool, b locking.Backend) locking.Backend, register func(i int, w *tasks.Worker)) *parkFleet {
	t.Helper()
	return newParkFleetWith(t, n, lease, list, wrap, register)
}

// newParkFleetWith is newParkFleet whose workers' Cloud Tasks client gets
// clientOpts too (an interceptor that injects failures).
func newParkFleetWith(t testing.TB, n int, lease time.Duration, list tasks.WaitList,
	wrap func(i int, dead *atomic.Bool, b locking.Backend) locking.Backend, register func(i int, w *tasks.Worker),
	clientOpts ...option.ClientOption) *parkFleet {
	t.Helper()
	return newParkFleetEnv(t, n, lease, list, fleetEnv{}, wrap, register, clientOpts...)
}

// fleetEnv is where a parkFleet's services are: the Cloud Tasks emulator's
// options (its latencies), and the lock store (e2eBackend's when nil).
type fleetEnv struct {
	tasks   taskstest.Options
	backend func() locking.Backend
	workers []tasks.WorkerOption // more options for every worker
	// dispatch is the Client's dispatch deadline (Config.DispatchDeadline).
	dispatch time.Duration
}

// newParkFleetEnv is newParkFleetWith in env.
func newParkFleetEnv(t testing.TB, n int, lease time.Duration, list tasks.WaitList, env fleetEnv,
	wrap func(i int, dead *atomic.Bool, b locking.Backend) locking.Backend, register func(i int, w *tasks.Worker),
	clientOpts ...option.ClientOption) *parkFleet {
	t.Helper()
	settings, err := deploy.DefaultQueue()
	if err != nil {
		t.Fatal(err)
	}
	f := &parkFleet{list: &recordingList{WaitList: list, parked: map[string]time.Time{}, claimed: map[string]bool{}},
		answers: map[int]int{}, dead: make([]atomic.Bool, n)}
	f.srv = startQueue(t, env.tasks, settings.Queue(queueName))
	var workers []*tasks.Worker
	var next atomic.Uint64
	f.handler = http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		i := int(next.Add(1) % uint64(len(workers)))
		for f.dead[i].Load() {
			i = (i + 1) % len(workers) // the platform routes around a dead instance
		}
		sw := &statusWriter{ResponseWriter: rw, status: 200}
		workers[i].ServeHTTP(sw, r)
		if f.dead[i].Load() {
			panic(http.ErrAbortHandler) // the process died: no answer
		}
		f.mu.Lock()
		f.answers[sw.status]++
		f.mu.Unlock()
	})
	ts := httptest.NewServer(f.handler)
	t.Cleanup(ts.Close)
	f.url = ts.URL + "/Worker"
	cfg := baseConfig(ts.URL + "/Worker")
	cfg.DispatchDeadline = env.dispatch
	f.client, err = tasks.NewClient(t.Context(), cfg, append(f.srv.ClientOptions(), clientOpts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.client.Close() })
	logs := &logBuffer{}
	f.logs = logs
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("worker logs:\n%s", logs)
		}
	})
	f.reader = sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(f.reader))
	mk := env.backend
	if mk == nil {
		mk = e2eBackend(t)
	}
	f.newBackend = mk
	for i := range n {
		b := mk()
		if wrap != nil {
			b = wrap(i, &f.dead[i], b)
		}
		locker, err := locking.New(locking.Config{Strong: b, Lease: lease, Logger: logger})
		if err != nil {
			t.Fatal(err)
		}
		opts := []tasks.WorkerOption{tasks.WithLogger(logger), tasks.WithQueue(queueName), tasks.WithParking(f.client, f.list),
			tasks.WithParkingLease(lease), tasks.WithParkingMeterProvider(mp)}
		w, err := tasks.NewWorker(locker, append(opts, env.workers...)...)
		if err != nil {
			t.Fatal(err)
		}
		register(i, w)
		workers = append(workers, w)
		f.lockers = append(f.lockers, locker)
	}
	return f
}

// metrics returns the workers' park metrics: counters by name and
// attributes, histograms as "<name> count" and "<name> sum-us" (their sum
// in microseconds).
func (f *parkFleet) metrics(t testing.TB) map[string]int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := f.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					name := m.Name
					if v, ok := p.Attributes.Value("ran"); ok {
						name += fmt.Sprintf("{ran=%v}", v.AsBool())
					}
					out[name] += p.Value
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					out[m.Name+" count"] += int64(p.Count)
					out[m.Name+" sum-us"] += int64(p.Sum * 1e6)
				}
			}
		}
	}
	return out
}

func (f *parkFleet) statuses() map[int]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.answers)
}

// TestParkBurstOnOneLockID is the burst of the park-and-hand-off design: 20
// tasks of 100 ms on one lock id, enqueued at once through the real client
// into the emulator (configured like deploy/04-queue.sh), delivered to three
// Workers in park mode. Each task runs exactly once, never two at once, the
// parked ones in the order they parked, and no delivery is answered 429 or
// 503.
func TestParkBurstOnOneLockID(t *testing.T) {
	for name, list := range waitLists {
		t.Run(name, func(t *testing.T) { testParkBurst(t, name, list(t)) })
	}
}

// waitLists are the WaitList implementations the park tests run on; the
// Datastore one is added by park_dswait_test.go.
var waitLists = map[string]func(t testing.TB) tasks.WaitList{
	"memory": func(t testing.TB) tasks.WaitList { return &tasks.MemoryWaitList{} },
}

func testParkBurst(t *testing.T, name string, list tasks.WaitList) {
	const n, work = 20, 100 * time.Millisecond
	type run struct {
		i          int
		start, end time.Time
	}
	var (
		mu     sync.Mutex
		runs   []run
		inside atomic.Int32
		over   atomic.Int32
	)
	f := newParkFleet(t, 3, 5*time.Second, list, nil, func(_ int, w *tasks.Worker) {
		w.Handle("serial", func(ctx context.Context, d *tasks.Delivery) error {
			if inside.Add(1) != 1 {
				over.Add(1)
			}
			defer inside.Add(-1)
			var p struct{ I int }
			if err := d.Decode(&p); err != nil {
				return tasks.Permanent(err)
			}
			r := run{i: p.I, start: time.Now()}
			select {
			case <-time.After(work):
			case <-ctx.Done():
				return ctx.Err()
			}
			r.end = time.Now()
			mu.Lock()
			runs = append(runs, r)
			mu.Unlock()
			return nil
		})
	})
	start := time.Now()
	enqueueAll(t, f.client, n, func(i int) tasks.Task {
		return tasks.Task{Job: "serial", LockID: "hot", Payload: map[string]int{"I": i}}
	})
	// Wait for the runs, then for the queue: the safety nets fire after the
	// lease and must run nothing again.
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	for {
		mu.Lock()
		done := len(runs)
		mu.Unlock()
		if done >= n {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%d of %d tasks ran within a minute; answers %v", done, n, f.statuses())
		case <-time.After(10 * time.Millisecond):
		}
	}
	mu.Lock()
	span := runs[len(runs)-1].end.Sub(start)
	mu.Unlock()
	waitIdle(t, f.srv, time.Minute)

	mu.Lock()
	defer mu.Unlock()
	if over.Load() != 0 {
		t.Errorf("%d runs overlapped another", over.Load())
	}
	seen := map[int]int{}
	for _, r := range runs {
		seen[r.i]++
	}
	if len(runs) != n || len(seen) != n {
		t.Errorf("%d runs of %d distinct tasks; want each of %d exactly once: %v", len(runs), len(seen), n, seen)
	}
	answers := f.statuses()
	for status, c := range answers {
		if status != tasks.StatusParked && status != tasks.StatusDone {
			t.Errorf("%d deliveries answered %d; want only %d (parked) and %d (done)", c, status, tasks.StatusParked, tasks.StatusDone)
		}
	}
	f.list.mu.Lock()
	claims := slices.Clone(f.list.claims)
	parked := maps.Clone(f.list.parked)
	unfair := slices.Clone(f.list.unfairly)
	f.list.mu.Unlock()
	if len(unfair) > 0 {
		t.Errorf("not FIFO: %v", unfair)
	}
	if len(claims) == 0 {
		t.Error("no task was parked: the burst did not contend")
	}
	m := f.metrics(t)
	if got := m["taskguard.tasks.parked"]; got != int64(len(parked)) {
		t.Errorf("taskguard.tasks.parked = %d, want the %d records parked", got, len(parked))
	}
	if got := m["taskguard.tasks.handoffs"]; got < 1 || got > 2*n {
		t.Errorf("taskguard.tasks.handoffs = %d, want 1 to %d (at most one per release, and one more per delivery that overtook a hand-off)", got, 2*n)
	}
	if got := m["taskguard.tasks.handoff.latency count"]; got < 1 || got > int64(len(claims)) {
		t.Errorf("taskguard.tasks.handoff.latency has %d observations, want one per run from a hand-off (1 to %d)", got, len(claims))
	}
	if got := m["taskguard.tasks.safety_nets{ran=true}"]; got != 0 {
		t.Errorf("%d safety nets ran a job although every holder handed off", got)
	}
	attempts := len(f.srv.Attempts())
	t.Logf("wait list %s: %d tasks of %v on one lock id: last run ended %v after enqueueing (ideal %v); %d parked, %d dispatches, answers %v",
		name, n, work, span.Round(time.Millisecond), n*work, len(parked), attempts, answers)
	for _, l := range f.lockers {
		assertFree(t, l, "hot")
	}
}
