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

// BenchmarkColdStart measures, per backend, creating a client from the
// environment (locking.FromEnvironment, the path of locking.Default) and
// its first lock call (acquire + release, which opens the connection)
// against the second one, on a warm connection.
func BenchmarkColdStart(b *testing.B) {
	quiet := slog.New(slog.DiscardHandler)
	cases := []struct {
		name string
		kind locking.LockKind
		env  func(b *testing.B) map[string]string
	}{
		{"datastore", locking.Strong, func(b *testing.B) map[string]string {
			e := emulator(b)
			return map[string]string{"DATASTORE_EMULATOR_HOST": e.Host, "DATASTORE_PROJECT_ID": e.ProjectID}
		}},
		{"memcached", locking.Weak, func(b *testing.B) map[string]string {
			return map[string]string{mclock.EnvServers: memcached(b)}
		}},
		{"redis", locking.Weak, func(b *testing.B) map[string]string {
			return map[string]string{redislock.EnvRedisAddr: redisAddr(b)}
		}},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			for _, v := range []string{"DATASTORE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", mclock.EnvServers, redislock.EnvRedisAddr, redislock.EnvValkeyAddr} {
				b.Setenv(v, "")
			}
			for k, v := range tc.env(b) {
				b.Setenv(k, v)
			}
			var create, first, warm []time.Duration
			ctx := b.Context()
			for b.Loop() {
				for range 5 {
					t0 := time.Now()
					c, err := locking.FromEnvironment(locking.Config{Logger: quiet})
					if err != nil {
						b.Fatal(err)
					}
					t1 := time.Now()
					for i := range 2 {
						s := time.Now()
						if err := c.With(ctx, uniq("cold"), func(context.Context) error { return nil }, locking.Kind(tc.kind)); err != nil {
							b.Fatal(err)
						}
						if i == 0 {
							first = append(first, time.Since(s))
						} else {
							warm = append(warm, time.Since(s))
						}
					}
					create = append(create, t1.Sub(t0))
					if err := closeBackend(c.Backend(tc.kind)); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(percentile(create, 50)), "create-ns")
			b.ReportMetric(float64(percentile(first, 50)), "first-ns")
			b.ReportMetric(float64(percentile(warm, 50)), "warm-ns")
		})
	}
}

// closeBackend closes the connections a backend built from the environment
// opened.
func closeBackend(b locking.Backend) error {
	switch b := b.(type) {
	case *dslock.Backend:
		return b.Close()
	case interface{ Close() error }:
		return b.Close()
	}
	return errors.New("backend cannot be closed")
}
