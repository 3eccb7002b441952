package tasks_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dsclient "cloud.google.com/go/datastore"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/taskguard/taskguard/internal/netdelay"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/dswait"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// BenchmarkParkDistance is the park burst of issue 21 on loopback and under
// the production-like model (internal/netdelay.Production: Datastore 15 ms
// each way, through a netdelay proxy for the locks and the wait list alike;
// 50 ms per CreateTask; a dispatch 50 to 100 ms after a task falls due), in
// one run: 20 tasks of 100 ms on one lock id, enqueued at once, three
// Workers, deploy's queue, the default 30 s lease, locks (dslock) and the
// wait list (dswait) on the Firestore emulator.
//
// Each runs twice: the burst enqueued at once through the queue (Client
// without ParkAtEnqueue; enqueue=queue), and enqueued one after another
// by a Client parking at enqueue (enqueue=park), the first task through
// the queue, the others into the wait list.
//
// It reports the span (first enqueue to the last run's end) against the
// goal ideal + 20 × (3 RTT + 1 dispatch), with the RTT measured in the same
// run (rtt-ms: the median of bare commits through the same proxy: the
// model's 30 ms plus the emulator's own time; bound-s) and the model's
// (model-bound-s), the dispatch being the model's mean (75 ms; 0 on
// loopback); the park hand-off mean (taskguard.tasks.handoff.latency: the
// creation of a wake to its waiter's start); and the Datastore RPCs,
// CreateTask calls (the tasks' own included) and dispatches per task,
// counted at the wire; and each
// Enqueue's latency (median and max).
//
// `make bench` runs it; BENCHMARKS.md gives the figures.
func BenchmarkParkDistance(b *testing.B) {
	const n, work = 20, 100 * time.Millisecond
	for _, m := range []netdelay.Model{netdelay.Loopback, netdelay.Production} {
		for _, atEnqueue := range []bool{false, true} {
			mode := "queue"
			if atEnqueue {
				mode = "park"
			}
			b.Run("net="+m.Name+"/enqueue="+mode, func(b *testing.B) {
				benchParkDistance(b, m, n, work, atEnqueue)
			})
		}
	}
}

func benchParkDistance(b *testing.B, m netdelay.Model, n int, work time.Duration, atEnqueue bool) {
	for range b.N {
		r := parkDistance(b, m, n, work, atEnqueue)
		ideal := time.Duration(n) * work
		dispatch := (m.DispatchMin + m.DispatchMax) / 2
		bound := ideal + time.Duration(n)*(3*r.rtt+dispatch)
		modelBound := ideal + time.Duration(n)*(3*m.RTT()+dispatch)
		b.ReportMetric(r.span.Seconds(), "burst-s")
		b.ReportMetric(ideal.Seconds(), "ideal-s")
		b.ReportMetric(bound.Seconds(), "bound-s")
		b.ReportMetric(modelBound.Seconds(), "model-bound-s")
		b.ReportMetric(r.span.Seconds()/bound.Seconds(), "of-bound")
		b.ReportMetric(float64(r.rtt)/1e6, "rtt-ms")
		b.ReportMetric(float64(r.handoffMean)/1e6, "handoff-mean-ms")
		b.ReportMetric(float64(r.handoffs), "handoffs")
		b.ReportMetric(float64(r.rpcs)/float64(n), "datastore-rpcs/task")
		b.ReportMetric(float64(r.lockRPCs)/float64(n), "lock-rpcs/task")
		b.ReportMetric(float64(r.creates)/float64(n), "createtasks/task")
		b.ReportMetric(float64(r.dispatches)/float64(n), "dispatches/task")
		b.ReportMetric(float64(r.enqueueP50)/1e6, "enqueue-p50-ms")
		b.ReportMetric(float64(r.enqueueMax)/1e6, "enqueue-max-ms")
		b.Logf("%s: %d tasks of %v: span %v; answers %v", m, n, work, r.span, r.answers)
	}
}

type parkDistanceResult struct {
	span, rtt, handoffMean time.Duration
	handoffs               int64
	rpcs, lockRPCs         int64 // Datastore RPCs: all, and the locks' alone
	creates, dispatches    int
	answers                map[int]int
	// Each Enqueue's latency: median and max.
	enqueueP50, enqueueMax time.Duration
}

// rpcCount counts the unary RPCs of the connections it intercepts.
type rpcCount struct{ n atomic.Int64 }

func (c *rpcCount) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	c.n.Add(1)
	return invoker(ctx, method, req, reply, cc, opts...)
}

