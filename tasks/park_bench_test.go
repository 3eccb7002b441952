package tasks_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"

	"github.com/taskguard/taskguard/deploy"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// BenchmarkBurst runs a burst of tasks on one lock id through the real
// client, the emulator (deploy's queue settings, the service's throttling
// and whole-second backoffs) and three Workers, in park mode and in 429
// mode, and meanwhile tasks on unrelated lock ids of the same queue. It
// reports the burst's span beside the ideal n × work, and the unrelated
// tasks' start latency (enqueue to start) with and without the burst.
//
// The 429 mode takes minutes (the queue's retry ladder). `make bench` runs
// it (go test -run '^$' -bench '^BenchmarkBurst$' -benchtime 1x ./tasks),
// and internal/benchplot writes its results into BENCHMARKS.md's burst
// table.
func BenchmarkBurst(b *testing.B) {
	const n, work, unrelated = 6, 300 * time.Millisecond, 5
	for _, mode := range []string{"park", "429"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				quiet := burst(b, mode == "park", 0, work, unrelated)
				loaded := burst(b, mode == "park", n, work, unrelated)
				b.ReportMetric(loaded.span.Seconds(), "burst-s")
				b.ReportMetric((time.Duration(n) * work).Seconds(), "ideal-s")
				b.ReportMetric(float64(loaded.busy), "answers-429")
				b.ReportMetric(float64(loaded.unavailable), "answers-503")
				b.ReportMetric(quiet.unrelated.Seconds()*1000, "unrelated-quiet-ms")
				b.ReportMetric(loaded.unrelated.Seconds()*1000, "unrelated-burst-ms")
			}
		})
	}
}

type burstResult struct {
	span        time.Duration // enqueue of the burst to the end of its last run
	unrelated   time.Duration // mean enqueue-to-start of the unrelated tasks
	busy        int           // answers 429
	unavailable int           // answers 503
}

// burst runs n tasks of work on one lock id and, 100 ms later, unrelated
// tasks on distinct ids, and waits for all of them.
func burst(b *testing.B, park bool, n int, work time.Duration, unrelated int) burstResult {
	b.Helper()
	settings, err := deploy.DefaultQueue()
	if err != nil {
		b.Fatal(err)
	}
	srv := taskstest.Start(b, taskstest.Options{})
	admin, err := srv.NewClient(b.Context())
	if err != nil {
		b.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.CreateQueue(b.Context(), &cloudtaskspb.CreateQueueRequest{Parent: location, Queue: settings.Queue(queueName)}); err != nil {
		b.Fatal(err)
	}
	var (
		workers []*tasks.Worker
		next    atomic.Uint64
		busy    atomic.Int32
		unavail atomic.Int32
	)
	ts := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: rw, status: 200}
		workers[next.Add(1)%uint64(len(workers))].ServeHTTP(sw, r)
		switch sw.status {
		case http.StatusTooManyRequests:
			busy.Add(1)
		case http.StatusServiceUnavailable:
			unavail.Add(1)
		}
	}))
	defer ts.Close()
	client, err := tasks.NewClient(b.Context(), baseConfig(ts.URL+"/Worker"), srv.ClientOptions()...)
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	var (
		mu      sync.Mutex
		ends    []time.Time
		starts  = map[int]time.Time{}
		wg      sync.WaitGroup
		store   = memlock.New()
		list    = &tasks.MemoryWaitList{}
		discard = slog.New(slog.DiscardHandler)
	)
	wg.Add(n + unrelated)
	for range 3 {
		locker, err := locking.New(locking.Config{Strong: store, Lease: 5 * time.Second, Logger: discard})
		if err != nil {
			b.Fatal(err)
		}
		opts := []tasks.WorkerOption{tasks.WithLogger(discard), tasks.WithQueue(queueName)}
		if park {
			opts = append(opts, tasks.WithParking(client, list), tasks.WithParkingLease(5*time.Second))
		}
		w, err := tasks.NewWorker(locker, opts...)
		if err != nil {
			b.Fatal(err)
		}
		w.Handle("burst", func(ctx context.Context, d *tasks.Delivery) error {
			time.Sleep(work)
			mu.Lock()
			ends = append(ends, time.Now())
			mu.Unlock()
			wg.Done()
			return nil
		})
		w.Handle("other", func(ctx context.Context, d *tasks.Delivery) error {
			var p struct{ I int }
			_ = d.Decode(&p)
			mu.Lock()
			starts[p.I] = time.Now()
			mu.Unlock()
			wg.Done()
			return nil
		})
		workers = append(workers, w)
	}
	start := time.Now()
	for i := range n {
		if _, err := client.Enqueue(b.Context(), tasks.Task{Job: "burst", LockID: "hot", Payload: map[string]int{"I": i}}); err != nil {
			b.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	enqueued := map[int]time.Time{}
	for i := range unrelated {
		enqueued[i] = time.Now()
		if _, err := client.Enqueue(b.Context(), tasks.Task{Job: "other", LockID: fmt.Sprintf("cold-%d", i), Payload: map[string]int{"I": i}}); err != nil {
			b.Fatal(err)
		}
	}
	wg.Wait()
	ctx, cancel := context.WithTimeout(b.Context(), 10*time.Minute)
	defer cancel()
	if err := srv.WaitIdle(ctx, queueName); err != nil {
		b.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	var res burstResult
	for _, e := range ends {
		res.span = max(res.span, e.Sub(start))
	}
	for i, at := range enqueued {
		res.unrelated += starts[i].Sub(at)
	}
	res.unrelated /= time.Duration(unrelated)
	res.busy = int(busy.Load())
	res.unavailable = int(unavail.Load())
	return res
}
