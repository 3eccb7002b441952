package redislock_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/internal/faultproxy"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// replyDropper loses the reply of one script call after the server ran it:
// once armed, the next connection that sends EVALSHA reads the reply off the
// socket, throws it away, closes the connection and reports io.EOF, as when
// a network path breaks after the server answered. go-redis then retries the
// command on a new connection.
type replyDropper struct {
	armed   atomic.Pointer[func()] // run between the lost reply and the retry
	dropped atomic.Int64
}

// arm makes the next script call lose its reply; between runs after the
// reply is lost and before the client retries (nil: nothing).
func (d *replyDropper) arm(between func()) {
	if between == nil {
		between = func() {}
	}
	d.armed.Store(&between)
}

type dropConn struct {
	net.Conn
	d    *replyDropper
	drop atomic.Pointer[func()]
}

func (c *dropConn) Write(p []byte) (int, error) {
	if bytes.Contains(bytes.ToLower(p), []byte("evalsha")) {
		if f := c.d.armed.Swap(nil); f != nil {
			c.drop.Store(f)
		}
	}
	return c.Conn.Write(p)
}

func (c *dropConn) Read(p []byte) (int, error) {
	f := c.drop.Swap(nil)
	if f == nil {
		return c.Conn.Read(p)
	}
	if _, err := c.Conn.Read(p); err != nil { // the reply: the server ran the script
		return 0, err
	}
	_ = c.Conn.Close()
	c.d.dropped.Add(1)
	(*f)()
	return 0, io.EOF
}

