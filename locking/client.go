package locking

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// Defaults used when Config leaves a field zero.
const (
	// DefaultLease is the lease of a lock when neither Config.Lease nor the
	// Lease option says otherwise. Holders renew every third of it, so a
	// holder that dies leaves its lock blocked for at most this long.
	DefaultLease = 30 * time.Second
	// DefaultMinBackoff is the first, and shortest, pause between two tries
	// of a waiting Acquire. It bounds the polling of one waiting id by one
	// Client to 1/DefaultMinBackoff = 50 tries a second.
	DefaultMinBackoff = 20 * time.Millisecond
	// DefaultMaxBackoff caps the pause between two tries of a waiting
	// Acquire. Between MinBackoff and MaxBackoff the pause grows with the
	// time already waited (at most a tenth of it; see Config.MinBackoff), so
	// a waiter notices a release within about 4% of the time it has waited,
	// on average, and within DefaultMaxBackoff at worst; a 60-second wait
	// costs about 100 polls (1.7 a second; TestPollSchedule) instead of 50
	// a second.
	DefaultMaxBackoff = 2 * time.Second
)

// Config configures a Client. Only the backends are required.
type Config struct {
	// Strong stores Strong locks; Weak stores Weak locks. At least one must be
	// set. When Weak is nil, Weak locks use Strong (a stronger lock is always
	// a valid weak one), as the Default client does; when Strong is nil,
	// Strong locks fail with ErrNoBackend (a weak lock is not a strong one).
	Strong, Weak Backend
	// Lease is the default lease (DefaultLease when zero).
	Lease time.Duration
	// MinBackoff and MaxBackoff bound the pause between two tries of a waiting
	// Acquire (DefaultMinBackoff and DefaultMaxBackoff when zero), and of a
	// renewal that failed. A waiter's pause grows with the time it has
	// waited: jitter over [h/2, h] where h is a tenth of the time waited,
	// within [MinBackoff, MaxBackoff]. So one waiting id polls its backend
	// at most 1/MinBackoff times a second from one Client, and a long wait
	// costs little. On a backend that announces releases (a Notifier, also
	// behind decorators that implement Wrapper) the waiter is woken by the
	// announcement and polls only every SafetyPoll.
	MinBackoff, MaxBackoff time.Duration
	// Logger receives the client's rare log lines: a renewal that failed and
	// is being retried, a lock lost, a release that failed. When nil, each
	// line goes to slog.Default() as it is when the line is logged, so a
	// later slog.SetDefault (a JSON handler for Cloud Logging) applies.
	Logger *slog.Logger
	// MeterProvider provides the meter of the client's metrics, and
	// TracerProvider the tracer of its spans (see the package documentation,
	// Observability). When nil, the OpenTelemetry global providers are used:
	// no-ops until the program installs SDK providers with
	// otel.SetMeterProvider and otel.SetTracerProvider (before or after New);
	// until then, as with the no-op providers, the client reads no clock and
	// starts no span for them. A lock's metrics (its acquisition, store
	// calls, renewals and end) are recorded if the providers listened when
	// its Acquire began.
	MeterProvider  metric.MeterProvider
	TracerProvider trace.TracerProvider
}

// A Client acquires locks from its backends. It is safe for concurrent use;
// create one per process and share it, so that waiters for the same id in
// this process queue behind one another and only one of them polls the
// backend (see Acquire).
type Client struct {
	backends   [2]Backend  // indexed by LockKind, as configured
	notifiers  [2]Notifier // backends that announce releases; nil where they do not
	metered    [2]Backend  // backends wrapped to record every call; nil where backends is
	tel        *telemetry
	lease      time.Duration
	minBackoff time.Duration
	maxBackoff time.Duration
	log        *slog.Logger // Config.Logger; nil: slog.Default() at each line
	err        error        // set on a Default() client whose configuration failed
	cloudRun   bool         // K_SERVICE was set when the client was made
	ctxEnds    ctxEndWarn

	mu    sync.Mutex
	gates map[gateKey]*gate // guarded by mu

	renewals renewals // when each held lock renews next
	holds    holdLog  // how long recent holdings of contended ids lasted

	hooksMu   sync.Mutex                                                // serializes OnRelease
	onRelease atomic.Pointer[[]func(context.Context, LockKind, string)] // replaced, never changed, by OnRelease
}

// OnRelease registers fn to be called after every release by c that the
// store confirmed: Lock.Release, the end of With, and the release of a lock
// whose context ended. fn runs synchronously in that release, before it
// returns (so before Release returns, and before With returns), on a
// context detached from the caller's and bounded by the release's own
// 10-second budget; a lock that was lost or whose release failed does not
// call it. Package tasks registers its hand-off to parked tasks this way
// (tasks.HandOff). fn must be safe for concurrent use; it cannot be
// unregistered.
func (c *Client) OnRelease(fn func(ctx context.Context, kind LockKind, id string)) {
	if fn == nil {
		return
	}
	c.hooksMu.Lock()
	defer c.hooksMu.Unlock()
	var hooks []func(context.Context, LockKind, string)
	if old := c.onRelease.Load(); old != nil {
		hooks = append(hooks, *old...)
	}
	hooks = append(hooks, fn)
	c.onRelease.Store(&hooks)
}

