package locking

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"time"
)

// acquireFor acquires id, waiting with ctx, for a lock whose life is bound
// to life.
func (c *Client) acquireFor(ctx, life context.Context, id string, opts []Option) (*Lock, error) {
	o, b, err := c.resolve(id, opts)
	if err != nil {
		return nil, err
	}
	parent := FromContext(ctx)
	if err := c.reentrant(parent, o.kind, id); err != nil {
		return nil, err
	}
	var start time.Time
	if o.measured = c.tel.measuring(); o.measured {
		start = time.Now()
	} else {
		b = c.backends[o.kind] // not the metered one
	}
	ctx, span := c.tel.startAcquire(ctx, id, &o)
	l, st, err := c.acquire(ctx, life, id, o, b, parent)
	c.tel.endAcquire(ctx, span, o.kind, start, &st, err)
	return l, err
}

// reentrant returns an error wrapping ErrReentrant when a lock that With
// still holds in the chain that ends with held is the lock (kind, id) of
// this client, or the lock id of the same store value.
func (c *Client) reentrant(held *Lock, kind LockKind, id string) error {
	for h := held; h != nil; h = h.parent {
		if h.req.ID != id || h.Err() != nil { // another id, or no longer held
			continue
		}
		if (h.c == c && h.kind == kind) || sameBackend(h.c.backends[h.kind], c.backends[kind]) {
			return fmt.Errorf("locking: acquire %q: %w", id, ErrReentrant)
		}
	}
	return nil
}

// sameBackend reports whether a and b are the same store value. Values that
// cannot be compared (a type with a slice field, or an interface holding
// one) are never the same.
func sameBackend(a, b Backend) (same bool) {
	if a == nil || b == nil {
		return false
	}
	defer func() {
		if recover() != nil {
			same = false
		}
	}()
	return a == b
}

// acquire is Acquire after its options are resolved: it waits and calls the
// backend with ctx (the context of the acquire span) and ties the lock's
// life to life. It returns what it saw for the telemetry.
func (c *Client) acquire(ctx, life context.Context, id string, o options, b Backend, parent *Lock) (*Lock, acquireStats, error) {
	st := acquireStats{outcome: outcomeCanceled}
	if err := ctx.Err(); err != nil {
		return nil, st, fmt.Errorf("locking: acquire %q: %w", id, err)
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
			return nil, st, err
		}
	}
	req := Request{ID: id, Owner: newOwner(), Lease: o.lease, StealAfter: o.stealAfter}
	var polling time.Time // the first busy answer
	w := &waiter{log: c.logger()}
	if o.stealAfter == 0 {
		// A steal comes with time, not with a release: stealers poll.
		w.n = c.notifiers[o.kind]
	}
	defer w.stop()
	if o.wait {
		// After a long run of local hand-offs, leave the lock to another
		// process's waiter for a moment (see gate).
		if pause := g.yield(c, w.n != nil); pause > 0 {
			if !deadline.IsZero() {
				pause = min(pause, max(0, time.Until(deadline)))
			}
			paused := time.Now()
			err := w.sleep(ctx, pause)
			st.waited += time.Since(paused)
			if err != nil {
				g.leave()
				return nil, st, fmt.Errorf("locking: acquire %q: %w", id, err)
			}
		}
	}
	for {
		sent := time.Now()
		grant, err := c.ask(ctx, b, g, req, sent)
		st.polls++
		if o.measured {
			c.tel.poll(ctx, o.kind, grant, err)
		}
		if err == nil && grant.Acquired {
			if ctx.Err() != nil {
				// The caller gave up while the grant was on its way.
				c.giveBack(ctx, b, req)
				g.leave()
				return nil, st, fmt.Errorf("locking: acquire %q: %w", id, ctx.Err())
			}
			st.outcome, st.token, st.tookOver = outcomeAcquired, grant.Token, grant.TookOver
			var wrote time.Time
			if !polling.IsZero() {
				// A contended id: time this holding (see holdLog). The
				// write that took it reached the store about half a
				// round trip before the answer (the call may have read
				// first).
				took := time.Since(sent)
				wrote = sent.Add(took - min(took, cmp(w.rtt, took))/2)
			}
			return c.newLock(life, b, o, req, grant.Token, sent, wrote, g, parent), st, nil
		}
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				// The store may have applied the acquire and lost the reply.
				c.giveBack(ctx, b, req)
			}
			g.leave()
			if ctx.Err() != nil {
				return nil, st, fmt.Errorf("locking: acquire %q: %w", id, ctx.Err())
			}
			st.outcome = outcomeError
			return nil, st, fmt.Errorf("locking: acquire %q: %w", id, err)
		}
		if !o.wait {
			g.leave()
			st.outcome = outcomeBusy
			return nil, st, &NotAcquiredError{ID: id, Remaining: grant.Remaining}
		}
		if polling.IsZero() {
			polling = time.Now()
		}
		if w.wants() {
			// Once the watch is in effect it says so, and the poll that
			// follows sees a release that came before it.
			w.start(ctx, id)
		}
		took, waited := time.Since(sent), time.Since(polling)
		w.expect(c, gateKey{o.kind, id}, sent.Add(took/2), waited, took, grant.Age)
		pause := w.pause(c, waited, grant.Remaining, took)
		if !deadline.IsZero() {
			left := time.Until(deadline)
			if left <= 0 {
				g.leave()
				st.outcome = outcomeTimeout
				return nil, st, &NotAcquiredError{ID: id, Remaining: grant.Remaining, TimedOut: true}
			}
			pause = min(pause, left)
		}
		paused := time.Now()
		err = w.sleep(ctx, pause)
		st.waited += time.Since(paused)
		if err != nil {
			g.leave()
			return nil, st, fmt.Errorf("locking: acquire %q: %w", id, err)
		}
	}
}

