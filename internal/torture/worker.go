package torture

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/mclock"
	"github.com/taskguard/taskguard/locking/redislock"
)

// Store names, for Config.Store.
const (
	StoreLegacy    = "legacy"    // the legacy Datastore emulator (dslock)
	StoreFirestore = "firestore" // the Firestore emulator in Datastore mode (dslock)
	StoreMemcached = "memcached" // mclock
	StoreRedis     = "redis"     // redislock on redis-server or valkey-server
)

// EnvConfig is the environment variable that carries a worker's Config (as
// JSON) to a re-executed test binary.
const EnvConfig = "TASKGUARD_TORTURE_WORKER"

// Config is one worker process's job.
type Config struct {
	Store   string // one of the Store constants
	Addr    string // host:port of the store, or of a faultproxy in front of it
	Project string // Datastore project (emulators)
	Prefix  string // key prefix (memcached, redis) or entity kind (Datastore), to keep runs apart

	IDs        []string      // lock ids to contend on
	Clients    int           // locking.Clients (and store connections) in this process
	Goroutines int           // goroutines per client
	Duration   time.Duration // how long to keep acquiring
	Lease      time.Duration
	MaxHold    time.Duration // each section holds the lock for a random time up to this
	Out        string        // the record file

	// Skew shifts the client clock dslock reads (Options.Now); used only by
	// the legacy emulator, which gives no server times.
	Skew time.Duration
	// SkewMargin is dslock's Options.ClockSkew (0: the default).
	SkewMargin time.Duration
	// HoldForever makes the first section never end: the process keeps the
	// lock (renewing it) until it is killed.
	HoldForever bool
	// RenewLog, when set, is a file to which every successful Renew's send
	// time (Unix ns) is appended, one line each.
	RenewLog string
	// LifeFaults attacks the edges of a lock's life: each section's context
	// is cancelled at a random point of its acquire or of its hold (or not at
	// all), half of the bodies ignore their context (they stop only if the
	// lock is lost), and DropReply of the store's replies are lost after the
	// store applied the write (Acquire, Renew and Release alike).
	LifeFaults bool
	DropReply  float64
	// Fence, when set (FenceDatastore, FencePostgres), makes every section
	// end with a write through the fence to that resource, with the
	// section's token, whether or not the lock is still held (as a holder
	// frozen mid-section does when it resumes). FenceDSN is the PostgreSQL
	// database's.
	Fence, FenceDSN string
}

// Stats are what a worker process counts besides its sections.
type Stats struct {
	Acquired int64 `json:"acquired"`
	Errors   int64 `json:"errors"` // With returned an error other than a loss
	Lost     int64 `json:"lost"`
	// Under LifeFaults: contexts cancelled while acquiring and while holding,
	// sections that ran on after their context ended, replies dropped.
	CancelledAcquiring int64 `json:"cancelled_acquiring"`
	CancelledHolding   int64 `json:"cancelled_holding"`
	Overran            int64 `json:"overran"`
	DroppedReplies     int64 `json:"dropped_replies"`
	// ReleaseFailed counts sections whose release the store failed (not a
	// reply dropped on purpose): their locks are left to expire.
	ReleaseFailed int64 `json:"release_failed"`
	// Under Fence: writes that landed, writes the fence refused as stale,
	// and writes that failed otherwise.
	FencedWrites int64 `json:"fenced_writes"`
	FenceRefused int64 `json:"fence_refused"`
	FenceErrors  int64 `json:"fence_errors"`
	// FenceError is the first of those other failures, for the report.
	FenceError string `json:"fence_error,omitempty"`
}

// Add adds o's counts to s.
func (s *Stats) Add(o Stats) {
	s.Acquired += o.Acquired
	s.Errors += o.Errors
	s.Lost += o.Lost
	s.CancelledAcquiring += o.CancelledAcquiring
	s.CancelledHolding += o.CancelledHolding
	s.Overran += o.Overran
	s.DroppedReplies += o.DroppedReplies
	s.ReleaseFailed += o.ReleaseFailed
	s.FencedWrites += o.FencedWrites
	s.FenceRefused += o.FenceRefused
	s.FenceErrors += o.FenceErrors
	if s.FenceError == "" {
		s.FenceError = o.FenceError
	}
}

// errReplyDropped is the error of a call whose reply dropReplies lost.
var errReplyDropped = errors.New("torture: reply dropped after the store applied the write")

// dropReplies loses a share of the store's replies after the store applied
// the call: the ambiguous outcome of a connection cut on the way back.
type dropReplies struct {
	locking.Backend
	p       float64
	dropped *int64
}

func (d *dropReplies) drop() bool {
	if rand.Float64() < d.p {
		atomic.AddInt64(d.dropped, 1)
		return true
	}
	return false
}