// released calls the OnRelease hooks.
func (c *Client) released(ctx context.Context, kind LockKind, id string) {
	hooks := c.onRelease.Load()
	if hooks == nil {
		return
	}
	for _, fn := range *hooks {
		fn(ctx, kind, id)
	}
}

// New returns a client for cfg, or an error wrapping ErrInvalid when cfg is
// unusable. It does no I/O.
func New(cfg Config) (*Client, error) {
	if cfg.Strong == nil && cfg.Weak == nil {
		return nil, invalid("Config: no backend: set Strong, Weak or both")
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"Lease", cfg.Lease}, {"MinBackoff", cfg.MinBackoff}, {"MaxBackoff", cfg.MaxBackoff}} {
		if d.v < 0 || d.v > MaxLease {
			return nil, invalid("Config: %s %v is not in [0, %v] (0: the default)", d.name, d.v, MaxLease)
		}
	}
	if cfg.Weak == nil {
		cfg.Weak = cfg.Strong
	}
	c := &Client{
		backends:   [2]Backend{cfg.Strong, cfg.Weak},
		lease:      cmp(cfg.Lease, DefaultLease),
		minBackoff: cmp(cfg.MinBackoff, DefaultMinBackoff),
		maxBackoff: cmp(cfg.MaxBackoff, DefaultMaxBackoff),
		log:        cfg.Logger,
		gates:      make(map[gateKey]*gate),
		cloudRun:   os.Getenv("K_SERVICE") != "",
	}
	if c.maxBackoff < c.minBackoff {
		return nil, invalid("Config: MaxBackoff %v is below MinBackoff %v", c.maxBackoff, c.minBackoff)
	}
	tel, err := newTelemetry(cfg.MeterProvider, cfg.TracerProvider)
	if err != nil {
		return nil, err
	}
	c.tel = tel
	for k, b := range c.backends {
		if b != nil {
			c.metered[k] = b
			if tel.metrics {
				c.metered[k] = &meteredBackend{b: b, t: tel, kind: LockKind(k)}
			}
		}
		if n, ok := capability[Notifier](b); ok {
			c.notifiers[k] = n
		}
	}
	return c, nil
}

