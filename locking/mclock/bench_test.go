package mclock_test

import (
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/mclock"
	"github.com/taskguard/taskguard/locking/mclock/mctest"
)

// BenchmarkAcquireRelease measures an uncontended acquire and release on a
// real memcached over loopback (4 round trips together).
func BenchmarkAcquireRelease(b *testing.B) {
	srv := mctest.Start(b)
	c := memcache.New(srv.Addr)
	b.Cleanup(func() { _ = c.Close() })
	be, err := mclock.New(c, mclock.Options{Prefix: uniquePrefix()})
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
