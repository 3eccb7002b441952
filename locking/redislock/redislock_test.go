package redislock_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
	"golang.org/x/sync/errgroup"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockingtest"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// counter counts commands sent to the server: go-redis writes each command
// with one Write and, without pipelining, waits for its reply before the
// next, so one Write is one round trip.
type counter struct{ n atomic.Int64 }

type countingConn struct {
	net.Conn
	c *counter
}

func (c countingConn) Write(p []byte) (int, error) {
	c.c.n.Add(1)
	return c.Conn.Write(p)
}

// newClient returns a new client for addr (a new "instance") whose commands
// are counted by cnt when it is not nil.
func newClient(t *testing.T, addr string, cnt *counter) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{
		Addr:                  addr,
		ContextTimeoutEnabled: true,
		DialTimeout:           2 * time.Second,
		Dialer: func(ctx context.Context, network, address string) (net.Conn, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, network, address)
			if err != nil || cnt == nil {
				return conn, err
			}
			return countingConn{Conn: conn, c: cnt}, nil
		},
	})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

var prefixSeq atomic.Int64

// uniquePrefix returns a key prefix no other test uses, so that tests may
// share a server (also an external one named by REDISTEST_ADDR).
func uniquePrefix() string {
	return fmt.Sprintf("t%d-%d:", time.Now().UnixNano(), prefixSeq.Add(1))
}

func newBackend(t *testing.T, addr, prefix string, cnt *counter) *redislock.Backend {
	t.Helper()
	b, err := redislock.New(newClient(t, addr, cnt), redislock.Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sameStore returns n backends on separate clients that share one prefix,
// so they act like n instances on one server.
func sameStore(t *testing.T, addr string, n int) []*redislock.Backend {
	t.Helper()
	prefix := uniquePrefix()
	out := make([]*redislock.Backend, n)
	for i := range out {
		out[i] = newBackend(t, addr, prefix, nil)
	}
	return out
}

func req(id, owner string, lease time.Duration) locking.Request {
	return locking.Request{ID: id, Owner: owner, Lease: lease}
}

// TestConformance runs the locking conformance suite against a real
// redis-server; every backend it asks for has a client of its own.
func TestConformance(t *testing.T) {
	srv := redistest.Start(t)
	prefix := uniquePrefix()
	lockingtest.Run(t, func(t *testing.T) locking.Backend {
		return newBackend(t, srv.Addr, prefix, nil)
	}, lockingtest.Options{})
}

func TestOwnerChecks(t *testing.T) {
	srv := redistest.Start(t)
	bs := sameStore(t, srv.Addr, 2)
	a, b := bs[0], bs[1]
	ctx := t.Context()
	const id = "owner"
	const lease = 10 * time.Second

	g1, err := a.Acquire(ctx, req(id, "a", lease))
	if err != nil || !g1.Acquired || g1.Token == 0 || g1.TookOver {
		t.Fatalf("Acquire = %+v, %v", g1, err)
	}
	g, err := b.Acquire(ctx, req(id, "b", lease))
	if err != nil || g.Acquired {
		t.Fatalf("second Acquire = %+v, %v; want busy", g, err)
	}
	if g.Remaining <= lease-time.Second || g.Remaining > lease {
		t.Errorf("busy Remaining = %v, want just under %v (the server's PTTL)", g.Remaining, lease)
	}
	if err := b.Release(ctx, id, "b"); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Release by non-owner = %v, want ErrNotHeld", err)
	}
	if _, err := b.Renew(ctx, req(id, "b", lease)); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Renew by non-owner = %v, want ErrNotHeld", err)
	}
	gr, err := a.Renew(ctx, req(id, "a", 2*lease))
	if err != nil || !gr.Acquired || gr.Token != g1.Token {
		t.Errorf("Renew by owner = %+v, %v; want token %d", gr, err, g1.Token)
	}
	g, _ = b.Acquire(ctx, req(id, "b", lease))
	if g.Acquired {
		t.Fatal("lock free after non-owner release")
	}
	if g.Remaining <= lease {
		t.Errorf("Remaining %v after a renewal to %v: the renewal did not extend the TTL", g.Remaining, 2*lease)
	}
	if err := a.Release(ctx, id, "a"); err != nil {
		t.Fatalf("Release by owner: %v", err)
	}
	if err := a.Release(ctx, id, "a"); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("second Release = %v, want ErrNotHeld", err)
	}
	if _, err := a.Renew(ctx, req(id, "a", lease)); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Renew after Release = %v, want ErrNotHeld", err)
	}
	g2, err := b.Acquire(ctx, req(id, "b", lease))
	if err != nil || !g2.Acquired {
		t.Fatalf("Acquire after release = %+v, %v", g2, err)
	}
	if g2.Token <= g1.Token {
		t.Errorf("token %d after %d: not increasing", g2.Token, g1.Token)
	}
	if g2.TookOver {
		t.Error("TookOver after a clean release")
	}
}

