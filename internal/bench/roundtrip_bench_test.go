package bench

import (
	"context"
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
)

// opsPerRound is how many operations each round-trip benchmark counts per
// iteration.
const opsPerRound = 20

// rtOp measures one operation: setup runs uncounted, then op is counted,
// then cleanup runs uncounted.
type rtOp struct {
	name                string
	setup, op, teardown func(ctx context.Context, i int) error
}

// runRoundTrips counts the round trips of each op at the wire (cnt) and
// reports rpcs/op. Each op runs opsPerRound times per iteration.
func runRoundTrips(b *testing.B, cnt *rpcCounter, ops []rtOp) {
	for _, o := range ops {
		b.Run(o.name, func(b *testing.B) {
			ctx := b.Context()
			var total, n int64
			var seen []string
			for b.Loop() {
				for i := range opsPerRound {
					if o.setup != nil {
						if err := o.setup(ctx, i); err != nil {
							b.Fatalf("setup: %v", err)
						}
					}
					cnt.take()
					if err := o.op(ctx, i); err != nil {
						b.Fatalf("%s: %v", o.name, err)
					}
					c, m := cnt.take()
					total += c
					n++
					if seen == nil {
						seen = m
					}
					if o.teardown != nil {
						if err := o.teardown(ctx, i); err != nil {
							b.Fatalf("teardown: %v", err)
						}
					}
				}
			}
			b.ReportMetric(float64(total)/float64(n), "rpcs/op")
			if len(seen) > 0 {
				b.Logf("%s: %s", o.name, strings.Join(seen, ", "))
			}
		})
	}
}

// ourRoundTrips are the operations of our client on backend be (counted by
// cnt), with other (uncounted) as another instance holding the lock.
func ourRoundTrips(b *testing.B, be, other locking.Backend, cnt *rpcCounter) []rtOp {
	c := newClient(b, be, locking.Config{})
	var (
		ids   []string
		locks = make([]*locking.Lock, opsPerRound)
	)
	fresh := func(ctx context.Context, i int) error {
		if i == 0 {
			ids = ids[:0]
		}
		ids = append(ids, uniq("rt"))
		return nil
	}
	acquire := func(ctx context.Context, i int) (err error) {
		locks[i], err = c.Acquire(ctx, ids[i])
		return err
	}
	release := func(ctx context.Context, i int) error { return locks[i].Release(ctx) }
	owner := rand.Text()
	req := func(i int) locking.Request {
		return locking.Request{ID: ids[i], Owner: owner, Lease: time.Minute}
	}
	mustGrant := func(g locking.Grant, err error, want bool) error {
		if err == nil && g.Acquired != want {
			return errUnexpected
		}
		return err
	}
	return []rtOp{
		{name: "acquire", setup: fresh, op: acquire, teardown: release},
		{name: "release", setup: func(ctx context.Context, i int) error {
			_ = fresh(ctx, i)
			return acquire(ctx, i)
		}, op: release},
		{name: "renew", setup: func(ctx context.Context, i int) error {
			_ = fresh(ctx, i)
			g, err := be.Acquire(ctx, req(i))
			return mustGrant(g, err, true)
		}, op: func(ctx context.Context, i int) error {
			_, err := be.Renew(ctx, req(i))
			return err
		}, teardown: func(ctx context.Context, i int) error { return be.Release(ctx, ids[i], owner) }},
		{name: "reacquire", setup: func(ctx context.Context, i int) error {
			_ = fresh(ctx, i)
			if err := acquire(ctx, i); err != nil {
				return err
			}
			return release(ctx, i)
		}, op: acquire, teardown: release},
		{name: "poll", setup: func(ctx context.Context, i int) error {
			_ = fresh(ctx, i)
			g, err := other.Acquire(ctx, locking.Request{ID: ids[i], Owner: "holder", Lease: time.Minute})
			if err := mustGrant(g, err, true); err != nil {
				return err
			}
			g, err = be.Acquire(ctx, req(i)) // the first try, before the waiter knows the lock is held
			return mustGrant(g, err, false)
		}, op: func(ctx context.Context, i int) error {
			g, err := be.Acquire(ctx, req(i))
			return mustGrant(g, err, false)
		}, teardown: func(ctx context.Context, i int) error { return other.Release(ctx, ids[i], "holder") }},
	}
}

type unexpected struct{}

func (unexpected) Error() string { return "unexpected grant" }

var errUnexpected error = unexpected{}

