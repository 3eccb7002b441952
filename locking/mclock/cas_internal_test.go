package mclock

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/mclock/mctest"
)

// TestStealBetweenGetsAndCAS puts a steal by another instance exactly
// between the owner check (gets) and the write of Renew and Release. The
// write must then fail and leave the thief's lock alone: the bug of "get,
// compare, delete", which deletes whatever is there by then.
func TestStealBetweenGetsAndCAS(t *testing.T) {
	srv := mctest.Start(t)
	prefix := fmt.Sprintf("cas%d:", time.Now().UnixNano())
	newB := func() *Backend {
		c := memcache.New(srv.Addr)
		t.Cleanup(func() { _ = c.Close() })
		b, err := New(c, Options{Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, op := range []string{"Renew", "Release"} {
		t.Run(op, func(t *testing.T) {
			holder, thief, other := newB(), newB(), newB()
			ctx := t.Context()
			id := "interleave-" + op
			if g, err := holder.Acquire(ctx, locking.Request{ID: id, Owner: "holder", Lease: time.Minute}); err != nil || !g.Acquired {
				t.Fatalf("Acquire = %+v, %v", g, err)
			}
			time.Sleep(20 * time.Millisecond)
			stolen := false
			holder.beforeCAS = func() {
				if stolen {
					return
				}
				stolen = true
				g, err := thief.Acquire(ctx, locking.Request{ID: id, Owner: "thief", Lease: time.Minute, StealAfter: 10 * time.Millisecond})
				if err != nil || !g.Acquired {
					t.Errorf("steal = %+v, %v", g, err)
				}
			}
			var err error
			if op == "Renew" {
				_, err = holder.Renew(ctx, locking.Request{ID: id, Owner: "holder", Lease: time.Minute})
			} else {
				err = holder.Release(ctx, id, "holder")
			}
			if !stolen {
				t.Fatal("the hook did not run")
			}
			if !errors.Is(err, locking.ErrNotHeld) {
				t.Errorf("%s after a steal between gets and cas = %v, want ErrNotHeld", op, err)
			}
			if g, err := other.Acquire(ctx, locking.Request{ID: id, Owner: "other", Lease: time.Minute}); err != nil || g.Acquired {
				t.Errorf("the thief's lock is gone: another Acquire = %+v, %v", g, err)
			}
			if _, err := thief.Renew(ctx, locking.Request{ID: id, Owner: "thief", Lease: time.Minute}); err != nil {
				t.Errorf("the thief cannot renew: %v", err)
			}
		})
	}
}

// TestTokenAboveEveryEarlierHolding puts a whole holding by another instance
// (acquire and release) between the moment Acquire draws its token and the
// moment it writes the lock. The token granted must still be above that
// holding's: fencing tokens increase in the order the lock is granted, not
// in the order they were drawn. Found by internal/torture (3 violations in
// a 3-second run); before the fix the later holder got the lower token.
func TestTokenAboveEveryEarlierHolding(t *testing.T) {
	srv := mctest.Start(t)
	prefix := fmt.Sprintf("tok%d:", time.Now().UnixNano())
	newB := func() *Backend {
		c := memcache.New(srv.Addr)
		t.Cleanup(func() { _ = c.Close() })
		b, err := New(c, Options{Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, released := range []bool{true, false} {
		t.Run(fmt.Sprintf("released=%v", released), func(t *testing.T) {
			a, other := newB(), newB()
			ctx := t.Context()
			id := fmt.Sprintf("token-order-%v", released)
			// A first holding, released: the lock item is a tombstone.
			if g, err := other.Acquire(ctx, locking.Request{ID: id, Owner: "first", Lease: time.Minute}); err != nil || !g.Acquired {
				t.Fatalf("Acquire = %+v, %v", g, err)
			}
			if err := other.Release(ctx, id, "first"); err != nil {
				t.Fatal(err)
			}
			var between uint64
			ran := false
			a.afterToken = func() {
				if ran {
					return
				}
				ran = true
				g, err := other.Acquire(ctx, locking.Request{ID: id, Owner: "between", Lease: time.Minute})
				if err != nil || !g.Acquired {
					t.Errorf("Acquire between = %+v, %v", g, err)
					return
				}
				between = g.Token
				if released {
					if err := other.Release(ctx, id, "between"); err != nil {
						t.Error(err)
					}
				}
			}
			g, err := a.Acquire(ctx, locking.Request{ID: id, Owner: "late", Lease: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			if !ran {
				t.Fatal("the hook did not run")
			}
			if !released {
				// Still held by "between": not acquired, nothing to order.
				if g.Acquired {
					t.Fatalf("acquired a lock held by another owner: %+v", g)
				}
				return
			}
			if !g.Acquired {
				t.Fatalf("Acquire of a released lock = %+v", g)
			}
			if g.Token <= between {
				t.Errorf("token %d granted after a holding with token %d; want it higher", g.Token, between)
			}
		})
	}
}
