package locking

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"sync"
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
	// of a waiting Acquire.
	DefaultMinBackoff = 20 * time.Millisecond
	// DefaultMaxBackoff caps the pause between two tries of a waiting Acquire.
	DefaultMaxBackoff = 250 * time.Millisecond
)

// releaseTimeout bounds a Release run on behalf of a caller whose context is
// already done (With returning, a lock whose Acquire context ended).
const releaseTimeout = 10 * time.Second

// Config configures a Client. Only the backends are required.
type Config struct {
	// Strong stores Strong locks; Weak stores Weak locks. At least one must be
	// set. A kind with no backend fails with ErrNoBackend.
	Strong, Weak Backend
	// Lease is the default lease (DefaultLease when zero).
	Lease time.Duration
	// MinBackoff and MaxBackoff bound the pause between two tries of a waiting
	// Acquire (DefaultMinBackoff and DefaultMaxBackoff when zero). The pause
	// grows exponentially from MinBackoff, with full jitter above MinBackoff,
	// up to MaxBackoff; so one waiting id polls its backend at most
	// 1/MinBackoff times a second from one Client.
	MinBackoff, MaxBackoff time.Duration
	// Logger receives the client's rare log lines: a renewal that failed and
	// is being retried, a lock lost, a release that failed. slog.Default()
	// when nil.
	Logger *slog.Logger
	// MeterProvider provides the meter of the client's metrics, and
	// TracerProvider the tracer of its spans (see the package documentation,
	// Observability). When nil, the OpenTelemetry global providers are used:
	// no-ops until the program installs SDK providers with
	// otel.SetMeterProvider and otel.SetTracerProvider (before or after New).
	MeterProvider  metric.MeterProvider
	TracerProvider trace.TracerProvider
}

// A Client acquires locks from its backends. It is safe for concurrent use;
// create one per process and share it, so that waiters for the same id in
// this process queue behind one another and only one of them polls the
// backend (see Acquire).
type Client struct {
	backends   [2]Backend // indexed by LockKind, as configured
	metered    [2]Backend // backends wrapped to record every call; nil where backends is
	tel        *telemetry
	lease      time.Duration
	minBackoff time.Duration
	maxBackoff time.Duration
	log        *slog.Logger
	err        error // set on a Default() client whose configuration failed

	mu    sync.Mutex
	gates map[gateKey]*gate // guarded by mu
}

