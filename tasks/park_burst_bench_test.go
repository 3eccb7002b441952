package tasks_test

import (
	"context"
	"fmt"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"

	"github.com/taskguard/taskguard/tasks"
)

// BenchmarkParkBurst is the burst of issue-sized bursts on one lock id in
// park mode: N tasks of 100 ms enqueued at once through the real client
// into the emulator (deploy's queue: max burst 50), delivered to three
// Workers with the default 30 s lease, the wait list in memory or in
// Datastore (the Firestore emulator, which also keeps the locks). Meanwhile
// unrelated tasks on other lock ids are enqueued every 200 ms. The
// enqueuing Client parks at enqueue (ParkAtEnqueue, as package app's
// Enqueue function does): the burst's first task goes through the queue,
// the others into the wait list. It reports, per N and wait list: the span
// (first enqueue to the last run's end) against the ideal N × 100 ms and
// the bound 1.3 × ideal + 1 s, the CreateTask calls (the burst's own tasks
// and every wake, by the enqueuer and the Workers) and the dispatches the
// queue made per burst task, the runs that were missing, repeated or
// overlapping, and the unrelated tasks' start latency (enqueue to start:
// median and max), split into the queue's part (enqueue to dispatch: the
// emulator's Attempt.Dispatched) and the Worker's (dispatch to the job's
// start).
//
// TASKGUARD_BURST_SIZES (default "10,50,200,1000") chooses the N. `make
// bench` runs it; the loopback figures are in BENCHMARKS.md.
func BenchmarkParkBurst(b *testing.B) {
	sizes := []int{10, 50, 200, 1000}
	if s := os.Getenv("TASKGUARD_BURST_SIZES"); s != "" {
		sizes = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n <= 0 {
				b.Fatalf("TASKGUARD_BURST_SIZES=%q: %q is not a size", s, f)
			}
			sizes = append(sizes, n)
		}
	}
	for _, name := range []string{"memory", "datastore"} {
		for _, n := range sizes {
			b.Run(fmt.Sprintf("list=%s/n=%d", name, n), func(b *testing.B) {
				for range b.N {
					r := parkBurst(b, waitLists[name](b), n)
					ideal := time.Duration(n) * 100 * time.Millisecond
					b.ReportMetric(r.span.Seconds(), "burst-s")
					b.ReportMetric(ideal.Seconds(), "ideal-s")
					b.ReportMetric(r.span.Seconds()/(1.3*ideal.Seconds()+1), "of-bound")
					b.ReportMetric(float64(r.creates)/float64(n), "createtasks/task")
					b.ReportMetric(float64(r.dispatches)/float64(n), "dispatches/task")
					b.ReportMetric(float64(r.missing), "missing")
					b.ReportMetric(float64(r.repeated), "repeated")
					b.ReportMetric(float64(r.overlaps), "overlaps")
					b.ReportMetric(r.otherP50.Seconds()*1000, "other-p50-ms")
					b.ReportMetric(r.otherMax.Seconds()*1000, "other-max-ms")
					b.ReportMetric(r.queueP50.Seconds()*1000, "other-queue-p50-ms")
					b.ReportMetric(r.queueMax.Seconds()*1000, "other-queue-max-ms")
					b.ReportMetric(r.workerP50.Seconds()*1000, "other-worker-p50-ms")
					b.ReportMetric(r.workerMax.Seconds()*1000, "other-worker-max-ms")
				}
			})
		}
	}
}

// burstRuns records the runs of a burst's job: how often each task ran,
// when each run ended, and runs that overlapped another.
type burstRuns struct {
	mu           sync.Mutex
	runs         map[int]int // task index -> runs; guarded by mu
	ends         []time.Time // guarded by mu
	started      []int       // task indexes in the order their runs started; guarded by mu
	inside, over atomic.Int32
}

func newBurstRuns() *burstRuns { return &burstRuns{runs: map[int]int{}} }

// job is the burst's job: it works for work; its payload is the task's
// index.
func (br *burstRuns) job(work time.Duration) tasks.JobFunc {
	return func(ctx context.Context, d *tasks.Delivery) error {
		if br.inside.Add(1) != 1 {
			br.over.Add(1)
		}
		defer br.inside.Add(-1)
		var i int
		if err := d.Decode(&i); err != nil {
			return tasks.Permanent(err)
		}
		br.mu.Lock()
		br.started = append(br.started, i)
		br.mu.Unlock()
		time.Sleep(work)
		br.mu.Lock()
		br.runs[i]++
		br.ends = append(br.ends, time.Now())
		br.mu.Unlock()
		return nil
	}
}

// wait returns once n tasks ran or limit passed, looking every poll.
func (br *burstRuns) wait(n int, limit time.Time, poll time.Duration) {
	for {
		br.mu.Lock()
		done := len(br.runs)
		br.mu.Unlock()
		if done >= n || time.Now().After(limit) {
			return
		}
		time.Sleep(poll)
	}
}

// order returns the task indexes in the order their runs started.
func (br *burstRuns) order() []int {
	br.mu.Lock()
	defer br.mu.Unlock()
	return slices.Clone(br.started)
}