// TestShortLeases: PX is in milliseconds; a sub-millisecond lease must not
// become 0 (an error) and a lease must end on time.
func TestShortLeases(t *testing.T) {
	srv := redistest.Start(t)
	bs := sameStore(t, srv.Addr, 2)
	ctx := t.Context()
	g, err := bs[0].Acquire(ctx, req("tiny", "a", time.Microsecond))
	if err != nil || !g.Acquired {
		t.Fatalf("Acquire with a 1 µs lease = %+v, %v", g, err)
	}
	g, err = bs[0].Acquire(ctx, req("short", "a", 300*time.Millisecond))
	if err != nil || !g.Acquired {
		t.Fatalf("Acquire = %+v, %v", g, err)
	}
	start := time.Now()
	for {
		g, err := bs[1].Acquire(ctx, req("short", "b", time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if g.Acquired {
			if !g.TookOver {
				t.Error("taking over an expired lease did not report TookOver")
			}
			break
		}
		if time.Since(start) > time.Second {
			t.Fatal("300 ms lease still held after 1 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Errorf("300 ms lease taken over after %v", d)
	}
}

// TestStealIsAtomic lets several instances steal one lock at once; exactly
// one may win each round.
func TestStealIsAtomic(t *testing.T) {
	srv := redistest.Start(t)
	const takers = 6
	bs := sameStore(t, srv.Addr, takers+1)
	ctx := t.Context()
	for round := range 3 {
		id := fmt.Sprintf("steal-%d", round)
		g, err := bs[0].Acquire(ctx, req(id, "holder", time.Minute))
		if err != nil || !g.Acquired {
			t.Fatalf("Acquire = %+v, %v", g, err)
		}
		if g, _ := bs[1].Acquire(ctx, locking.Request{ID: id, Owner: "early", Lease: time.Minute, StealAfter: time.Second}); g.Acquired {
			t.Fatal("stolen before StealAfter")
		}
		time.Sleep(60 * time.Millisecond)
		var wins atomic.Int64
		var eg errgroup.Group
		start := make(chan struct{})
		for i := 1; i <= takers; i++ {
			eg.Go(func() error {
				<-start
				owner := fmt.Sprintf("taker-%d", i)
				g, err := bs[i].Acquire(ctx, locking.Request{ID: id, Owner: owner, Lease: time.Minute, StealAfter: 50 * time.Millisecond})
				if err != nil {
					return err
				}
				if g.Acquired {
					if !g.TookOver {
						return fmt.Errorf("%s acquired without TookOver", owner)
					}
					wins.Add(1)
				}
				return nil
			})
		}
		close(start)
		if err := eg.Wait(); err != nil {
			t.Fatal(err)
		}
		if n := wins.Load(); n != 1 {
			t.Fatalf("round %d: %d takers won, want exactly 1", round, n)
		}
		if err := bs[0].Release(ctx, id, "holder"); !errors.Is(err, locking.ErrNotHeld) {
			t.Errorf("old holder's Release = %v, want ErrNotHeld", err)
		}
	}
}

// TestRoundTrips counts the commands each operation sends (round trips)
// and, from the server's INFO commandstats, the commands its script runs.
func TestRoundTrips(t *testing.T) {
	srv := redistest.Start(t)
	var cnt counter
	prefix := uniquePrefix()
	c := newClient(t, srv.Addr, &cnt)
	b, err := redislock.New(c, redislock.Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	admin := newClient(t, srv.Addr, nil)
	ctx := t.Context()
	if err := c.Ping(ctx).Err(); err != nil { // connection handshake, not counted below
		t.Fatal(err)
	}
	if err := admin.Ping(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	const lease = 10 * time.Second
	// measure checks the round trips of f and, when the server is ours
	// alone, the commands its scripts ran: those named in name after the
	// colon (up to a parenthesis), in any order.
	measure := func(name string, wantRT, wantCmds int64, f func() error) {
		t.Helper()
		exact := !srv.External()
		if exact {
			if err := admin.ConfigResetStat(ctx).Err(); err != nil {
				t.Fatal(err)
			}
		}
		before := cnt.n.Load()
		if err := f(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got := cnt.n.Load() - before
		if got != wantRT {
			t.Errorf("%s: %d round trips, want %d", name, got, wantRT)
		}
		if !exact {
			t.Logf("%s: %d round trips", name, got)
			return
		}
		st := commandStats(t, admin)
		t.Logf("%s: %d round trips, %d commands in the script", name, got, st.cmds)
		if st.cmds != wantCmds {
			t.Errorf("%s: %d commands in the script, want %d", name, st.cmds, wantCmds)
		}
		_, list, _ := strings.Cut(name, ": ")
		list, _, _ = strings.Cut(list, " (")
		want := strings.Fields(strings.ToLower(list))
		var ran []string
		for cmd, n := range st.byName {
			for range n {
				ran = append(ran, cmd)
			}
		}
		slices.Sort(want)
		slices.Sort(ran)
		if !slices.Equal(ran, want) {
			t.Errorf("%s: the script ran %v, want %v", name, ran, want)
		}
	}
	expect := func(g locking.Grant, err error, acquired, tookOver bool) error {
		if err != nil {
			return err
		}
		if g.Acquired != acquired || g.TookOver != tookOver {
			return fmt.Errorf("grant %+v, want Acquired %v, TookOver %v", g, acquired, tookOver)
		}
		return nil
	}
	measure("first acquire on a fresh server (EVALSHA, NOSCRIPT, EVAL): GET TIME SET", 2, 3, func() error {
		g, err := b.Acquire(ctx, req("rt", "a", lease))
		return expect(g, err, true, false)
	})
	measure("acquire, busy, first waiter: GET PTTL SETRANGE (marks the holding waited for)", 1, 3, func() error {
		g, err := b.Acquire(ctx, req("rt", "b", lease))
		return expect(g, err, false, false)
	})
	measure("acquire, busy, later: GET PTTL", 1, 2, func() error {
		g, err := b.Acquire(ctx, req("rt", "b", lease))
		return expect(g, err, false, false)
	})
	measure("first renew (script not cached yet): GET PTTL SET", 2, 3, func() error {
		_, err := b.Renew(ctx, req("rt", "a", lease))
		return err
	})
	measure("renew: GET PTTL SET", 1, 3, func() error {
		_, err := b.Renew(ctx, req("rt", "a", lease))
		return err
	})
	measure("first release (script not cached yet) of a holding waited for: GET PTTL SETRANGE PUBLISH", 2, 4, func() error { return b.Release(ctx, "rt", "a") })
	measure("acquire after a release: GET TIME SET", 1, 3, func() error {
		g, err := b.Acquire(ctx, req("rt", "a", lease))
		return expect(g, err, true, false)
	})
	measure("release, nobody waited: GET PTTL SETRANGE", 1, 3, func() error { return b.Release(ctx, "rt", "a") })
	measure("release, not held: GET", 1, 1, func() error {
		if err := b.Release(ctx, "rt", "a"); !errors.Is(err, locking.ErrNotHeld) {
			return fmt.Errorf("second release = %v, want ErrNotHeld", err)
		}
		return nil
	})
	if g, err := b.Acquire(ctx, req("rt", "a", lease)); !g.Acquired || err != nil {
		t.Fatalf("acquire: %+v %v", g, err)
	}
	time.Sleep(5 * time.Millisecond)
	measure("steal: GET PTTL TIME SET", 1, 4, func() error {
		g, err := b.Acquire(ctx, locking.Request{ID: "rt", Owner: "b", Lease: lease, StealAfter: time.Millisecond})
		return expect(g, err, true, true)
	})
}

func TestServerDown(t *testing.T) {
	srv := redistest.Start(t)
	b := newBackend(t, srv.Addr, uniquePrefix(), nil)
	srv.Stop(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	g, err := b.Acquire(ctx, req("down", "a", time.Second))
	if err == nil || g.Acquired {
		t.Fatalf("Acquire with the server down = %+v, %v; want an error", g, err)
	}
	if errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("error %v must not look like a lost lock", err)
	}
	cctx, ccancel := context.WithCancel(t.Context())
	ccancel()
	if _, err := b.Acquire(cctx, req("down", "a", time.Second)); !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire with a cancelled context = %v, want context.Canceled", err)
	}
}

func TestKeys(t *testing.T) {
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = c.Close() })
	b, err := redislock.New(c, redislock.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"plain", "with space", "{tag}", "}{", strings.Repeat("long", 3000), "\x00\xff"} {
		lk, fk := b.LockKey(id), b.FenceKey(id)
		if redisSlot(lk) != redisSlot(fk) {
			t.Errorf("id %q: lock key %q and fence key %q in different cluster slots", id, lk, fk)
		}
		if len(lk) > 100 || !strings.HasPrefix(lk, redislock.DefaultPrefix) {
			t.Errorf("id %q: lock key %q", id, lk)
		}
	}
	if b.LockKey("a") == b.LockKey("b") {
		t.Error("two ids share a key")
	}
}

// redisSlot returns the part of key that Redis Cluster hashes: the content
// of the first {...} when non-empty.
func redisSlot(key string) string {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			return key[i+1 : i+1+j]
		}
	}
	return key
}

func TestNewValidates(t *testing.T) {
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = c.Close() })
	for _, tc := range []struct {
		name   string
		client redis.Scripter
		prefix string
		ok     bool
	}{
		{"default", c, "", true},
		{"custom", c, "app-1:", true},
		{"nil client", nil, "", false},
		{"space", c, "a b", false},
		{"control", c, "a\nb", false},
		{"brace", c, "a{b", false},
		{"too long", c, strings.Repeat("p", redislock.MaxPrefixLen+1), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := redislock.New(tc.client, redislock.Options{Prefix: tc.prefix})
			if (err == nil) != tc.ok {
				t.Fatalf("New = %v, want ok=%v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, redislock.ErrInvalidOptions) {
				t.Errorf("error %v is not ErrInvalidOptions", err)
			}
		})
	}
}
