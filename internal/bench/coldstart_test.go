package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/mclock"
	"github.com/taskguard/taskguard/locking/redislock"
)

// Environment of the child process of TestColdStartNoNetworkIO (the test
// binary re-executed): its phase, "default" or "call".
const coldChildEnv = "BENCH_COLDSTART_CHILD"

// coldChild runs in the re-executed test binary, whose package inits (the
// backends registering their providers) ran with the environment pointing
// at the parent's listeners. Phase "default" builds the default client and
// lingers, so that any background dial would reach a listener; phase "call"
// then makes one Strong and one Weak lock call, which must dial.
func coldChild() int {
	c := locking.Default()
	if c.Backend(locking.Strong) == nil || c.Backend(locking.Weak) == nil {
		fmt.Fprintln(os.Stderr, "no backends configured")
		return 2
	}
	if os.Getenv(coldChildEnv) == "default" {
		time.Sleep(300 * time.Millisecond)
		return 0
	}
	// The calls fail (the listeners speak no protocol); only their dials
	// matter. They are not waited for: after a failed write dslock reads
	// back for up to its RPC timeout (10 s) before giving up.
	for _, k := range []locking.LockKind{locking.Strong, locking.Weak} {
		go func() {
			_, _ = locking.Acquire(context.Background(), "cold", locking.Kind(k), locking.Wait(false))
		}()
	}
	time.Sleep(300 * time.Millisecond)
	return 0
}

// countingListener accepts connections on a free loopback port, counts
// them and closes them at once.
type countingListener struct {
	ln       net.Listener
	accepted atomic.Int64
}

func listen(t *testing.T) *countingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{ln: ln}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			cl.accepted.Add(1)
			_ = c.Close()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-done
	})
	return cl
}

// TestColdStartNoNetworkIO proves that importing the packages (their init
// registers the providers) and creating the default client from an
// environment that names Datastore, memcached and redis makes no network
// connection: a child process does exactly that with every address pointing
// at a counting listener, and no listener sees a connection. A second child
// then makes its first lock calls, and the listeners must see them dial
// (so the first check could have failed).
func TestColdStartNoNetworkIO(t *testing.T) {
	ds, mc, rd := listen(t), listen(t), listen(t)
	env := []string{
		"DATASTORE_EMULATOR_HOST=" + ds.ln.Addr().String(),
		"DATASTORE_PROJECT_ID=cold",
		mclock.EnvServers + "=" + mc.ln.Addr().String(),
		redislock.EnvRedisAddr + "=" + rd.ln.Addr().String(),
	}
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(name, "DATASTORE_"), strings.HasPrefix(name, "GOOGLE_"),
			strings.HasPrefix(name, "MEMCACHE_"), strings.HasPrefix(name, "REDIS_"),
			strings.HasPrefix(name, "VALKEY_"), strings.HasPrefix(name, "TASKGUARD_"):
		default:
			env = append(env, kv)
		}
	}
	run := func(phase string) {
		t.Helper()
		cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^$")
		cmd.Env = append(env, coldChildEnv+"="+phase)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("child (%s): %v\n%s", phase, err, out)
		}
	}

	run("default")
	for name, l := range map[string]*countingListener{"datastore": ds, "memcached": mc, "redis": rd} {
		if n := l.accepted.Load(); n != 0 {
			t.Errorf("creating the default client made %d connection(s) to %s; want none", n, name)
		}
	}

	run("call")
	if ds.accepted.Load() == 0 {
		t.Error("the first Strong lock call made no connection to the Datastore address")
	}
	if mc.accepted.Load()+rd.accepted.Load() == 0 {
		t.Error("the first Weak lock call made no connection to the memcached or redis address")
	}
}

// BenchmarkColdStart measures, per backend, creating a client (for
// Datastore through locking.FromEnvironment, the path of locking.Default;
// for memcached and redis from a new client library connection pool, since
// the backends their providers build cannot be closed) and its first lock
// call (With: acquire + release, which opens the connection) against the
// second and the tenth one on the same connection.
func BenchmarkColdStart(b *testing.B) {
	quiet := slog.New(slog.DiscardHandler)
	cases := []struct {
		name string
		// open returns a function that builds a new client and returns it
		// with the function that closes its connections.
		open func(b *testing.B) func() (*locking.Client, func() error, error)
	}{
		{"datastore", func(b *testing.B) func() (*locking.Client, func() error, error) {
			e := emulator(b)
			for _, v := range []string{"GOOGLE_CLOUD_PROJECT", mclock.EnvServers, redislock.EnvRedisAddr, redislock.EnvValkeyAddr} {
				b.Setenv(v, "")
			}
			b.Setenv("DATASTORE_EMULATOR_HOST", e.Host)
			b.Setenv("DATASTORE_PROJECT_ID", e.ProjectID)
			return func() (*locking.Client, func() error, error) {
				c, err := locking.FromEnvironment(locking.Config{Logger: quiet})
				if err != nil {
					return nil, nil, err
				}
				be, ok := c.Backend(locking.Strong).(*dslock.Backend)
				if !ok {
					return nil, nil, errors.New("the environment did not select the Datastore backend")
				}
				return c, be.Close, nil
			}
		}},
		{"memcached", func(b *testing.B) func() (*locking.Client, func() error, error) {
			addr := memcached(b)
			return func() (*locking.Client, func() error, error) {
				mc := memcache.New(addr)
				be, err := mclock.New(mc, mclock.Options{Prefix: uniq("cold") + ":"})
				if err != nil {
					return nil, nil, err
				}
				c, err := locking.New(locking.Config{Strong: be, Logger: quiet})
				return c, mc.Close, err
			}
		}},
		{"redis", func(b *testing.B) func() (*locking.Client, func() error, error) {
			addr := redisAddr(b)
			return func() (*locking.Client, func() error, error) {
				rc := redis.NewClient(&redis.Options{Addr: addr})
				be, err := redislock.New(rc, redislock.Options{Prefix: uniq("cold") + ":"})
				if err != nil {
					return nil, nil, err
				}
				c, err := locking.New(locking.Config{Strong: be, Logger: quiet})
				return c, rc.Close, err
			}
		}},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			build := tc.open(b)
			var create, first, second, tenth []time.Duration
			ctx := b.Context()
			// Warm the server up first (a fresh emulator JVM answers slowly
			// for its first hundreds of calls), so that only the client is
			// cold below.
			c, closeConns, err := build()
			if err != nil {
				b.Fatal(err)
			}
			for range 200 {
				if err := c.With(ctx, uniq("warm"), func(context.Context) error { return nil }); err != nil {
					b.Fatal(err)
				}
			}
			if err := closeConns(); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				for range 5 {
					t0 := time.Now()
					c, closeConns, err := build()
					if err != nil {
						b.Fatal(err)
					}
					create = append(create, time.Since(t0))
					for i := range 10 {
						s := time.Now()
						if err := c.With(ctx, uniq("cold"), func(context.Context) error { return nil }); err != nil {
							b.Fatal(err)
						}
						switch d := time.Since(s); i {
						case 0:
							first = append(first, d)
						case 1:
							second = append(second, d)
						case 9:
							tenth = append(tenth, d)
						}
					}
					if err := closeConns(); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(percentile(create, 50)), "create-ns")
			b.ReportMetric(float64(percentile(first, 50)), "first-ns")
			b.ReportMetric(float64(percentile(second, 50)), "second-ns")
			b.ReportMetric(float64(percentile(tenth, 50)), "tenth-ns")
		})
	}
}