// New returns a client for cfg, or an error wrapping ErrInvalid when cfg is
// unusable. It does no I/O.
func New(cfg Config) (*Client, error) {
	if cfg.Strong == nil && cfg.Weak == nil {
		return nil, invalid("Config: no backend: set Strong, Weak or both")
	}
	if cfg.Lease < 0 || cfg.MinBackoff < 0 || cfg.MaxBackoff < 0 {
		return nil, invalid("Config: negative duration (Lease %v, MinBackoff %v, MaxBackoff %v)", cfg.Lease, cfg.MinBackoff, cfg.MaxBackoff)
	}
	c := &Client{
		backends:   [2]Backend{cfg.Strong, cfg.Weak},
		lease:      cmp(cfg.Lease, DefaultLease),
		minBackoff: cmp(cfg.MinBackoff, DefaultMinBackoff),
		maxBackoff: cmp(cfg.MaxBackoff, DefaultMaxBackoff),
		log:        cfg.Logger,
		gates:      make(map[gateKey]*gate),
	}
	if c.maxBackoff < c.minBackoff {
		return nil, invalid("Config: MaxBackoff %v is below MinBackoff %v", c.maxBackoff, c.minBackoff)
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	tel, err := newTelemetry(cfg.MeterProvider, cfg.TracerProvider)
	if err != nil {
		return nil, err
	}
	c.tel = tel
	for k, b := range c.backends {
		if b != nil {
			c.metered[k] = &meteredBackend{b: b, t: tel, kind: LockKind(k)}
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

// Backend returns the backend that stores locks of kind k, or nil.
func (c *Client) Backend(k LockKind) Backend {
	if k != Strong && k != Weak {
		return nil
	}
	return c.backends[k]
}

// Acquire acquires the lock id and returns it held, renewed in the
// background until Release. The lock lives no longer than ctx: when ctx is
// done the renewals stop, the lock is released and Done closes. (To bound only
// the wait, use MaxWait, not a shorter ctx.)
//
// While the lock is held by someone else Acquire waits (unless Wait(false)),
// polling the backend with exponential backoff and jitter, until it acquires
// the lock, MaxWait passes (a *NotAcquiredError, errors.Is ErrNotAcquired), or
// ctx is done (an error wrapping ctx.Err()). Callers of one Client waiting for
// the same id queue in this process: only the first polls the backend, and a
// release here hands the lock on without waiting for a poll. Callers that
// pass StealAfter do not queue, since they may take the lock from a holder.
//
// Bad input (an empty id, an invalid option, a kind with no backend) fails
// before any I/O with an error wrapping ErrInvalid or ErrNoBackend. A backend
// failure ends the call with that error; nothing is left held.
func (c *Client) Acquire(ctx context.Context, id string, opts ...Option) (*Lock, error) {
	o, b, err := c.resolve(id, opts)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	sctx, span := c.tel.startAcquire(ctx, id, &o)
	var st acquireStats
	l, err := c.acquire(ctx, sctx, id, o, b, &st)
	c.tel.endAcquire(sctx, span, o.kind, start, &st, err)
	return l, err
}

// acquire is Acquire after its options are resolved. It calls the backend
// with sctx, the context of the acquire span, and ties the lock's life to
// ctx; it reports what it saw in st.
func (c *Client) acquire(ctx, sctx context.Context, id string, o options, b Backend, st *acquireStats) (*Lock, error) {
	st.outcome = outcomeCanceled
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("locking: acquire %q: %w", id, err)
	}
	var deadline time.Time
	if o.maxWait > 0 {
		deadline = time.Now().Add(o.maxWait)
	}

	var g *gate
	if o.stealAfter == 0 {
		var err error
		g, err = c.enter(ctx, o.kind, id, o.wait, deadline, &st.waited)
		if err != nil {
			st.outcome = outcomeOf(err)
			return nil, err
		}
	}
	req := Request{ID: id, Owner: newOwner(), Lease: o.lease, StealAfter: o.stealAfter}
	for attempt := 0; ; attempt++ {
		sent := time.Now()
		grant, err := b.Acquire(sctx, req)
		st.polls++
		c.tel.poll(sctx, o.kind, grant, err)
		if err == nil && grant.Acquired {
			st.outcome, st.token, st.tookOver = outcomeAcquired, grant.Token, grant.TookOver
			return c.newLock(ctx, b, o.kind, req, grant.Token, sent, g), nil
		}
		if err != nil {
			g.leave()
			if ctx.Err() != nil {
				return nil, fmt.Errorf("locking: acquire %q: %w", id, ctx.Err())
			}
			st.outcome = outcomeError
			return nil, fmt.Errorf("locking: acquire %q: %w", id, err)
		}
		if !o.wait {
			g.leave()
			st.outcome = outcomeBusy
			return nil, &NotAcquiredError{ID: id, Remaining: grant.Remaining}
		}
		pause := c.backoff(attempt)
		if !deadline.IsZero() {
			left := time.Until(deadline)
			if left <= 0 {
				g.leave()
				st.outcome = outcomeTimeout
				return nil, &NotAcquiredError{ID: id, Remaining: grant.Remaining, TimedOut: true}
			}
			pause = min(pause, left)
		}
		paused := time.Now()
		err = sleep(ctx, pause)
		st.waited += time.Since(paused)
		if err != nil {
			g.leave()
			return nil, fmt.Errorf("locking: acquire %q: %w", id, err)
		}
	}
}

// outcomeOf classifies an error of the local gate: not acquired (busy or
// timed out) or the context ended.
func outcomeOf(err error) outcome {
	var na *NotAcquiredError
	switch {
	case errors.As(err, &na) && na.TimedOut:
		return outcomeTimeout
	case na != nil:
		return outcomeBusy
	}
	return outcomeCanceled
}

// With acquires the lock id, runs fn while holding it, and releases it when
// fn returns or panics (the panic goes on). It is djangae's lock() decorator
// and context manager. fn's context is cancelled, with cause ErrLockLost, if
// the lock is lost while fn runs; With then returns an error wrapping
// ErrLockLost, joined with fn's own error if any.
//
// When the lock cannot be acquired fn is not run and With returns Acquire's
// error: with Wait(false), a *NotAcquiredError. An ErrNotAcquired that fn
// itself returns (from a nested lock) comes back unchanged; its
// NotAcquiredError.ID names the inner lock. FromContext(ctx) in fn returns
// the held lock, for its fencing token.
func (c *Client) With(ctx context.Context, id string, fn func(ctx context.Context) error, opts ...Option) (err error) {
	if fn == nil {
		return invalid("With(%q): nil function", id)
	}
	l, err := c.Acquire(ctx, id, opts...)
	if err != nil {
		return err
	}
	bctx, span := c.tel.startHold(ctx, l)
	fctx, cancel := context.WithCancelCause(context.WithValue(bctx, lockKey{}, l))
	watcherDone := make(chan struct{})
	go func() {
		defer close(watcherDone)
		select {
		case <-l.Done():
			if lost := l.lostErr(); lost != nil {
				cancel(lost)
			}
		case <-fctx.Done():
		}
	}()
	returned := false
	defer func() {
		cancel(nil)
		<-watcherDone
		c.tel.endHold(span, err, l.lostErr(), !returned)
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), releaseTimeout)
		defer rcancel()
		rerr := l.Release(rctx)
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

func (c *Client) resolve(id string, opts []Option) (options, Backend, error) {
	if c.err != nil {
		return options{}, nil, c.err
	}
	o := options{wait: true, kind: Strong}
	for _, opt := range opts {
		if opt == nil {
			o.fail(invalid("nil Option"))
			continue
		}
		opt(&o)
	}
	if o.err == nil && id == "" {
		o.fail(invalid("empty lock id"))
	}
	if o.err != nil {
		return o, nil, o.err
	}
	if o.lease == 0 {
		o.lease = c.lease
	}
	b := c.metered[o.kind]
	if b == nil {
		return o, nil, fmt.Errorf("%w: %v", ErrNoBackend, o.kind)
	}
	return o, b, nil
}

// backoff returns the pause before try attempt+1: full jitter over
// [minBackoff, min(maxBackoff, minBackoff·2^attempt)].
func (c *Client) backoff(attempt int) time.Duration {
	ceil := c.maxBackoff
	if attempt < 30 {
		ceil = min(c.maxBackoff, c.minBackoff<<attempt)
	}
	if ceil <= c.minBackoff {
		return c.minBackoff
	}
	return c.minBackoff + mrand.N(ceil-c.minBackoff+1)
}

// sleep waits for d or for ctx, and returns ctx.Err() in the latter case.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// newOwner returns a random 128-bit owner token.
func newOwner() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}
