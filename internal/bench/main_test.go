package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/datastore"
	"github.com/bradfitz/gomemcache/memcache"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
	"google.golang.org/api/option"
	"google.golang.org/grpc"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/locking/mclock"
	"github.com/taskguard/taskguard/locking/mclock/mctest"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// emuMode is the Datastore emulator the benchmarks run against: the legacy
// Datastore emulator (optimistic concurrency, like the App Engine Datastore
// djangae was written for), unless BENCH_EMULATOR=firestore selects the
// Firestore emulator in Datastore mode. On the latter the baselines'
// read-then-write transactions deadlock as soon as two waiters read the
// same free lock (both hold a read lock, both wait to write; the emulator
// does not break the tie), so their hand-off cannot be measured there.
// BenchmarkTakeover also runs ours on the Firestore emulator, whose server
// times our backend uses instead of the client clocks plus a skew margin.
func emuMode() dstest.Mode {
	if os.Getenv("BENCH_EMULATOR") == "firestore" {
		return dstest.Firestore
	}
	return dstest.Legacy
}

// The emulators are started on first use (only benchmarks need them) and
// stopped by TestMain.
var emus = map[dstest.Mode]*emuOnce{dstest.Legacy: {}, dstest.Firestore: {}}

type emuOnce struct {
	once sync.Once
	e    *dstest.Emulator
	err  error
}

func TestMain(m *testing.M) {
	if os.Getenv(coldChildEnv) != "" {
		os.Exit(coldChild())
	}
	if os.Getenv(xprocChildEnv) != "" {
		os.Exit(xprocChild())
	}
	code := m.Run()
	for _, eo := range emus {
		if eo.e != nil {
			if err := eo.e.Close(); err != nil {
				fmt.Fprintln(os.Stderr, "stopping the emulator:", err)
			}
		}
	}
	if code == 0 {
		// The Datastore client's gRPC connections are closed by their
		// benchmarks; nothing of ours may outlive the run.
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// emulator returns the shared emulator of emuMode.
func emulator(tb testing.TB) *dstest.Emulator { return emulatorOf(tb, emuMode()) }

// emulatorOf returns the shared emulator of mode m, starting it on first
// use, or ends tb (skip locally, fail with CI=true) when it cannot run.
func emulatorOf(tb testing.TB, m dstest.Mode) *dstest.Emulator {
	tb.Helper()
	eo := emus[m]
	eo.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), dstest.StartTimeout)
		defer cancel()
		eo.e, eo.err = dstest.Start(ctx, m)
	})
	dstest.Require(tb, eo.err)
	return eo.e
}

// rpcCounter counts the RPCs (Datastore, through a gRPC interceptor) or the
// commands (memcached and redis, one socket Write each: both clients write a
// whole command at once and wait for its reply) that one connection sends.
type rpcCounter struct {
	n atomic.Int64

	mu      sync.Mutex
	methods []string // RPC method names, in order; guarded by mu
}

func (c *rpcCounter) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	c.n.Add(1)
	c.mu.Lock()
	c.methods = append(c.methods, path.Base(method))
	c.mu.Unlock()
	return invoker(ctx, method, req, reply, cc, opts...)
}

// take returns the count and the method names since the last take.
func (c *rpcCounter) take() (int64, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.methods
	c.methods = nil
	return c.n.Swap(0), m
}

// dial returns a new gRPC connection to the emulator (one per simulated
// instance), counted by cnt, closed when tb ends.
func dial(tb testing.TB, e *dstest.Emulator, cnt *rpcCounter) *grpc.ClientConn {
	tb.Helper()
	cc, err := e.Dial(grpc.WithChainUnaryInterceptor(cnt.intercept))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = cc.Close() })
	return cc
}

// dsBackend returns our Datastore backend on its own connection.
func dsBackend(tb testing.TB, e *dstest.Emulator, cnt *rpcCounter) *dslock.Backend {
	tb.Helper()
	b, err := dslock.New(context.Background(), dslock.Options{ProjectID: e.ProjectID, Conn: dial(tb, e, cnt), Kind: "BenchLock"})
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// dsClient returns a cloud.google.com/go/datastore client on its own
// connection, for the baselines.
func dsClient(tb testing.TB, e *dstest.Emulator, cnt *rpcCounter) *datastore.Client {
	tb.Helper()
	c, err := datastore.NewClient(context.Background(), e.ProjectID, option.WithGRPCConn(dial(tb, e, cnt)))
	if err != nil {
		tb.Fatal(err)
	}
	return c // closing the connection, done by dial's cleanup, is all it needs
}

// countingConn counts the Writes of a memcached or redis connection.
type countingConn struct {
	netConn
	c *rpcCounter
}

func (c countingConn) Write(p []byte) (int, error) {
	c.c.n.Add(1)
	return c.netConn.Write(p)
}

// mcBackend returns our memcached backend on its own client. Backends made
// with the same prefix share their locks.
func mcBackend(tb testing.TB, addr, prefix string, cnt *rpcCounter) *mclock.Backend {
	tb.Helper()
	c := memcache.New(addr)
	c.Timeout = 2 * time.Second
	c.MaxIdleConns = 64
	c.DialContext = func(ctx context.Context, network, address string) (netConn, error) {
		conn, err := dialer.DialContext(ctx, network, address)
		if err != nil {
			return nil, err
		}
		return countingConn{conn, cnt}, nil
	}
	tb.Cleanup(func() { _ = c.Close() })
	b, err := mclock.New(c, mclock.Options{Prefix: prefix})
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// redisBackend returns our redis backend on its own client.
func redisBackend(tb testing.TB, addr, prefix string, cnt *rpcCounter) *redislock.Backend {
	tb.Helper()
	c := redis.NewClient(&redis.Options{
		Addr:     addr,
		PoolSize: 64,
		Dialer: func(ctx context.Context, network, address string) (netConn, error) {
			conn, err := dialer.DialContext(ctx, network, address)
			if err != nil {
				return nil, err
			}
			return countingConn{conn, cnt}, nil
		},
	})
	tb.Cleanup(func() { _ = c.Close() })
	b, err := redislock.New(c, redislock.Options{Prefix: prefix})
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// servers starts memcached and redis-server once per benchmark that needs
// them; they stop when it ends.
func memcached(tb testing.TB) string { return mctest.Start(tb).Addr }
func redisAddr(tb testing.TB) string { return redistest.Start(tb).Addr }

// uniq returns a string no other call in this process returns, for lock ids
// and key prefixes that must not collide across benchmarks.
func uniq(s string) string { return fmt.Sprintf("%s-%d-%d", s, time.Now().UnixNano(), seq.Add(1)) }

var seq atomic.Int64

// newClient returns a locking client for b with the defaults of the
// package (backoff included), or cfg's overrides.
func newClient(tb testing.TB, b locking.Backend, cfg locking.Config) *locking.Client {
	tb.Helper()
	cfg.Strong = b
	c, err := locking.New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// percentile returns the p-th percentile (0..100) of ds, nearest rank.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*p/100+0.999999) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// uniform returns a random duration in [0, d).
func uniform(d time.Duration) time.Duration { return time.Duration(rand.Int64N(int64(d))) }

// sleepCtx sleeps d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
