package mclock_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"go.uber.org/goleak"
	"golang.org/x/sync/errgroup"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/mclock"
	"github.com/taskguard/taskguard/locking/mclock/mctest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// counter counts commands sent to memcached: gomemcache flushes each
// command in one Write and waits for its reply before the next, so one
// Write is one round trip.
type counter struct{ n atomic.Int64 }

type countingConn struct {
	net.Conn
	c *counter
}

func (c countingConn) Write(p []byte) (int, error) {
	c.c.n.Add(1)
	return c.Conn.Write(p)
}

// newClient returns a new memcached client for addr (a new "instance")
// whose commands are counted by cnt when it is not nil.
func newClient(t *testing.T, addr string, cnt *counter) *memcache.Client {
	t.Helper()
	c := memcache.New(addr)
	c.Timeout = 2 * time.Second
	c.DialContext = func(ctx context.Context, network, address string) (net.Conn, error) {
		var d net.Dialer
		conn, err := d.DialContext(ctx, network, address)
		if err != nil || cnt == nil {
			return conn, err
		}
		return countingConn{Conn: conn, c: cnt}, nil
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// uniquePrefix returns a key prefix no other test uses, so that tests may
// share a server (also an external one named by MCTEST_ADDR).
func uniquePrefix() string {
	return fmt.Sprintf("t%d-%d:", time.Now().UnixNano(), prefixSeq.Add(1))
}

var prefixSeq atomic.Int64

func newBackend(t *testing.T, addr, prefix string, cnt *counter) *mclock.Backend {
	t.Helper()
	b, err := mclock.New(newClient(t, addr, cnt), mclock.Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sameStore returns n backends on separate clients that share one prefix,
// so they act like n instances on one memcached.
func sameStore(t *testing.T, addr string, n int) []*mclock.Backend {
	t.Helper()
	prefix := uniquePrefix()
	out := make([]*mclock.Backend, n)
	for i := range out {
		out[i] = newBackend(t, addr, prefix, nil)
	}
	return out
}

// serverTTL asks memcached itself (meta command "mg <key> t", which
// gomemcache does not offer) how many whole seconds key has left: -1 means
// never expires; ok is false when the key is absent.
func serverTTL(t *testing.T, addr, key string) (ttl int64, ok bool) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintf(conn, "mg %s t\r\n", key); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	line = strings.TrimSpace(line)
	if line == "EN" {
		return 0, false
	}
	f := strings.Fields(line)
	if len(f) != 2 || f[0] != "HD" || !strings.HasPrefix(f[1], "t") {
		t.Fatalf("mg reply %q", line)
	}
	ttl, err = strconv.ParseInt(f[1][1:], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return ttl, true
}

func req(id, owner string, lease time.Duration) locking.Request {
	return locking.Request{ID: id, Owner: owner, Lease: lease}
}

// TestLeaseRoundingOnServer checks, on the server, the expiry each lease was
// stored with. memcached's clock ticks in whole seconds, so an item it
// reports as having t seconds left is only sure to live t-1 more seconds:
// that must cover the whole lease. A naive int(lease.Seconds()) stores 0
// ("never expires", t = -1) for 1 ms and 999 ms, 1 s for 1500 ms, and sends
// 0 for 1 ns. Leases go up to locking.MaxLease.
func TestLeaseRoundingOnServer(t *testing.T) {
	srv := mctest.Start(t)
	b := newBackend(t, srv.Addr, uniquePrefix(), nil)
	for _, tc := range []struct {
		lease time.Duration
	}{
		{time.Nanosecond},
		{time.Millisecond},
		{999 * time.Millisecond},
		{time.Second},
		{1500 * time.Millisecond},
		{locking.MaxLease},
	} {
		t.Run(tc.lease.String(), func(t *testing.T) {
			id := "rounding-" + tc.lease.String()
			g, err := b.Acquire(t.Context(), req(id, "a", tc.lease))
			if err != nil || !g.Acquired {
				t.Fatalf("Acquire = %+v, %v", g, err)
			}
			for _, op := range []string{"Acquire", "Renew"} {
				if op == "Renew" {
					if _, err := b.Renew(t.Context(), req(id, "a", tc.lease)); err != nil {
						t.Fatalf("Renew: %v", err)
					}
				}
				ttl, ok := serverTTL(t, srv.Addr, b.LockKey(id))
				if !ok {
					t.Fatalf("lock item is gone right after %s with lease %v", op, tc.lease)
				}
				if ttl < 0 {
					t.Fatalf("%s: lock item never expires (t=%d) for lease %v", op, ttl, tc.lease)
				}
				if sure := time.Duration(ttl-1) * time.Second; sure < tc.lease {
					t.Errorf("%s: server ttl %d s: item is only sure to live %v, less than the lease %v", op, ttl, sure, tc.lease)
				}
				if most := tc.lease + 3*time.Second; time.Duration(ttl)*time.Second > most {
					t.Errorf("%s: server ttl %d s: more than %v for lease %v", op, ttl, most, tc.lease)
				}
			}
		})
	}
}

// TestShortLeasesExclude checks the rounding by behaviour: a lease must
// exclude others for all of its length and end within about two seconds
// after it. With plain rounding up (999 ms -> 1 s) the item vanishes at
// memcached's next clock tick, anywhere from 0 to 1 s later, so the check at
// 900 ms fails most of the time.
func TestShortLeasesExclude(t *testing.T) {
	srv := mctest.Start(t)
	bs := sameStore(t, srv.Addr, 2)
	for _, tc := range []struct {
		name  string
		lease time.Duration
		probe time.Duration // when a second owner tries
	}{
		{"1ns-immediately", time.Nanosecond, 0},
		{"1ms-immediately", time.Millisecond, 0},
		{"999ms-at-900ms", 999 * time.Millisecond, 900 * time.Millisecond},
		{"1500ms-at-1400ms", 1500 * time.Millisecond, 1400 * time.Millisecond},
		{"MaxLease-after-1s", locking.MaxLease, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			id := "short-" + tc.name
			start := time.Now()
			g, err := bs[0].Acquire(ctx, req(id, "a", tc.lease))
			if err != nil || !g.Acquired {
				t.Fatalf("Acquire = %+v, %v", g, err)
			}
			time.Sleep(tc.probe - time.Since(start))
			g, err = bs[1].Acquire(ctx, req(id, "b", time.Second))
			if err != nil {
				t.Fatal(err)
			}
			if g.Acquired {
				t.Fatalf("second owner acquired %v after a %v lease began", time.Since(start), tc.lease)
			}
			if tc.lease > time.Minute {
				return
			}
			// And the lease ends: at most ceil(lease)+1 s later, plus slack.
			deadline := start.Add(tc.lease.Round(time.Second) + 2*time.Second + 500*time.Millisecond)
			for {
				g, err = bs[1].Acquire(ctx, req(id, "b", time.Second))
				if err != nil {
					t.Fatal(err)
				}
				if g.Acquired {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("lease %v still held after %v", tc.lease, time.Since(start))
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

func TestOwnerChecks(t *testing.T) {
	srv := mctest.Start(t)
	bs := sameStore(t, srv.Addr, 2)
	a, b := bs[0], bs[1]
	ctx := t.Context()
	const id = "owner"
	const lease = 10 * time.Second

	g1, err := a.Acquire(ctx, req(id, "a", lease))
	if err != nil || !g1.Acquired || g1.Token == 0 {
		t.Fatalf("Acquire = %+v, %v", g1, err)
	}
	g, err := b.Acquire(ctx, req(id, "b", lease))
	if err != nil || g.Acquired {
		t.Fatalf("second Acquire = %+v, %v; want busy", g, err)
	}
	if g.Remaining <= 0 || g.Remaining > lease {
		t.Errorf("busy Remaining = %v, want in (0, %v]", g.Remaining, lease)
	}
	if err := b.Release(ctx, id, "b"); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Release by non-owner = %v, want ErrNotHeld", err)
	}
	if _, err := b.Renew(ctx, req(id, "b", lease)); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Renew by non-owner = %v, want ErrNotHeld", err)
	}
	gr, err := a.Renew(ctx, req(id, "a", lease))
	if err != nil || !gr.Acquired || gr.Token != g1.Token {
		t.Errorf("Renew by owner = %+v, %v; want token %d", gr, err, g1.Token)
	}
	if g, _ := b.Acquire(ctx, req(id, "b", lease)); g.Acquired {
		t.Fatal("lock free after non-owner release")
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
	if err := b.Release(ctx, id, "a"); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Release by the previous owner = %v, want ErrNotHeld", err)
	}
}

// TestStealIsCAS lets several instances take over one stale lock at once;
// exactly one may win each round, and the loser of the steal cannot release
// the winner's lock.
func TestStealIsCAS(t *testing.T) {
	srv := mctest.Start(t)
	const takers = 6
	bs := sameStore(t, srv.Addr, takers+1)
	ctx := t.Context()
	for round := range 3 {
		id := fmt.Sprintf("steal-%d", round)
		g, err := bs[0].Acquire(ctx, req(id, "holder", time.Minute))
		if err != nil || !g.Acquired {
			t.Fatalf("Acquire = %+v, %v", g, err)
		}
		time.Sleep(150 * time.Millisecond)
		var wins atomic.Int64
		var winner atomic.Value
		var eg errgroup.Group
		start := make(chan struct{})
		for i := 1; i <= takers; i++ {
			eg.Go(func() error {
				<-start
				owner := fmt.Sprintf("taker-%d", i)
				g, err := bs[i].Acquire(ctx, locking.Request{ID: id, Owner: owner, Lease: time.Minute, StealAfter: 100 * time.Millisecond})
				if err != nil {
					return err
				}
				if g.Acquired {
					if !g.TookOver {
						return fmt.Errorf("%s acquired without TookOver", owner)
					}
					wins.Add(1)
					winner.Store(owner)
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
		if _, err := bs[0].Renew(ctx, req(id, "holder", time.Minute)); !errors.Is(err, locking.ErrNotHeld) {
			t.Errorf("old holder's Renew = %v, want ErrNotHeld", err)
		}
		if g, _ := bs[0].Acquire(ctx, req(id, "other", time.Minute)); g.Acquired {
			t.Error("lock free after the old holder's release")
		}
		if err := bs[0].Release(ctx, id, winner.Load().(string)); err != nil {
			t.Errorf("winner's Release: %v", err)
		}
	}
}

// TestRoundTrips counts the commands each operation sends.
func TestRoundTrips(t *testing.T) {
	srv := mctest.Start(t)
	var cnt counter
	prefix := uniquePrefix()
	b := newBackend(t, srv.Addr, prefix, &cnt)
	other := newBackend(t, srv.Addr, prefix, &cnt)
	ctx := t.Context()
	const lease = 10 * time.Second

	measure := func(name string, want int64, f func() error) {
		t.Helper()
		before := cnt.n.Load()
		if err := f(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got := cnt.n.Load() - before
		t.Logf("%s: %d round trips", name, got)
		if got != want {
			t.Errorf("%s: %d round trips, want %d", name, got, want)
		}
	}
	expect := func(g locking.Grant, err error, acquired bool) error {
		if err != nil {
			return err
		}
		if g.Acquired != acquired {
			return fmt.Errorf("Acquired = %v, want %v", g.Acquired, acquired)
		}
		return nil
	}
	measure("first acquire of an id (fence counter created)", 3, func() error {
		g, err := b.Acquire(ctx, req("rt", "a", lease))
		return expect(g, err, true)
	})
	measure("acquire, busy", 3, func() error {
		g, err := other.Acquire(ctx, req("rt", "b", lease))
		return expect(g, err, false)
	})
	measure("renew", 2, func() error {
		_, err := b.Renew(ctx, req("rt", "a", lease))
		return err
	})
	measure("release", 2, func() error { return b.Release(ctx, "rt", "a") })
	measure("acquire after a release (replaces the tombstone)", 4, func() error {
		g, err := b.Acquire(ctx, req("rt", "a", lease))
		return expect(g, err, true)
	})
	time.Sleep(20 * time.Millisecond)
	measure("acquire, steal", 4, func() error {
		g, err := other.Acquire(ctx, locking.Request{ID: "rt", Owner: "b", Lease: lease, StealAfter: 10 * time.Millisecond})
		return expect(g, err, true)
	})
	// Let a 1 ms lease run out (memcached drops it within 2 s), watching
	// through an uncounted connection.
	if err := b.Release(ctx, "rt", "b"); err != nil {
		t.Fatalf("Release by the thief: %v", err)
	}
	measure("first acquire of another id, 1 ms lease", 3, func() error {
		g, err := other.Acquire(ctx, req("rt-expire", "c", time.Millisecond))
		return expect(g, err, true)
	})
	for deadline := time.Now().Add(3 * time.Second); ; {
		if _, ok := serverTTL(t, srv.Addr, b.LockKey("rt-expire")); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("1 ms lease still stored after 3 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	measure("acquire after a lease ran out", 2, func() error {
		g, err := b.Acquire(ctx, req("rt-expire", "a", lease))
		if err == nil && !g.TookOver {
			return errors.New("TookOver false after a lease ran out")
		}
		return expect(g, err, true)
	})
}

func TestServerDown(t *testing.T) {
	srv := mctest.Start(t)
	b := newBackend(t, srv.Addr, uniquePrefix(), nil)
	srv.Stop(t)
	start := time.Now()
	g, err := b.Acquire(t.Context(), req("down", "a", time.Second))
	if err == nil || g.Acquired {
		t.Fatalf("Acquire with the server down = %+v, %v; want an error", g, err)
	}
	if errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("error %v must not look like a lost lock", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Acquire took %v to fail", d)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := b.Acquire(ctx, req("down", "a", time.Second)); !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire with a cancelled context = %v, want context.Canceled", err)
	}
}

func TestKeys(t *testing.T) {
	srv := mctest.Start(t)
	b := newBackend(t, srv.Addr, uniquePrefix(), nil)
	ids := []string{"plain", "with space", "tab\tnew\nline\r\x00nul", strings.Repeat("long", 300), "ünïcødé ✓", "\x7f\xff"}
	seen := map[string]bool{}
	for _, id := range ids {
		for _, key := range []string{b.LockKey(id), b.FenceKey(id)} {
			if len(key) > 250 {
				t.Errorf("key %q: %d bytes", key, len(key))
			}
			for _, c := range []byte(key) {
				if c <= ' ' || c >= 0x7f {
					t.Errorf("key %q has byte %#x", key, c)
				}
			}
			if seen[key] {
				t.Errorf("key %q used twice", key)
			}
			seen[key] = true
		}
		g, err := b.Acquire(t.Context(), req(id, "a", time.Minute))
		if err != nil || !g.Acquired {
			t.Fatalf("Acquire(%q) = %+v, %v", id, g, err)
		}
		if err := b.Release(t.Context(), id, "a"); err != nil {
			t.Fatalf("Release(%q): %v", id, err)
		}
	}
}

func TestNewValidates(t *testing.T) {
	c := memcache.New("127.0.0.1:1")
	for _, tc := range []struct {
		name   string
		client *memcache.Client
		prefix string
		ok     bool
	}{
		{"default", c, "", true},
		{"custom", c, "app-1:", true},
		{"nil client", nil, "", false},
		{"space", c, "a b", false},
		{"control", c, "a\nb", false},
		{"brace", c, "a{b", false},
		{"too long", c, strings.Repeat("p", mclock.MaxPrefixLen+1), false},
		{"longest", c, strings.Repeat("p", mclock.MaxPrefixLen), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := mclock.New(tc.client, mclock.Options{Prefix: tc.prefix})
			if (err == nil) != tc.ok {
				t.Fatalf("New = %v, want ok=%v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, mclock.ErrInvalidOptions) {
				t.Errorf("error %v is not ErrInvalidOptions", err)
			}
		})
	}
}

// TestDurationBounds checks the limits of Lease and StealAfter: beyond
// locking.MaxLease a request is refused with ErrInvalid (and
// ErrInvalidRequest) before any command; StealAfter of 1 ns steals a lock
// not renewed within 1 ns, and StealAfter of MaxLease does not steal a fresh
// one.
func TestDurationBounds(t *testing.T) {
	srv := mctest.Start(t)
	var cnt counter
	prefix := uniquePrefix()
	a := newBackend(t, srv.Addr, prefix, &cnt)
	b := newBackend(t, srv.Addr, prefix, nil)
	ctx := t.Context()

	for name, r := range map[string]locking.Request{
		"lease MaxLease+1ns":      {Lease: locking.MaxLease + 1},
		"lease MaxInt64":          {Lease: math.MaxInt64},
		"StealAfter MaxLease+1ns": {Lease: time.Minute, StealAfter: locking.MaxLease + 1},
		"StealAfter MaxInt64":     {Lease: time.Minute, StealAfter: math.MaxInt64},
	} {
		t.Run(name, func(t *testing.T) {
			r.ID, r.Owner = "bounds-"+name, "a"
			before := cnt.n.Load()
			for op, err := range map[string]error{
				"Acquire": func() error { _, err := a.Acquire(ctx, r); return err }(),
				"Renew":   func() error { _, err := a.Renew(ctx, r); return err }(),
			} {
				if !errors.Is(err, locking.ErrInvalid) || !errors.Is(err, mclock.ErrInvalidRequest) {
					t.Errorf("%s = %v; want ErrInvalid and ErrInvalidRequest", op, err)
				}
			}
			if n := cnt.n.Load() - before; n != 0 {
				t.Errorf("%d commands sent for an invalid request", n)
			}
			if _, ok := serverTTL(t, srv.Addr, a.LockKey(r.ID)); ok {
				t.Errorf("a lock item was written for an invalid request")
			}
		})
	}
	if err := a.Release(ctx, "", "a"); !errors.Is(err, locking.ErrInvalid) || !errors.Is(err, mclock.ErrInvalidRequest) {
		t.Errorf("Release without id = %v; want ErrInvalid and ErrInvalidRequest", err)
	}

	t.Run("StealAfter", func(t *testing.T) {
		for _, tc := range []struct {
			steal time.Duration
			want  bool
		}{
			{locking.MaxLease, false},
			{time.Nanosecond, true},
		} {
			id := "bounds-steal-" + tc.steal.String()
			if g, err := a.Acquire(ctx, req(id, "a", time.Minute)); err != nil || !g.Acquired {
				t.Fatalf("Acquire = %+v, %v", g, err)
			}
			time.Sleep(5 * time.Millisecond)
			r := req(id, "b", time.Minute)
			r.StealAfter = tc.steal
			g, err := b.Acquire(ctx, r)
			if err != nil || g.Acquired != tc.want || g.TookOver != tc.want {
				t.Errorf("Acquire with StealAfter %v of a lock renewed 5ms ago = %+v, %v; want acquired and TookOver: %v", tc.steal, g, err, tc.want)
			}
		}
	})
}