// ask makes one Backend.Acquire call for the caller in gate g (nil for
// stealers), and tells the gate what it learnt, also when the call panics
// (a panic goes on, but leaves the gate free for the next caller).
func (c *Client) ask(ctx context.Context, b Backend, g *gate, req Request, sent time.Time) (grant Grant, err error) {
	g.ask()
	answered := false
	defer func() {
		if !answered {
			g.answered(Grant{}, errors.New("locking: the backend panicked"), sent, req.Lease)
			g.leave()
		}
	}()
	grant, err = b.Acquire(ctx, req)
	g.answered(grant, err, sent, req.Lease)
	answered = true
	return grant, err
}

// giveBackWait bounds the give-back of a failed Acquire. Long enough for a
// slow store to answer, short enough that a store that does not answer
// holds the caller (whose context may have ended) for 2 s, not 10.
const giveBackWait = 2 * time.Second

// giveBack releases req's owner inside the failing Acquire, before it
// returns — a function instance may be frozen, or its process end, once the
// caller answers, so nothing is left to run after — on a context detached
// from ctx and bounded by giveBackWait: a grant nobody will hold, or an
// acquire whose outcome is unknown. The owner is unique to the request, so
// this never removes another owner's lock. A store that does not answer in
// time keeps the holding until its lease runs out.
func (c *Client) giveBack(ctx context.Context, b Backend, req Request) {
	rctx := &opContext{parent: ctx, bound: giveBackWait}
	defer rctx.cancel()
	err := b.Release(rctx, req.ID, req.Owner)
	if err != nil && !errors.Is(err, ErrNotHeld) {
		c.logger().Warn("locking: could not give back an acquire nobody holds; it expires with its lease",
			"lock_id", req.ID, "lease", req.Lease, "error", err)
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

func (c *Client) resolve(id string, opts []Option) (options, Backend, error) {
	if c.err != nil {
		return options{}, nil, c.err
	}
	o := options{wait: true, kind: Strong}
	if len(opts) > 0 {
		// Options get a pointer: the copy escapes, o does not, so a call
		// without options allocates nothing here.
		p := new(options)
		*p = o
		for _, opt := range opts {
			if opt == nil {
				p.fail(invalid("nil Option"))
				continue
			}
			opt(p)
		}
		o = *p
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

// newOwner returns a random 128-bit owner token, in hex. It is drawn from
// math/rand/v2's generator (ChaCha8, seeded from the operating system's
// entropy), which is as unique as crypto/rand at a tenth of the cost: the
// token names a holder, it guards no secret.
func newOwner() string {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:8], mrand.Uint64())
	binary.LittleEndian.PutUint64(b[8:], mrand.Uint64())
	return hex.EncodeToString(b[:])
}
