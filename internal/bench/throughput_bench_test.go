package bench

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// measureFor is how long each throughput configuration runs.
const measureFor = time.Second

// system makes the instances of one lock implementation on one store.
type system struct {
	name string
	// open starts (or reuses) the store for b and returns a function that
	// makes a new instance on it: its own client on its own connection.
	open func(b *testing.B) func() locker
}

// systems returns ours on each backend, then the Datastore baselines.
func systems(lease time.Duration, cfg locking.Config) []system {
	return []system{
		{"datastore/ours", func(b *testing.B) func() locker {
			e := emulator(b)
			return func() locker { return newOurs(dsBackend(b, e, &rpcCounter{}), cfg, locking.Lease(lease)) }
		}},
		{"datastore/djangae", func(b *testing.B) func() locker {
			e := emulator(b)
			return func() locker { return &djangae{c: dsClient(b, e, &rpcCounter{}), stealAfter: lease} }
		}},
		{"datastore/googlelock", func(b *testing.B) func() locker {
			e := emulator(b)
			return func() locker { return &googleLock{c: dsClient(b, e, &rpcCounter{}), lease: lease} }
		}},
		{"memcached/ours", func(b *testing.B) func() locker {
			addr, prefix := memcached(b), uniq("s")+":"
			return func() locker { return newOurs(mcBackend(b, addr, prefix, &rpcCounter{}), cfg, locking.Lease(lease)) }
		}},
		{"memory/ours", func(b *testing.B) func() locker {
			be := memlock.New() // one store; each Client on it is an instance
			return func() locker { return newOurs(be, cfg, locking.Lease(lease)) }
		}},
		{"redis/ours", func(b *testing.B) func() locker {
			addr, prefix := redisAddr(b), uniq("s")+":"
			return func() locker { return newOurs(redisBackend(b, addr, prefix, &rpcCounter{}), cfg, locking.Lease(lease)) }
		}},
	}
}

// BenchmarkThroughput runs g goroutines of one instance, each acquiring and
// releasing its own id in a loop for measureFor, and reports the cycles
// (acquire + release) per second and the latency percentiles of each call.
func BenchmarkThroughput(b *testing.B) {
	for _, s := range systems(30*time.Second, backoffConfig()) {
		for _, g := range []int{1, 4, 16, 64} {
			b.Run(fmt.Sprintf("%s/g=%d", s.name, g), func(b *testing.B) {
				lk := s.open(b)()
				var acq, rel []time.Duration
				var cycles int
				var elapsed time.Duration
				for b.Loop() {
					a, r, n, d, err := throughput(b.Context(), lk, g)
					if err != nil {
						b.Fatal(err)
					}
					acq, rel = append(acq, a...), append(rel, r...)
					cycles += n
					elapsed += d
				}
				b.ReportMetric(float64(cycles)/elapsed.Seconds(), "cycles/s")
				b.ReportMetric(float64(percentile(acq, 50)), "acq-p50-ns")
				b.ReportMetric(float64(percentile(acq, 99)), "acq-p99-ns")
				b.ReportMetric(float64(percentile(rel, 50)), "rel-p50-ns")
				b.ReportMetric(float64(percentile(rel, 99)), "rel-p99-ns")
			})
		}
	}
}

// throughput runs g goroutines on distinct ids for measureFor.
func throughput(ctx context.Context, lk locker, g int) (acq, rel []time.Duration, cycles int, elapsed time.Duration, err error) {
	var mu sync.Mutex
	start := time.Now()
	stop := start.Add(measureFor)
	eg, ctx := errgroup.WithContext(ctx)
	for range g {
		eg.Go(func() error {
			id := uniq("tp")
			var a, r []time.Duration
			defer func() {
				mu.Lock()
				acq, rel = append(acq, a...), append(rel, r...)
				mu.Unlock()
			}()
			for time.Now().Before(stop) {
				t0 := time.Now()
				release, err := lk.acquire(ctx, id)
				if err != nil {
					return err
				}
				t1 := time.Now()
				if err := release(ctx); err != nil {
					return err
				}
				a, r = append(a, t1.Sub(t0)), append(r, time.Since(t1))
			}
			return nil
		})
	}
	err = eg.Wait()
	return acq, rel, len(acq), time.Since(start), err
}