func cmp(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// logger returns Config.Logger, or the process's default logger as it is
// now, so that a slog.SetDefault after New still applies.
func (c *Client) logger() *slog.Logger {
	if c.log != nil {
		return c.log
	}
	return slog.Default()
}

// Lease returns the client's default lease: Config.Lease, or DefaultLease.
func (c *Client) Lease() time.Duration { return c.lease }

// InProcess reports whether locks of kind k are kept in this process's
// memory (the in-memory default of FromEnvironment, or a backend such as
// package memlock's that says so, an InProcessBackend, also when wrapped by
// a decorator that implements Wrapper), and so exclude nothing across
// instances.
func (c *Client) InProcess(k LockKind) bool {
	b, ok := capability[InProcessBackend](c.Backend(k))
	return ok && b.InProcess()
}

// CanProbe reports whether Probe can tell for locks of kind k: k's backend
// implements Prober (also when wrapped by a decorator that implements
// Wrapper). It does no I/O.
func (c *Client) CanProbe(k LockKind) bool {
	_, ok := capability[Prober](c.Backend(k))
	return ok
}

// Probe reports whether the lock id of kind k is held now, and the lease
// left when it is, without taking it (see Prober). It returns an error
// wrapping errors.ErrUnsupported when k's backend cannot tell (it does not
// implement Prober, through Wrapper chains), or wrapping ErrInvalid for an
// empty id or an unknown kind.
func (c *Client) Probe(ctx context.Context, k LockKind, id string) (held bool, remaining time.Duration, err error) {
	if id == "" {
		return false, 0, NewInvalid("locking: probe: empty id")
	}
	b := c.Backend(k)
	if b == nil {
		return false, 0, NewInvalid(fmt.Sprintf("locking: probe: no backend for kind %v", k))
	}
	p, ok := capability[Prober](b)
	if !ok {
		return false, 0, fmt.Errorf("locking: probe %q: the %v backend cannot probe a lock: %w", id, k, errors.ErrUnsupported)
	}
	return p.Probe(ctx, id)
}

// Backend returns the backend that stores locks of kind k, or nil.
func (c *Client) Backend(k LockKind) Backend {
	if k != Strong && k != Weak {
		return nil
	}
	return c.backends[k]
}

// Acquire acquires the lock id and returns it held, renewed in the
// background until Release. The lock lives no longer than ctx: when ctx is
// done the renewals stop, the lock is released (on a detached context) and
// Done closes; code that goes on after that runs unguarded, so watch
// ctx.Done() or Lock.Done(), or use With, which keeps the lock until its
// function returns. (To bound only the wait, use MaxWait, not a shorter ctx.)
// A lock left to end with a request's context (Acquire(r.Context()) without
// Release) is released after the answer, when Cloud Run may have throttled
// the instance's CPU or frozen it: the release can come late, or only when
// the lease runs out. Release before answering, or use With. On Cloud Run
// (K_SERVICE set) the client warns when a lock ends that way: once per id,
// at most every 10 seconds.
//
// While the lock is held by someone else Acquire waits (unless Wait(false)),
// woken by the backend's announcement of a release (a Notifier) or polling
// it with a jittered pause that grows with the time waited (and one poll
// timed to the expected end of the holding; see the package documentation),
// until it acquires the lock, MaxWait passes (a *NotAcquiredError, errors.Is ErrNotAcquired), or
// ctx is done (an error wrapping ctx.Err()). Callers of one Client waiting for
// the same id queue in this process: only the first polls the backend, and a
// release here hands the lock on without waiting for a poll. Callers that
// pass StealAfter do not queue, since they may take the lock from a holder.
//
// Locks are not re-entrant: an Acquire of an id that a With in ctx's chain
// already holds (same id and store) fails at once with an error wrapping
// ErrReentrant, instead of waiting for itself.
//
// Bad input (an empty id, an invalid option, a kind with no backend) fails
// before any I/O with an error wrapping ErrInvalid or ErrNoBackend. A backend
// failure ends the call with that error, and a grant that arrives after ctx
// is done is given back: when Acquire returns an error, nothing is left held
// (a backend call whose outcome is unknown is followed by a release of the
// owner it tried to take the lock for).
func (c *Client) Acquire(ctx context.Context, id string, opts ...Option) (*Lock, error) {
	return c.acquireFor(ctx, ctx, id, opts)
}

// With acquires the lock id, runs fn while holding it, and releases it when
// fn returns or panics (the panic goes on). It is djangae's lock() decorator
// and context manager.
//
// The lock is held for as long as fn runs, never less: fn's context is
// cancelled when ctx ends (a request timeout, a client that went away), but
// the lock stays held, and renewed, until fn returns, so that no other owner
// can start the same work while fn is still running a step that does not
// watch its context. While fn outlives ctx, With logs a warning at once and
// then at most every 10 seconds. If ctx is done before fn would start, fn is
// not run.
//
// fn's context is cancelled, with cause ErrLockLost, if the lock is lost
// while fn runs; With then returns an error wrapping ErrLockLost, joined
// with fn's own error if any. The release after fn runs on a detached
// context, like Release.
//
// When the lock cannot be acquired fn is not run and With returns Acquire's
// error: with Wait(false), a *NotAcquiredError; for an id that an enclosing
// With already holds, an error wrapping ErrReentrant (locks are not
// re-entrant). An ErrNotAcquired that fn itself returns (from a nested lock)
// comes back unchanged; its NotAcquiredError.ID names the inner lock.
// FromContext(ctx) in fn returns the held lock, for its fencing token.
func (c *Client) With(ctx context.Context, id string, fn func(ctx context.Context) error, opts ...Option) (err error) {
	if fn == nil {
		return invalid("With(%q): nil function", id)
	}
	l, err := c.acquireFor(ctx, context.WithoutCancel(ctx), id, opts)
	if err != nil {
		return err
	}
	if ctx.Err() != nil { // ended just after the grant: do not start fn
		_ = l.Release(ctx)
		return fmt.Errorf("locking: acquire %q: %w", id, ctx.Err())
	}
	bctx, span := c.tel.startHold(ctx, l)
	fctx, cancel := context.WithCancelCause(context.WithValue(bctx, lockKey{}, l))
	l.cancelOnLoss(cancel)
	stopWatch := context.AfterFunc(ctx, l.startOverrun)
	returned := false
	defer func() {
		stopWatch()
		l.stopOverrun()
		cancel(nil)
		c.tel.endHold(span, err, l.lostErr(), !returned)
		rerr := l.Release(ctx)
		switch lost := l.lostErr(); {
		case lost != nil:
			err = errors.Join(err, lost)
		case rerr != nil:
			err = errors.Join(err, rerr)
		}
	}()
	err = fn(fctx)
	returned = true
	return err
}

type lockKey struct{}

// FromContext returns the lock that With holds for the function it runs
// with ctx (the innermost one, when With calls nest), or nil. Its Token is
// the fencing token to hand to the resource the function writes to.
func FromContext(ctx context.Context) *Lock {
	l, _ := ctx.Value(lockKey{}).(*Lock)
	return l
}