func (d *dropReplies) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	g, err := d.Backend.Acquire(ctx, r)
	if err == nil && d.drop() {
		return locking.Grant{}, errReplyDropped
	}
	return g, err
}

func (d *dropReplies) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	g, err := d.Backend.Renew(ctx, r)
	if err == nil && d.drop() {
		return locking.Grant{}, errReplyDropped
	}
	return g, err
}

func (d *dropReplies) Release(ctx context.Context, id, owner string) error {
	err := d.Backend.Release(ctx, id, owner)
	if err == nil && d.drop() {
		return errReplyDropped
	}
	return err
}

// NewBackend returns a locking.Backend for cfg's store, and a function that
// closes its connections.
func NewBackend(ctx context.Context, cfg Config) (locking.Backend, func(), error) {
	switch cfg.Store {
	case StoreLegacy, StoreFirestore:
		cc, err := grpc.NewClient("passthrough:///"+cfg.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, nil, err
		}
		now := time.Now
		if cfg.Skew != 0 {
			skew := cfg.Skew
			now = func() time.Time { return time.Now().Add(skew) }
		}
		b, err := dslock.New(ctx, dslock.Options{ProjectID: cfg.Project, Kind: cfg.Prefix, Conn: cc, Now: now,
			ClockSkew: cfg.SkewMargin, RPCTimeout: 2 * time.Second})
		if err != nil {
			cc.Close()
			return nil, nil, err
		}
		return b, func() { cc.Close() }, nil
	case StoreMemcached:
		c := memcache.New(cfg.Addr)
		c.Timeout = time.Second
		b, err := mclock.New(c, mclock.Options{Prefix: cfg.Prefix})
		if err != nil {
			return nil, nil, err
		}
		return b, func() { c.Close() }, nil
	case StoreRedis:
		c := redis.NewClient(&redis.Options{Addr: cfg.Addr, DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second})
		b, err := redislock.New(c, redislock.Options{Prefix: cfg.Prefix})
		if err != nil {
			c.Close()
			return nil, nil, err
		}
		return b, func() { c.Close() }, nil
	}
	return nil, nil, fmt.Errorf("torture: unknown store %q", cfg.Store)
}

// Kind returns the lock kind the store provides: Strong for Datastore, Weak
// for memcached and redis.
func Kind(store string) locking.LockKind {
	if store == StoreLegacy || store == StoreFirestore {
		return locking.Strong
	}
	return locking.Weak
}

// renewLogger wraps a Backend and logs the send time of every successful
// Renew.
type renewLogger struct {
	locking.Backend
	mu sync.Mutex
	w  io.Writer
}

func (r *renewLogger) Renew(ctx context.Context, req locking.Request) (locking.Grant, error) {
	sent := time.Now()
	g, err := r.Backend.Renew(ctx, req)
	if err == nil {
		r.mu.Lock()
		fmt.Fprintf(r.w, "%d\n", sent.UnixNano())
		r.mu.Unlock()
	}
	return g, err
}

