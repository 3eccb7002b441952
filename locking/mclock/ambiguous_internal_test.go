package mclock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"

	"github.com/taskguard/taskguard/internal/faultproxy"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/mclock/mctest"
)

// TestReleaseReplyLost cuts the holder's connection right after its
// release's cas reached memcached, so the cas applies but its reply is lost.
// Before the retry reads the item again, another owner acquires the lock.
// The release happened: Release must return nil, not ErrNotHeld (which the
// Worker turns into a 503 and a re-run of a job that succeeded). A second
// case has the cas cut before it is complete (not applied) while the lock
// is stolen: that release did not happen and must report ErrNotHeld.
func TestReleaseReplyLost(t *testing.T) {
	srv := mctest.Start(t)
	proxy := faultproxy.Start(t, srv.Addr)
	prefix := fmt.Sprintf("lost%d:", time.Now().UnixNano())

	// The holder talks through the proxy; onDial runs once, when the
	// holder's client reconnects after the cut.
	var mu sync.Mutex
	var onDial func()
	hc := memcache.New(proxy.Addr())
	hc.Timeout = 2 * time.Second
	hc.DialContext = func(ctx context.Context, network, address string) (net.Conn, error) {
		mu.Lock()
		f := onDial
		onDial = nil
		mu.Unlock()
		if f != nil {
			f()
		}
		var d net.Dialer
		return d.DialContext(ctx, network, address)
	}
	t.Cleanup(func() { _ = hc.Close() })
	holder, err := New(hc, Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	oc := memcache.New(srv.Addr)
	t.Cleanup(func() { _ = oc.Close() })
	other, err := New(oc, Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name    string
		applied bool // the cut comes after the whole cas, so it applies
	}{
		{"applied", true},
		{"not applied", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := t.Context()
			id := "reply-lost-" + tc.name
			g, err := holder.Acquire(ctx, locking.Request{ID: id, Owner: "holder", Lease: time.Minute})
			if err != nil || !g.Acquired {
				t.Fatalf("Acquire = %+v, %v", g, err)
			}
			time.Sleep(5 * time.Millisecond) // for the steal below
			dialed := false
			holder.beforeCAS = func() {
				holder.beforeCAS = nil
				// The cas Release is about to send, byte for byte as
				// gomemcache writes it.
				it, err := oc.Get(holder.LockKey(id))
				if err != nil {
					t.Fatal(err)
				}
				value := tombstone(g.Token)
				n := len(fmt.Sprintf("cas %s 0 %d %d %d\r\n", it.Key, tombstoneExpiry, len(value), it.CasID)) + len(value) + 2
				if !tc.applied {
					n -= 3 // cut inside the value: memcached never runs it
				}
				proxy.ResetAfter(int64(n))
				mu.Lock()
				onDial = func() {
					dialed = true
					it, err := oc.Get(holder.LockKey(id))
					if err != nil {
						t.Errorf("reading the item after the cut: %v", err)
						return
					}
					if got := isTombstone(it.Value); got != tc.applied {
						t.Errorf("after the cut the item is %q; want a tombstone: %v", it.Value, tc.applied)
					}
					r := locking.Request{ID: id, Owner: "other", Lease: time.Minute}
					if !tc.applied {
						r.StealAfter = time.Millisecond
					}
					if g, err := other.Acquire(ctx, r); err != nil || !g.Acquired {
						t.Errorf("other's Acquire = %+v, %v", g, err)
					}
				}
				mu.Unlock()
			}
			err = holder.Release(ctx, id, "holder")
			if !dialed {
				t.Fatal("the connection was not cut")
			}
			if tc.applied && err != nil {
				t.Errorf("Release whose cas applied = %v; want nil", err)
			}
			if !tc.applied && !errors.Is(err, locking.ErrNotHeld) {
				t.Errorf("Release whose cas did not apply, lock stolen = %v; want ErrNotHeld", err)
			}
			if _, err := other.Renew(ctx, locking.Request{ID: id, Owner: "other", Lease: time.Minute}); err != nil {
				t.Errorf("the other owner lost the lock: %v", err)
			}
		})
	}
}