// tally returns the span from start to the last run's end, the tasks of
// 0..n-1 that never ran, the runs beyond one of those that ran more than
// once, and the runs that overlapped another.
func (br *burstRuns) tally(start time.Time, n int) (span time.Duration, missing, repeated, overlaps int) {
	br.mu.Lock()
	defer br.mu.Unlock()
	for _, e := range br.ends {
		span = max(span, e.Sub(start))
	}
	for i := range n {
		switch c := br.runs[i]; {
		case c == 0:
			missing++
		case c > 1:
			repeated += c - 1
		}
	}
	return span, missing, repeated, int(br.over.Load())
}

// countCreates counts the CreateTask calls made through a connection.
func countCreates(n *atomic.Int64) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if _, ok := req.(*cloudtaskspb.CreateTaskRequest); ok {
			n.Add(1)
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

type parkBurstResult struct {
	span                time.Duration
	creates, dispatches int
	missing, repeated   int
	overlaps            int
	otherP50, otherMax  time.Duration
	// The other ids' start latency, split: enqueue to dispatch (the
	// queue's part) and dispatch to start (the Worker's).
	queueP50, queueMax   time.Duration
	workerP50, workerMax time.Duration
}

func parkBurst(b *testing.B, list tasks.WaitList, n int) parkBurstResult {
	const work = 100 * time.Millisecond
	var (
		creates atomic.Int64
		burst   = newBurstRuns()
		mu      sync.Mutex
		starts  = map[int]time.Time{}
	)
	f := newParkFleetWith(b, 3, 30*time.Second, list, nil, func(_ int, w *tasks.Worker) {
		w.Handle("burst", burst.job(work))
		w.Handle("other", func(ctx context.Context, d *tasks.Delivery) error {
			var i int
			_ = d.Decode(&i)
			mu.Lock()
			if _, ok := starts[i]; !ok {
				starts[i] = time.Now()
			}
			mu.Unlock()
			return nil
		})
	}, option.WithGRPCDialOption(grpc.WithChainUnaryInterceptor(countCreates(&creates))))
	// The Workers' client counts CreateTask; the enqueuer is another, which
	// parks bursts at enqueue (as package app's Enqueue does) and counts
	// its own.
	enq, err := tasks.NewClient(b.Context(), baseConfig(f.url), append(f.srv.ClientOptions(),
		option.WithGRPCDialOption(grpc.WithChainUnaryInterceptor(countCreates(&creates))))...)
	if err != nil {
		b.Fatal(err)
	}
	defer enq.Close()
	if err := enq.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
		b.Fatal(err)
	}

	start := time.Now()
	for i := range n {
		if _, err := enq.Enqueue(b.Context(), tasks.Task{Job: "burst", LockID: "hot", Payload: i}); err != nil {
			b.Fatal(err)
		}
	}
	ideal := time.Duration(n) * work
	var (
		enqueued  = map[int]time.Time{}
		otherTask = map[string]int{} // task id -> i
		otherStop = make(chan struct{})
		otherDone = make(chan struct{})
	)
	go func() {
		defer close(otherDone)
		for i := 0; ; i++ {
			select {
			case <-otherStop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			mu.Lock()
			enqueued[i] = time.Now()
			mu.Unlock()
			name, err := enq.Enqueue(context.Background(), tasks.Task{Job: "other", LockID: fmt.Sprintf("cold-%d", i), Payload: i})
			if err != nil {
				b.Error(err)
				return
			}
			mu.Lock()
			otherTask[path.Base(name)] = i
			mu.Unlock()
		}
	}()
	burst.wait(n, time.Now().Add(3*ideal+time.Minute), 20*time.Millisecond)
	close(otherStop)
	<-otherDone
	ctx, cancel := context.WithTimeout(b.Context(), 2*time.Minute)
	defer cancel()
	if err := f.srv.WaitIdle(ctx, queueName); err != nil {
		b.Logf("the queue did not empty: %v", err)
	}

	mu.Lock()
	defer mu.Unlock()
	var r parkBurstResult
	r.span, r.missing, r.repeated, r.overlaps = burst.tally(start, n)
	r.creates = int(creates.Load()) - len(enqueued) // the burst's, its own tasks included
	var lat []time.Duration
	for i, at := range enqueued {
		if s, ok := starts[i]; ok {
			lat = append(lat, s.Sub(at))
		}
	}
	attempts := f.srv.Attempts()
	r.dispatches = len(attempts) - len(enqueued)
	r.otherP50, r.otherMax = medianMax(lat)
	var queued, worked []time.Duration
	for _, a := range attempts {
		i, ok := otherTask[a.Task]
		if !ok || a.Number != 1 {
			continue
		}
		if s, ok := starts[i]; ok {
			queued = append(queued, a.Dispatched.Sub(enqueued[i]))
			worked = append(worked, s.Sub(a.Dispatched))
		}
	}
	r.queueP50, r.queueMax = medianMax(queued)
	r.workerP50, r.workerMax = medianMax(worked)
	if r.missing > 0 || r.repeated > 0 || r.overlaps > 0 {
		b.Errorf("%d tasks: %d missing, %d ran more than once, %d overlapped", n, r.missing, r.repeated, r.overlaps)
	}
	return r
}

// medianMax returns the median and the largest of ds (zero when empty).
func medianMax(ds []time.Duration) (time.Duration, time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	slices.Sort(ds)
	return ds[len(ds)/2], ds[len(ds)-1]
}