// Run runs a worker: cfg.Clients locking clients, each with cfg.Goroutines
// goroutines, acquire random ids of cfg.IDs for cfg.Duration and record every
// section. It returns the counts; sections are in cfg.Out.
func Run(ctx context.Context, cfg Config) (Stats, error) {
	rec, err := NewRecorder(cfg.Out)
	if err != nil {
		return Stats{}, err
	}
	defer rec.Close()
	var renewLog *os.File
	if cfg.RenewLog != "" {
		if renewLog, err = os.OpenFile(cfg.RenewLog, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
			return Stats{}, err
		}
		defer renewLog.Close()
	}
	var (
		stats   Stats
		seq     atomic.Int64
		wg      sync.WaitGroup
		errOnce sync.Once
		first   error
	)
	fail := func(err error) { errOnce.Do(func() { first = err }) }
	var fenceErr atomic.Value // the first fenced write that failed other than as stale
	res, err := openResource(ctx, cfg)
	if err != nil {
		return stats, err
	}
	if res != nil {
		defer res.close()
	}
	deadline := time.Now().Add(cfg.Duration)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	kind := Kind(cfg.Store)
	pid := os.Getpid()
	for c := range max(cfg.Clients, 1) {
		b, closeB, err := NewBackend(ctx, cfg)
		if err != nil {
			return stats, err
		}
		defer closeB()
		if renewLog != nil {
			b = &renewLogger{Backend: b, w: renewLog}
		}
		if cfg.DropReply > 0 {
			b = &dropReplies{Backend: b, p: cfg.DropReply, dropped: &stats.DroppedReplies}
		}
		cfgL := locking.Config{Logger: log, Lease: cfg.Lease}
		if kind == locking.Strong {
			cfgL.Strong = b
		} else {
			cfgL.Weak = b
		}
		client, err := locking.New(cfgL)
		if err != nil {
			return stats, err
		}
		for g := range max(cfg.Goroutines, 1) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(deadline) && ctx.Err() == nil {
					id := cfg.IDs[rand.N(len(cfg.IDs))]
					s := Section{ID: id, Owner: fmt.Sprintf("%d/%d.%d/%d", pid, c, g, seq.Add(1)), Start: time.Now().UnixNano()}
					wctx, cancel := context.WithDeadline(ctx, deadline.Add(cfg.Lease))
					hold := time.Duration(0)
					if cfg.MaxHold > 0 {
						hold = rand.N(cfg.MaxHold)
					}
					if cfg.HoldForever {
						hold = 24 * time.Hour
					}
					// Under LifeFaults: where the context ends (0: never,
					// 1: while acquiring, 2: while holding), and whether the
					// body watches it.
					cut, ignores := 0, false
					if cfg.LifeFaults {
						cut, ignores = rand.N(3), rand.N(2) == 0
						if cut == 1 {
							time.AfterFunc(rand.N(2*time.Millisecond), cancel)
						}
					}
					err := client.With(wctx, id, func(fctx context.Context) error {
						s.Enter = time.Now().UnixNano()
						l := locking.FromContext(fctx)
						s.Token = l.Token()
						if err := rec.Entered(s); err != nil {
							return err
						}
						if cut == 2 {
							time.AfterFunc(rand.N(hold+1), cancel)
						}
						t := time.NewTimer(hold)
						defer t.Stop()
						if ignores {
							// A step that does not watch its context: it
							// stops early only if the lock is lost.
							select {
							case <-t.C:
							case <-l.Done():
							}
						} else {
							select {
							case <-t.C:
							case <-fctx.Done():
							}
						}
						if res != nil {
							// The write does not look at fctx: a holder that
							// lost its lock writes all the same, and the
							// fence must refuse it.
							writeCtx, cancelWrite := context.WithTimeout(context.WithoutCancel(fctx), fencedWriteTimeout)
							switch err := res.write(writeCtx, id, fence.Of(l), s.Owner); {
							case err == nil:
								atomic.AddInt64(&stats.FencedWrites, 1)
							case errors.Is(err, fence.ErrStale):
								atomic.AddInt64(&stats.FenceRefused, 1)
							default:
								if atomic.AddInt64(&stats.FenceErrors, 1) == 1 {
									fenceErr.Store(err.Error())
								}
							}
							cancelWrite()
						}
						s.Lost = errors.Is(context.Cause(fctx), locking.ErrLockLost)
						s.Exit = time.Now().UnixNano()
						if wctx.Err() != nil && !s.Lost {
							atomic.AddInt64(&stats.CancelledHolding, 1)
							if ignores {
								atomic.AddInt64(&stats.Overran, 1)
							}
						}
						return nil
					}, locking.Kind(kind), locking.Lease(cfg.Lease))
					cancelled := wctx.Err() != nil
					cancel()
					if s.Enter == 0 {
						// Not acquired: the deadline, a store failure under
						// faults, or a context cut while acquiring.
						switch {
						case cancelled && cut == 1:
							atomic.AddInt64(&stats.CancelledAcquiring, 1)
						case err != nil && ctx.Err() == nil && time.Now().Before(deadline):
							atomic.AddInt64(&stats.Errors, 1)
						}
						continue
					}
					s.End = time.Now().UnixNano()
					atomic.AddInt64(&stats.Acquired, 1)
					switch {
					case errors.Is(err, locking.ErrLockLost):
						atomic.AddInt64(&stats.Lost, 1)
						s.Lost = true
						s.Err = err.Error()
					case err != nil:
						atomic.AddInt64(&stats.Errors, 1)
						s.Err = err.Error()
						if !errors.Is(err, errReplyDropped) {
							// The body ran and returned nil: the release
							// failed in the store, and the lock expires with
							// its lease.
							atomic.AddInt64(&stats.ReleaseFailed, 1)
						}
					}
					if s.Exit == 0 { // never: fn always sets it, but keep Crashed honest
						s.Exit = s.End
					}
					if err := rec.Ended(s); err != nil {
						fail(err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	if e, ok := fenceErr.Load().(string); ok {
		stats.FenceError = e
	}
	return stats, first
}

// Main runs a worker process from the environment if EnvConfig is set, writes
// its Stats as JSON to stdout and exits; otherwise it returns at once. Call
// it first thing in TestMain.
func Main() {
	raw := os.Getenv(EnvConfig)
	if raw == "" {
		return
	}
	var cfg Config
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "torture worker: bad config:", err)
		os.Exit(2)
	}
	stats, err := Run(context.Background(), cfg)
	_ = json.NewEncoder(os.Stdout).Encode(stats)
	if err != nil {
		fmt.Fprintln(os.Stderr, "torture worker:", err)
		os.Exit(1)
	}
	os.Exit(0)
}