// droppingBackend returns a backend whose client loses replies when d is
// armed. The client retries (go-redis's default MaxRetries) after io.EOF.
func droppingBackend(t *testing.T, addr, prefix string, d *replyDropper) *redislock.Backend {
	t.Helper()
	c := redis.NewClient(&redis.Options{
		Addr:                  addr,
		ContextTimeoutEnabled: true,
		DialTimeout:           2 * time.Second,
		Dialer: func(ctx context.Context, network, address string) (net.Conn, error) {
			var nd net.Dialer
			conn, err := nd.DialContext(ctx, network, address)
			if err != nil {
				return nil, err
			}
			return &dropConn{Conn: conn, d: d}, nil
		},
	})
	t.Cleanup(func() { _ = c.Close() })
	b, err := redislock.New(c, redislock.Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestReleaseReplyLost: the release script runs, its reply is lost and the
// client retries. The retry must report the release that happened, not a
// lost lock, also when other owners acquired (and released) the id between
// the two attempts. A second, separate Release still reports ErrNotHeld.
func TestReleaseReplyLost(t *testing.T) {
	srv := redistest.Start(t)
	const lease = time.Minute
	for _, tc := range []struct {
		name string
		// others acquire (and release, all but the last) between the
		// attempts; the last other still holds the lock afterwards when
		// holdLast is set.
		others   int
		holdLast bool
		// forgotten: so many releases came in between that the record no
		// longer remembers this call's (the documented limit): ErrNotHeld.
		forgotten bool
	}{
		{name: "nothing in between"},
		{name: "another owner acquires in between", others: 1, holdLast: true},
		{name: "three owners come and go in between", others: 3},
		{name: "three come and go, a fourth holds", others: 4, holdLast: true},
		{name: "four owners come and go in between", others: 4, forgotten: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prefix := uniquePrefix()
			var d replyDropper
			mine := droppingBackend(t, srv.Addr, prefix, &d)
			other := newBackend(t, srv.Addr, prefix, nil)
			ctx := t.Context()
			const id = "lost-release-reply"
			// Load the scripts first, so that the dropped reply is the release's.
			if g, err := mine.Acquire(ctx, req(id, "warm", lease)); err != nil || !g.Acquired {
				t.Fatalf("Acquire = %+v, %v", g, err)
			}
			if err := mine.Release(ctx, id, "warm"); err != nil {
				t.Fatal(err)
			}
			g1, err := mine.Acquire(ctx, req(id, "me", lease))
			if err != nil || !g1.Acquired {
				t.Fatalf("Acquire = %+v, %v", g1, err)
			}
			var between []error
			d.arm(func() {
				for i := range tc.others {
					owner := "other-" + string(rune('a'+i))
					g, err := other.Acquire(context.Background(), req(id, owner, lease))
					if err == nil && !g.Acquired {
						err = errors.New(owner + " did not acquire the released lock")
					}
					between = append(between, err)
					if i < tc.others-1 || !tc.holdLast {
						between = append(between, other.Release(context.Background(), id, owner))
					}
				}
			})
			err = mine.Release(ctx, id, "me")
			if n := d.dropped.Load(); n != 1 {
				t.Fatalf("%d replies dropped, want 1", n)
			}
			if err := errors.Join(between...); err != nil {
				t.Fatalf("between the attempts: %v", err)
			}
			if tc.forgotten {
				if !errors.Is(err, locking.ErrNotHeld) {
					t.Errorf("Release whose first reply was lost, four releases later = %v, want ErrNotHeld", err)
				}
			} else if err != nil {
				t.Errorf("Release whose first reply was lost = %v, want nil (it was released)", err)
			}
			if err := mine.Release(ctx, id, "me"); !errors.Is(err, locking.ErrNotHeld) {
				t.Errorf("a second Release = %v, want ErrNotHeld", err)
			}
			g, err := other.Acquire(ctx, req(id, "late", lease))
			if err != nil {
				t.Fatal(err)
			}
			if g.Acquired == tc.holdLast {
				t.Errorf("Acquire after the release = %+v; the lock must be held only by the last owner in between (%v)", g, tc.holdLast)
			}
			if g.Acquired && (g.TookOver || g.Token <= g1.Token) {
				t.Errorf("Acquire after a clean release = %+v; want no takeover and a token above %d", g, g1.Token)
			}
		})
	}
}

// TestReleaseReplyLostAfterExpiry: a holding that ended otherwise (its lease
// ran out and another owner took over) is not turned into a success by a
// retry.
func TestReleaseReplyLostAfterExpiry(t *testing.T) {
	srv := redistest.Start(t)
	prefix := uniquePrefix()
	var d replyDropper
	mine := droppingBackend(t, srv.Addr, prefix, &d)
	other := newBackend(t, srv.Addr, prefix, nil)
	ctx := t.Context()
	const id = "lost-after-expiry"
	if g, err := mine.Acquire(ctx, req(id, "me", 20*time.Millisecond)); err != nil || !g.Acquired {
		t.Fatalf("Acquire = %+v, %v", g, err)
	}
	time.Sleep(50 * time.Millisecond)
	if g, err := other.Acquire(ctx, req(id, "other", time.Minute)); err != nil || !g.Acquired || !g.TookOver {
		t.Fatalf("takeover = %+v, %v", g, err)
	}
	d.arm(nil)
	if err := mine.Release(ctx, id, "me"); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Release after a takeover, reply lost = %v, want ErrNotHeld", err)
	}
	if g, err := other.Acquire(ctx, req(id, "third", time.Minute)); err != nil || g.Acquired {
		t.Errorf("the new holder's lock is free after the old holder's Release: %+v, %v", g, err)
	}
}