// BenchmarkRoundTrips counts round trips per operation at the wire: gRPC
// calls through an interceptor for Datastore, command writes for memcached
// and redis. "poll" is one further try by a waiter that already found the
// lock held. The djangae baseline has no renewal; neither has
// datastore-lock (both report no renew sub-benchmark).
func BenchmarkRoundTrips(b *testing.B) {
	b.Run("datastore/ours", func(b *testing.B) {
		e := emulator(b)
		var cnt, other rpcCounter
		runRoundTrips(b, &cnt, ourRoundTrips(b, dsBackend(b, e, &cnt), dsBackend(b, e, &other), &cnt))
	})
	b.Run("datastore/djangae", func(b *testing.B) {
		e := emulator(b)
		var cnt, ocnt rpcCounter
		d := &djangae{c: dsClient(b, e, &cnt)}
		holder := &djangae{c: dsClient(b, e, &ocnt)}
		runRoundTrips(b, &cnt, baselineRoundTrips(
			func(ctx context.Context, id string) (bool, error) { return d.try(ctx, id) },
			func(ctx context.Context, id string) error { return d.c.Delete(ctx, djangaeKey(id)) },
			func(ctx context.Context, id string) (bool, error) { return holder.try(ctx, id) },
			func(ctx context.Context, id string) error { return holder.c.Delete(ctx, djangaeKey(id)) },
		))
	})
	b.Run("datastore/googlelock", func(b *testing.B) {
		e := emulator(b)
		var cnt, ocnt rpcCounter
		g := &googleLock{c: dsClient(b, e, &cnt), lease: time.Minute}
		holder := &googleLock{c: dsClient(b, e, &ocnt), lease: time.Minute}
		runRoundTrips(b, &cnt, baselineRoundTrips(
			func(ctx context.Context, id string) (bool, error) { return g.try(ctx, id, "me") },
			func(ctx context.Context, id string) error { return g.release(ctx, id, "me") },
			func(ctx context.Context, id string) (bool, error) { return holder.try(ctx, id, "holder") },
			func(ctx context.Context, id string) error { return holder.release(ctx, id, "holder") },
		))
	})
	b.Run("memcached/ours", func(b *testing.B) {
		addr, prefix := memcached(b), uniq("b")+":"
		var cnt, other rpcCounter
		runRoundTrips(b, &cnt, ourRoundTrips(b, mcBackend(b, addr, prefix, &cnt), mcBackend(b, addr, prefix, &other), &cnt))
	})
	b.Run("redis/ours", func(b *testing.B) {
		addr, prefix := redisAddr(b), uniq("b")+":"
		var cnt, other rpcCounter
		be, ob := redisBackend(b, addr, prefix, &cnt), redisBackend(b, addr, prefix, &other)
		// Open the pooled connection and load the scripts (a one-time
		// handshake and SCRIPT LOAD, not lock round trips).
		warm := locking.Request{ID: uniq("warm"), Owner: "w", Lease: time.Second}
		if _, err := be.Acquire(b.Context(), warm); err != nil {
			b.Fatal(err)
		}
		if _, err := be.Renew(b.Context(), warm); err != nil {
			b.Fatal(err)
		}
		if err := be.Release(b.Context(), warm.ID, warm.Owner); err != nil {
			b.Fatal(err)
		}
		runRoundTrips(b, &cnt, ourRoundTrips(b, be, ob, &cnt))
	})
}

// baselineRoundTrips are the operations of a baseline: try acquires once,
// release releases; the holder's functions act as another instance.
func baselineRoundTrips(try func(context.Context, string) (bool, error), release func(context.Context, string) error,
	holdTry func(context.Context, string) (bool, error), holdRelease func(context.Context, string) error) []rtOp {
	ids := make([]string, opsPerRound)
	fresh := func(ctx context.Context, i int) error { ids[i] = uniq("rt"); return nil }
	acquire := func(ctx context.Context, i int) error {
		ok, err := try(ctx, ids[i])
		if err == nil && !ok {
			return errUnexpected
		}
		return err
	}
	rel := func(ctx context.Context, i int) error { return release(ctx, ids[i]) }
	return []rtOp{
		{name: "acquire", setup: fresh, op: acquire, teardown: rel},
		{name: "release", setup: func(ctx context.Context, i int) error { _ = fresh(ctx, i); return acquire(ctx, i) }, op: rel},
		{name: "reacquire", setup: func(ctx context.Context, i int) error {
			_ = fresh(ctx, i)
			if err := acquire(ctx, i); err != nil {
				return err
			}
			return rel(ctx, i)
		}, op: acquire, teardown: rel},
		{name: "poll", setup: func(ctx context.Context, i int) error {
			_ = fresh(ctx, i)
			ok, err := holdTry(ctx, ids[i])
			if err == nil && !ok {
				return errUnexpected
			}
			return err
		}, op: func(ctx context.Context, i int) error {
			ok, err := try(ctx, ids[i])
			if err == nil && ok {
				return errUnexpected
			}
			return err
		}, teardown: func(ctx context.Context, i int) error { return holdRelease(ctx, ids[i]) }},
	}
}