func parkDistance(b *testing.B, m netdelay.Model, n int, work time.Duration, atEnqueue bool) parkDistanceResult {
	e2eBackend(b) // starts (once) and resets the emulator
	e := datastore.emu
	proxy := m.DatastoreProxy(b, e.Host)
	var listRPCs, lockRPCs rpcCount
	dial := func(c *rpcCount) *grpc.ClientConn {
		cc, err := grpc.NewClient("passthrough:///"+proxy.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithChainUnaryInterceptor(c.intercept))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = cc.Close() })
		return cc
	}
	client, err := dsclient.NewClient(b.Context(), e.ProjectID, option.WithGRPCConn(dial(&listRPCs)))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = client.Close() })
	list, err := dswait.New(client, dswait.Options{})
	if err != nil {
		b.Fatal(err)
	}
	backend := func() locking.Backend {
		bk, err := dslock.New(context.Background(), dslock.Options{Conn: dial(&lockRPCs), ProjectID: e.ProjectID, ClockSkew: 10 * time.Millisecond})
		if err != nil {
			b.Fatal(err)
		}
		return bk
	}

	// The round trip as measured: bare commits through the same proxy.
	var commits []time.Duration
	for i := range 20 {
		k := dsclient.NameKey("BenchRTT", fmt.Sprintf("rtt-%d", i), nil)
		start := time.Now()
		if _, err := client.Put(b.Context(), k, &struct{ V int }{i}); err != nil {
			b.Fatal(err)
		}
		commits = append(commits, time.Since(start))
	}
	slices.Sort(commits)

	var (
		creates atomic.Int64
		burst   = newBurstRuns()
	)
	f := newParkFleetEnv(b, 3, locking.DefaultLease, list, fleetEnv{tasks: m.TasksOptions(taskstest.Options{}), backend: backend}, nil,
		func(_ int, w *tasks.Worker) {
			w.Handle("burst", burst.job(work))
		}, option.WithGRPCDialOption(grpc.WithChainUnaryInterceptor(countCreates(&creates))))
	enq, err := tasks.NewClient(b.Context(), baseConfig(f.url), append(f.srv.ClientOptions(),
		option.WithGRPCDialOption(grpc.WithChainUnaryInterceptor(countCreates(&creates))))...)
	if err != nil {
		b.Fatal(err)
	}
	defer enq.Close()

	if atEnqueue {
		if err := enq.ParkAtEnqueue(f.list, f.lockers[0]); err != nil {
			b.Fatal(err)
		}
	}

	listRPCs.n.Store(0)
	lockRPCs.n.Store(0)
	var (
		eg    sync.WaitGroup
		emu   sync.Mutex
		took  []time.Duration
		start = time.Now()
	)
	enqueue := func(i int) {
		t0 := time.Now()
		if _, err := enq.Enqueue(b.Context(), tasks.Task{Job: "burst", LockID: "hot", Payload: i}); err != nil {
			b.Error(err)
		}
		emu.Lock()
		took = append(took, time.Since(t0))
		emu.Unlock()
	}
	for i := range n {
		if atEnqueue {
			// One after another, as a loop in a program would: the first
			// goes through the queue, the others park at enqueue.
			enqueue(i)
			continue
		}
		eg.Go(func() { enqueue(i) })
	}
	eg.Wait()
	burst.wait(n, time.Now().Add(2*time.Minute), 10*time.Millisecond)
	r := parkDistanceResult{rpcs: listRPCs.n.Load() + lockRPCs.n.Load(), lockRPCs: lockRPCs.n.Load(), rtt: commits[len(commits)/2]}
	ctx, cancel := context.WithTimeout(b.Context(), 2*time.Minute)
	defer cancel()
	if err := f.srv.WaitIdle(ctx, queueName); err != nil {
		b.Logf("the queue did not empty: %v", err)
	}
	var missing, repeated int
	r.span, missing, repeated, _ = burst.tally(start, n)
	if missing > 0 || repeated > 0 {
		b.Errorf("%d tasks: %d missing, %d ran more than once", n, missing, repeated)
	}
	met := f.metrics(b)
	if c := met["taskguard.tasks.handoff.latency count"]; c > 0 {
		r.handoffs = c
		r.handoffMean = time.Duration(met["taskguard.tasks.handoff.latency sum-us"]/c) * time.Microsecond
	}
	r.creates = int(creates.Load())
	r.dispatches = len(f.srv.Attempts())
	r.enqueueP50, r.enqueueMax = medianMax(took)
	r.answers = f.statuses()
	return r
}