// TestAcquireReplyLate is what the core does when an acquire's reply misses
// the caller's deadline: the script ran (a "ghost" holding), the caller got
// an error and releases with the same owner on a fresh context. Nothing
// must stay held: another owner acquires at once.
func TestAcquireReplyLate(t *testing.T) {
	srv := redistest.Start(t)
	p := faultproxy.Start(t, srv.Addr)
	prefix := uniquePrefix()
	slow := newBackend(t, p.Addr(), prefix, nil)
	fast := newBackend(t, srv.Addr, prefix, nil)
	ctx := t.Context()
	const id, lease = "late-acquire-reply", 20 * time.Second
	// Connect and load the scripts before the latency.
	if g, err := slow.Acquire(ctx, req(id, "warm", lease)); err != nil || !g.Acquired {
		t.Fatalf("Acquire = %+v, %v", g, err)
	}
	if err := slow.Release(ctx, id, "warm"); err != nil {
		t.Fatal(err)
	}
	p.SetLatency(300 * time.Millisecond) // each way
	actx, cancel := context.WithTimeout(ctx, 450*time.Millisecond)
	g, err := slow.Acquire(actx, req(id, "me", lease))
	cancel()
	if err == nil {
		t.Fatalf("Acquire with a 450 ms deadline over 300 ms each way = %+v, nil; want an error", g)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Logf("Acquire error: %v", err)
	}
	// The request is on its way through the proxy even though the caller
	// gave up: wait until the server has run it (the ghost holding).
	// (Renew by the same owner succeeds once it has, and changes nothing
	// before.)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		_, err := fast.Renew(ctx, req(id, "me", lease))
		if err == nil {
			break
		}
		if !errors.Is(err, locking.ErrNotHeld) {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatal("the late acquire never reached the server")
		}
	}
	if g, err := fast.Acquire(ctx, req(id, "probe", lease)); err != nil || g.Acquired {
		t.Fatalf("Acquire while the ghost holding is out = %+v, %v; want busy", g, err)
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer rcancel()
	if err := slow.Release(rctx, id, "me"); err != nil {
		t.Errorf("cleanup Release = %v, want nil: the acquire had landed", err)
	}
	p.SetLatency(0)
	g, err = fast.Acquire(ctx, req(id, "next", lease))
	if err != nil || !g.Acquired {
		t.Fatalf("another owner's Acquire right after the cleanup = %+v, %v; want acquired", g, err)
	}
	if g.TookOver {
		t.Error("TookOver after the cleanup released the ghost holding")
	}
}

