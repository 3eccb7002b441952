package redislock_test

import (
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// BenchmarkAcquireRelease measures an uncontended acquire and release on a
// real redis-server over loopback (2 round trips together).
func BenchmarkAcquireRelease(b *testing.B) {
	srv := redistest.Start(b)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr})
	b.Cleanup(func() { _ = c.Close() })
	be, err := redislock.New(c, redislock.Options{Prefix: uniquePrefix()})
	if err != nil {
		b.Fatal(err)
	}
	ctx := b.Context()
	r := locking.Request{ID: "bench", Owner: "o", Lease: 10 * time.Second}
	for b.Loop() {
		if g, err := be.Acquire(ctx, r); err != nil || !g.Acquired {
			b.Fatalf("Acquire = %+v, %v", g, err)
		}
		if err := be.Release(ctx, r.ID, r.Owner); err != nil {
			b.Fatal(err)
		}
	}
}
