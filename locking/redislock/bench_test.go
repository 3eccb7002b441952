package redislock_test

import (
	"bufio"
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	bsm "github.com/bsm/redislock"
	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// BenchmarkAcquireRelease measures one uncontended acquire and release of
// one id on a real redis-server over loopback, for this package's Backend
// and for github.com/bsm/redislock (Obtain and Release, without retries),
// against the same server in the same run, each on a client of its own.
//
// Sub-benchmarks:
//   - taskguard, bsm: each alone; ns/op is one acquire plus one release.
//     calls/op is the script calls the server ran (round trips), cmds/op
//     the commands those scripts ran inside, server-ns/op the server's time
//     in the scripts (all from INFO commandstats). server-ns/op separates
//     the scripts' cost from the round trips', which dominate ns/op and
//     vary with the machine's load.
//   - interleaved: one taskguard pair and one bsm pair per iteration, timed
//     separately so both see the same machine at the same moment; it
//     reports taskguard-ns/pair, bsm-ns/pair and their ratio (taskguard/bsm,
//     below 1 when taskguard is faster).
func BenchmarkAcquireRelease(b *testing.B) {
	srv := redistest.Start(b)
	tg := func(b *testing.B) func(ctx context.Context) {
		c := redis.NewClient(&redis.Options{Addr: srv.Addr})
		b.Cleanup(func() { _ = c.Close() })
		be, err := redislock.New(c, redislock.Options{Prefix: uniquePrefix()})
		if err != nil {
			b.Fatal(err)
		}
		r := locking.Request{ID: "bench", Owner: "o", Lease: 10 * time.Second}
		return func(ctx context.Context) {
			if g, err := be.Acquire(ctx, r); err != nil || !g.Acquired {
				b.Fatalf("Acquire = %+v, %v", g, err)
			}
			if err := be.Release(ctx, r.ID, r.Owner); err != nil {
				b.Fatal(err)
			}
		}
	}
	peer := func(b *testing.B) func(ctx context.Context) {
		c := redis.NewClient(&redis.Options{Addr: srv.Addr})
		b.Cleanup(func() { _ = c.Close() })
		lc := bsm.New(c)
		key := uniquePrefix() + "bench"
		return func(ctx context.Context) {
			l, err := lc.Obtain(ctx, key, 10*time.Second, nil)
			if err != nil {
				b.Fatalf("Obtain: %v", err)
			}
			if err := l.Release(ctx); err != nil {
				b.Fatal(err)
			}
		}
	}
	alone := func(mk func(*testing.B) func(context.Context)) func(*testing.B) {
		return func(b *testing.B) {
			ctx := b.Context()
			op := mk(b)
			op(ctx) // connect and load the scripts
			admin := redis.NewClient(&redis.Options{Addr: srv.Addr})
			b.Cleanup(func() { _ = admin.Close() })
			if err := admin.ConfigResetStat(ctx).Err(); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				op(ctx)
			}
			b.StopTimer()
			st := commandStats(b, admin)
			b.ReportMetric(float64(st.calls)/float64(b.N), "calls/op")
			b.ReportMetric(float64(st.cmds)/float64(b.N), "cmds/op")
			b.ReportMetric(float64(st.scriptUsec)*1000/float64(b.N), "server-ns/op")
		}
	}
	b.Run("taskguard", alone(tg))
	b.Run("bsm", alone(peer))
	b.Run("interleaved", func(b *testing.B) {
		ctx := b.Context()
		ours, theirs := tg(b), peer(b)
		ours(ctx)
		theirs(ctx)
		var tOurs, tTheirs time.Duration
		n := 0
		for b.Loop() {
			// Alternate the order so neither always runs on a warm cache.
			if n%2 == 0 {
				t0 := time.Now()
				ours(ctx)
				t1 := time.Now()
				theirs(ctx)
				tOurs += t1.Sub(t0)
				tTheirs += time.Since(t1)
			} else {
				t0 := time.Now()
				theirs(ctx)
				t1 := time.Now()
				ours(ctx)
				tTheirs += t1.Sub(t0)
				tOurs += time.Since(t1)
			}
			n++
		}
		b.ReportMetric(float64(tOurs.Nanoseconds())/float64(n), "taskguard-ns/pair")
		b.ReportMetric(float64(tTheirs.Nanoseconds())/float64(n), "bsm-ns/pair")
		b.ReportMetric(float64(tOurs)/float64(tTheirs), "ratio")
	})
}

// stats are a server's INFO commandstats, summed.
type stats struct {
	calls      int64            // script calls (EVAL, EVALSHA)
	scriptUsec int64            // the server's time in them, µs
	cmds       int64            // other commands: those the scripts ran, as the callers send nothing else
	byName     map[string]int64 // cmds by command name (lower case)
}

// commandStats reads INFO commandstats (since the last CONFIG RESETSTAT),
// leaving out the commands of connection setup and of the statistics.
func commandStats(tb testing.TB, c *redis.Client) stats {
	tb.Helper()
	info, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		tb.Fatal(err)
	}
	s := stats{byName: map[string]int64{}}
	sc := bufio.NewScanner(strings.NewReader(info))
	for sc.Scan() {
		// cmdstat_get:calls=5,usec=...
		name, rest, ok := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		name, isCmd := strings.CutPrefix(name, "cmdstat_")
		if !ok || !isCmd {
			continue
		}
		field := func(key string) int64 {
			for kv := range strings.SplitSeq(rest, ",") {
				if v, ok := strings.CutPrefix(kv, key+"="); ok {
					n, err := strconv.ParseInt(v, 10, 64)
					if err != nil {
						tb.Fatalf("commandstats line %q: %v", sc.Text(), err)
					}
					return n
				}
			}
			tb.Fatalf("commandstats line %q: no %s", sc.Text(), key)
			return 0
		}
		switch name {
		case "evalsha", "eval":
			s.calls += field("calls")
			s.scriptUsec += field("usec")
		case "config|resetstat", "info", "hello", "client|setinfo", "ping", "select", "auth":
		default:
			n := field("calls")
			s.cmds += n
			s.byName[name] += n
		}
	}
	return s
}
