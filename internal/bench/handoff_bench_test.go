package bench

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/taskguard/taskguard/locking"
)

// handoffResult is what runHandoff measured.
type handoffResult struct {
	// fromEnd: from the moment the holder's Release returned (the lock is
	// free) to the moment the next owner's acquire returned, 0 when the next
	// owner got it first (its take landed while the Release reply was on
	// its way). fromCall: from the moment the holder called Release.
	fromEnd, fromCall []time.Duration
	polls             int64 // tries that found the lock held, all instances
	elapsed           time.Duration
}

// runHandoff lets every locker of owners (one goroutine each; the same
// locker may appear several times for goroutines of one instance) take id in
// turn, holding it for hold, until samples hand-offs have happened.
func runHandoff(ctx context.Context, owners []locker, id string, samples int, hold time.Duration) (handoffResult, error) {
	return runHandoffObserved(ctx, owners, id, samples, hold, nil)
}

// runHandoffObserved is runHandoff calling onRelease(k), when not nil, just
// before the holder of holding k (from 0) calls Release.
func runHandoffObserved(ctx context.Context, owners []locker, id string, samples int, hold time.Duration, onRelease func(k int)) (handoffResult, error) {
	var (
		mu                     sync.Mutex
		acqAt, relCall, relEnd []time.Time // by holding, in order
		// taken[k] is closed when holding k+1 starts: an owner that
		// released holding k waits for it before trying again, so that
		// the lock goes to a waiting owner, not back to the one that just
		// released it.
		taken []chan struct{}
	)
	instances := map[locker]int64{}
	for _, o := range owners {
		instances[o] = o.polls()
	}
	start := time.Now()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	eg, ctx := errgroup.WithContext(ctx)
	for _, lk := range owners {
		eg.Go(func() error {
			for {
				release, err := lk.acquire(ctx, id)
				if err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return err
				}
				now := time.Now()
				mu.Lock()
				k := len(acqAt)
				acqAt, relCall, relEnd = append(acqAt, now), append(relCall, time.Time{}), append(relEnd, time.Time{})
				if k > 0 {
					close(taken[k-1])
				}
				taken = append(taken, make(chan struct{}))
				next := taken[k]
				mu.Unlock()
				last := k >= samples
				pause := hold
				if k == 0 {
					pause += 100 * time.Millisecond // let every owner start waiting
				}
				if !last {
					_ = sleepCtx(ctx, pause)
				}
				if onRelease != nil {
					onRelease(k)
				}
				called := time.Now()
				err = release(context.WithoutCancel(ctx))
				ended := time.Now()
				mu.Lock()
				relCall[k], relEnd[k] = called, ended
				mu.Unlock()
				if last {
					cancel()
					return err
				}
				if err != nil && ctx.Err() == nil {
					return fmt.Errorf("release: %w", err)
				}
				select {
				case <-next:
				case <-ctx.Done():
					return nil
				}
			}
		})
	}
	if err := eg.Wait(); err != nil {
		return handoffResult{}, err
	}
	r := handoffResult{elapsed: time.Since(start)}
	for k := 1; k < len(acqAt); k++ {
		r.fromEnd = append(r.fromEnd, max(0, acqAt[k].Sub(relEnd[k-1])))
		r.fromCall = append(r.fromCall, acqAt[k].Sub(relCall[k-1]))
	}
	for o, before := range instances {
		r.polls += o.polls() - before
	}
	return r, nil
}

// handoffSamples is how many hand-offs each configuration measures: fewer
// for the baselines, whose hand-offs take up to seconds.
var handoffSamples = map[string]int{
	"datastore/ours":       60,
	"datastore/djangae":    20,
	"datastore/googlelock": 5,
	"memcached/ours":       60,
	"memory/ours":          60,
	"redis/ours":           60,
}

// backoffConfig is the locking.Config of our instances: the package
// defaults, or the pauses named by BENCH_MIN_BACKOFF and BENCH_MAX_BACKOFF
// (Go durations), for comparing settings.
func backoffConfig() locking.Config {
	var cfg locking.Config
	cfg.MinBackoff, _ = time.ParseDuration(os.Getenv("BENCH_MIN_BACKOFF"))
	cfg.MaxBackoff, _ = time.ParseDuration(os.Getenv("BENCH_MAX_BACKOFF"))
	return cfg
}

// BenchmarkHandoff measures hand-off with n waiters: n+1 owners take one id
// in turn, each holding it for hold (50 ms; and 500 ms with 2 waiters, when
// cross-instance waiters have backed off to their longest pauses), so that
// n wait while one holds. An owner that released waits for the next owner
// to take the lock before it tries again.
//
// "cross": every owner is its own instance (its own client on its own
// connection; taskguard's local gate is per Client, so these behave as
// separate processes). "local": all owners share one instance (one Client,
// or one baseline client), as goroutines of one process.
//
// Metrics: p50-ns and p99-ns from the holder's Release returning to the next
// owner holding the lock; call-p50-ns from the holder calling Release (so
// including the release's own round trips); polls/s: tries that found the
// lock held, per second, per waiting instance (cross: n instances wait;
// local: the one instance).
func BenchmarkHandoff(b *testing.B) {
	for _, s := range systems(30*time.Second, backoffConfig()) {
		for _, mode := range []string{"cross", "local"} {
			if s.name == "datastore/googlelock" && mode == "local" {
				continue // no local coordination: the same as cross, at seconds per sample
			}
			for _, n := range []int{2, 8, 32} {
				b.Run(fmt.Sprintf("%s/%s/hold=50ms/waiters=%d", s.name, mode, n), func(b *testing.B) {
					benchHandoff(b, s, mode, n, 50*time.Millisecond, handoffSamples[s.name])
				})
			}
			if mode == "cross" && (s.name == "datastore/ours" || s.name == "datastore/djangae") {
				b.Run(s.name+"/cross/hold=500ms/waiters=2", func(b *testing.B) {
					benchHandoff(b, s, mode, 2, 500*time.Millisecond, 40)
				})
			}
		}
	}
}

func benchHandoff(b *testing.B, s system, mode string, n int, hold time.Duration, samples int) {
	instance := s.open(b)
	owners := make([]locker, n+1)
	for i := range owners {
		if mode == "local" && i > 0 {
			owners[i] = owners[0]
			continue
		}
		owners[i] = instance()
	}
	var all handoffResult
	for b.Loop() {
		r, err := runHandoff(b.Context(), owners, uniq("handoff"), samples, hold)
		if err != nil {
			b.Fatal(err)
		}
		all.fromEnd = append(all.fromEnd, r.fromEnd...)
		all.fromCall = append(all.fromCall, r.fromCall...)
		all.polls += r.polls
		all.elapsed += r.elapsed
	}
	waiting := float64(n)
	if mode == "local" {
		waiting = 1
	}
	b.ReportMetric(float64(percentile(all.fromEnd, 50)), "p50-ns")
	b.ReportMetric(float64(percentile(all.fromEnd, 99)), "p99-ns")
	b.ReportMetric(float64(percentile(all.fromCall, 50)), "call-p50-ns")
	b.ReportMetric(float64(all.polls)/all.elapsed.Seconds()/waiting, "polls/s")
	b.ReportMetric(float64(len(all.fromEnd)), "samples")
}