// TestTinyDurations: durations below the server's resolution are rounded
// up, never down to zero: StealAfter of 1 ns steals a held lock (it is not
// "never steal"), and a lease of 1 ns acquires and expires.
func TestTinyDurations(t *testing.T) {
	srv := redistest.Start(t)
	bs := sameStore(t, srv.Addr, 2)
	ctx := t.Context()
	for _, steal := range []time.Duration{time.Nanosecond, 500 * time.Nanosecond, 999 * time.Nanosecond, 1500 * time.Nanosecond} {
		id := "steal-" + steal.String()
		g1, err := bs[0].Acquire(ctx, req(id, "holder", time.Minute))
		if err != nil || !g1.Acquired {
			t.Fatalf("Acquire = %+v, %v", g1, err)
		}
		time.Sleep(5 * time.Millisecond)
		g, err := bs[1].Acquire(ctx, locking.Request{ID: id, Owner: "thief", Lease: time.Minute, StealAfter: steal})
		if err != nil || !g.Acquired || !g.TookOver || g.Token <= g1.Token {
			t.Errorf("StealAfter(%v) 5 ms after the holder acquired = %+v, %v; want stolen with a larger token", steal, g, err)
		}
	}

	g1, err := bs[0].Acquire(ctx, req("lease-1ns", "a", time.Nanosecond))
	if err != nil || !g1.Acquired {
		t.Fatalf("Acquire with a 1 ns lease = %+v, %v", g1, err)
	}
	deadline := time.Now().Add(time.Second)
	for {
		g, err := bs[1].Acquire(ctx, req("lease-1ns", "b", time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		if g.Acquired {
			if !g.TookOver || g.Token <= g1.Token {
				t.Errorf("taking over an expired 1 ns lease = %+v; want TookOver and a token above %d", g, g1.Token)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a 1 ns lease still held after 1 s (Remaining %v)", g.Remaining)
		}
		time.Sleep(time.Millisecond)
	}
	if _, err := bs[0].Renew(ctx, req("lease-1ns", "a", time.Minute)); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Renew of an expired 1 ns lease = %v, want ErrNotHeld", err)
	}
}

// TestDurationLimits: a backend request outside locking.MaxLease, or with a
// lease that is not positive, is refused before any I/O with an error that
// matches both ErrInvalidRequest and locking.ErrInvalid; the maxima work.
func TestDurationLimits(t *testing.T) {
	// No server behind this client: any I/O would fail with a dial error.
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1})
	t.Cleanup(func() { _ = c.Close() })
	off, err := redislock.New(c, redislock.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	for _, r := range []locking.Request{
		{ID: "x", Owner: "o", Lease: 0},
		{ID: "x", Owner: "o", Lease: -time.Second},
		{ID: "x", Owner: "o", Lease: locking.MaxLease + time.Nanosecond},
		{ID: "x", Owner: "o", Lease: math.MaxInt64},
		{ID: "x", Owner: "o", Lease: time.Second, StealAfter: -1},
		{ID: "x", Owner: "o", Lease: time.Second, StealAfter: locking.MaxLease + 1},
		{ID: "x", Owner: "o", Lease: time.Second, StealAfter: math.MaxInt64},
		{ID: "", Owner: "o", Lease: time.Second},
		{ID: "x", Owner: "", Lease: time.Second},
	} {
		_, aerr := off.Acquire(ctx, r)
		_, rerr := off.Renew(ctx, r)
		for _, err := range []error{aerr, rerr} {
			if !errors.Is(err, redislock.ErrInvalidRequest) || !errors.Is(err, locking.ErrInvalid) {
				t.Errorf("request %+v: %v; want ErrInvalidRequest and locking.ErrInvalid", r, err)
			}
		}
	}
	for _, args := range [][2]string{{"", "o"}, {"x", ""}} {
		if err := off.Release(ctx, args[0], args[1]); !errors.Is(err, redislock.ErrInvalidRequest) || !errors.Is(err, locking.ErrInvalid) {
			t.Errorf("Release(%q, %q) = %v; want ErrInvalidRequest and locking.ErrInvalid", args[0], args[1], err)
		}
	}

	srv := redistest.Start(t)
	bs := sameStore(t, srv.Addr, 2)
	max := locking.Request{ID: "max", Owner: "a", Lease: locking.MaxLease, StealAfter: locking.MaxLease}
	g, err := bs[0].Acquire(ctx, max)
	if err != nil || !g.Acquired {
		t.Fatalf("Acquire with the maximum lease = %+v, %v", g, err)
	}
	if _, err := bs[0].Renew(ctx, max); err != nil {
		t.Errorf("Renew with the maximum lease: %v", err)
	}
	g, err = bs[1].Acquire(ctx, locking.Request{ID: "max", Owner: "b", Lease: time.Second, StealAfter: locking.MaxLease})
	if err != nil || g.Acquired || g.Remaining <= locking.MaxLease-time.Minute || g.Remaining > locking.MaxLease {
		t.Errorf("second Acquire = %+v, %v; want busy with about %v remaining", g, err, locking.MaxLease)
	}
	if err := bs[0].Release(ctx, "max", "a"); err != nil {
		t.Errorf("Release: %v", err)
	}
}

// TestEarlierLayout: a holding written by an earlier version ("<token> <µs>
// <owner>" under the same key, the lease as TTL) is busy until it expires,
// is never stolen, and cannot be renewed or released by this version; a key
// holding anything else is an error, never a grant.
func TestEarlierLayout(t *testing.T) {
	srv := redistest.Start(t)
	prefix := uniquePrefix()
	c := newClient(t, srv.Addr, nil)
	b, err := redislock.New(c, redislock.Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if err := c.Set(ctx, b.LockKey("old"), "1796038990423656 1796038990423656 old-owner", 300*time.Millisecond).Err(); err != nil {
		t.Fatal(err)
	}
	g, err := b.Acquire(ctx, locking.Request{ID: "old", Owner: "new", Lease: time.Minute, StealAfter: time.Nanosecond})
	if err != nil || g.Acquired || g.Remaining <= 0 || g.Remaining > 300*time.Millisecond {
		t.Fatalf("Acquire of an earlier version's holding = %+v, %v; want busy for its PTTL", g, err)
	}
	if _, err := b.Renew(ctx, req("old", "old-owner", time.Minute)); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Renew = %v, want ErrNotHeld", err)
	}
	if err := b.Release(ctx, "old", "old-owner"); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Release = %v, want ErrNotHeld", err)
	}
	time.Sleep(350 * time.Millisecond)
	g, err = b.Acquire(ctx, req("old", "new", time.Minute))
	if err != nil || !g.Acquired || g.Token <= 1796038990423656 {
		t.Errorf("Acquire after the earlier holding expired = %+v, %v; want acquired with a larger token", g, err)
	}

	if err := c.Set(ctx, b.LockKey("junk"), "not a lock", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if g, err := b.Acquire(ctx, req("junk", "new", time.Minute)); err == nil || g.Acquired {
		t.Errorf("Acquire over a foreign value = %+v, %v; want an error", g, err)
	}
}

// TestAcquireReplyLost: the acquire script runs, its reply is lost and
// go-redis retries: the retry finds the lock held by the same owner and
// returns that holding (its token), not "busy".
func TestAcquireReplyLost(t *testing.T) {
	srv := redistest.Start(t)
	prefix := uniquePrefix()
	var d replyDropper
	mine := droppingBackend(t, srv.Addr, prefix, &d)
	other := newBackend(t, srv.Addr, prefix, nil)
	ctx := t.Context()
	const id = "lost-acquire-reply"
	if g, err := mine.Acquire(ctx, req(id, "warm", time.Minute)); err != nil || !g.Acquired {
		t.Fatalf("Acquire = %+v, %v", g, err)
	}
	if err := mine.Release(ctx, id, "warm"); err != nil {
		t.Fatal(err)
	}
	d.arm(nil)
	g, err := mine.Acquire(ctx, req(id, "me", time.Minute))
	if n := d.dropped.Load(); n != 1 {
		t.Fatalf("%d replies dropped, want 1", n)
	}
	if err != nil || !g.Acquired || g.TookOver {
		t.Fatalf("Acquire whose first reply was lost = %+v, %v; want acquired", g, err)
	}
	rg, err := mine.Renew(ctx, req(id, "me", time.Minute))
	if err != nil || rg.Token != g.Token {
		t.Errorf("Renew = %+v, %v; want the token %d of the one holding", rg, err, g.Token)
	}
	if g, err := other.Acquire(ctx, req(id, "other", time.Minute)); err != nil || g.Acquired {
		t.Errorf("another owner's Acquire = %+v, %v; want busy", g, err)
	}
	if err := mine.Release(ctx, id, "me"); err != nil {
		t.Errorf("Release: %v", err)
	}
}

// TestRecordLifetime: the record of an id lives a day past its last lease,
// released or not: an acquire or renewal sets its TTL to the lease plus a
// day, a release leaves the TTL as it is (it marks the record in place),
// and the token stays for the next holder.
func TestRecordLifetime(t *testing.T) {
	srv := redistest.Start(t)
	b := newBackend(t, srv.Addr, uniquePrefix(), nil)
	c := newClient(t, srv.Addr, nil)
	ctx := t.Context()
	const id, lease, day = "lifetime", 10 * time.Minute, 24 * time.Hour
	g1, err := b.Acquire(ctx, req(id, "first", lease))
	if err != nil || !g1.Acquired {
		t.Fatalf("Acquire = %+v, %v", g1, err)
	}
	pttl := func(when string) {
		t.Helper()
		d, err := c.PTTL(ctx, b.LockKey(id)).Result()
		if err != nil {
			t.Fatal(err)
		}
		if d <= day+lease-time.Minute || d > day+lease {
			t.Errorf("%s: the record's TTL is %v, want just under %v (the lease plus a day)", when, d, day+lease)
		}
	}
	pttl("held")
	if err := b.Release(ctx, id, "first"); err != nil {
		t.Fatal(err)
	}
	pttl("released")
	g2, err := b.Acquire(ctx, req(id, "second", time.Second))
	if err != nil || !g2.Acquired || g2.TookOver || g2.Token <= g1.Token {
		t.Errorf("Acquire after the release = %+v, %v; want acquired, not taken over, token above %d", g2, err, g1.Token)
	}
}
