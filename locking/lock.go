package locking

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

var (
	// errReleased is the cause with which Release ends a lock's life.
	errReleased = errors.New("locking: released")
	// errLeaseRanOut tells a loss by failed renewals from a loss to another
	// owner.
	errLeaseRanOut = errors.New("lease ran out before a renewal succeeded")
)

// releaseTimeout bounds every call that gives a lock back on a context
// detached from the caller's: Release, a release when the context a lock
// was acquired with ends, the return of a grant that arrived after its
// caller gave up, and the return of a holding whose renewal outlived it.
const releaseTimeout = 10 * time.Second

// warnEvery is the shortest gap between two repeats of one lock's warning
// (a renewal failing again, a function still running after its context
// ended): the first is logged at once, repeats at most this often, with how
// many were left out.
const warnEvery = 10 * time.Second

type lockState int

const (
	held      lockState = iota
	releasing           // Release has started
	released            // Release finished, or the lock ended with its context
	lost
)

// A Lock is a held lock. Its lease is renewed in the background until
// Release, until it is lost, or until the context it was acquired with is
// done (With detaches the lock from its context; see With). Its methods are
// safe for concurrent use.
type Lock struct {
	c      *Client
	b      Backend
	kind   LockKind
	req    Request
	token  uint64
	g      *gate // nil for locks acquired with StealAfter
	parent *Lock // the lock With held in the context this one was taken in

	done    chan struct{}           // closed when the lock stops being held
	exited  chan struct{}           // closed when the renewer returns
	endLife context.CancelCauseFunc // stops the renewer
	onLoss  context.CancelCauseFunc // With's function context; nil outside With

	mu      sync.Mutex
	state   lockState // guarded by mu
	err     error     // why the lock is no longer held; guarded by mu
	lossy   bool      // err reports a loss (wraps ErrLockLost); guarded by mu
	overrun time.Time // when With's context ended while its function ran; guarded by mu

	renewWarn, overrunWarn rareWarn
}

// ID returns the lock id.
func (l *Lock) ID() string { return l.req.ID }

// Token returns the fencing token of this holding: strictly greater than
// every token issued before for the same id by the same backend (see the
// backend's documentation for what survives a restart). Pass it to the
// resource the lock protects and have it refuse writes with a token lower
// than the highest it has seen: a holder that lost its lock without knowing
// it (a long pause, a partition) is then fenced off.
func (l *Lock) Token() uint64 { return l.token }

// Done returns a channel that is closed once the lock is no longer held:
// released, lost, or ended with its context. Err says which.
func (l *Lock) Done() <-chan struct{} { return l.done }

// Err returns nil while the lock is held. After Done is closed it returns an
// error wrapping ErrLockLost if the lock was lost, or one wrapping
// ErrNotHeld if it was released or ended with its context (never both).
func (l *Lock) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch l.state {
	case held, releasing:
		return nil
	}
	return l.err
}

// lostErr returns the loss error if the lock was lost, else nil.
func (l *Lock) lostErr() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lossy {
		return l.err
	}
	return nil
}

// Release stops the lock's renewals and gives it back to the store. It runs
// on a context detached from ctx (ctx's values are kept, its cancellation
// and deadline are not) and bounded by 10 seconds, so that a Release
// deferred with a context that has ended by then, as after a request
// timeout, still releases the lock.
//
// It returns nil once the store has removed this holding. It returns an
// error wrapping ErrLockLost when the lock was lost — before, or found at
// this call to be taken over or expired (the backend refuses to remove a
// lock it does not hold) — and one wrapping ErrNotHeld when it was released
// before (by Release, or when its context ended). Each error wraps one of
// the two, never both. Any other error is the backend's; the lock then
// expires at the end of its lease. Done is closed, and nothing of the lock
// runs any more, when Release returns.
func (l *Lock) Release(ctx context.Context) error {
	ctx, span := l.c.tel.startRelease(ctx, l)
	var err error
	l.mu.Lock()
	if l.state != held {
		l.mu.Unlock()
		err = l.releaseEnded()
	} else {
		l.state = releasing
		l.mu.Unlock()
		err = l.release(ctx)
	}
	l.c.tel.release(ctx, span, l.kind, err)
	return err
}

// join waits for the renewer to return: at once when it is between two
// renewals, or as soon as the renewal under way returns (its context is
// cancelled with the lock's life). A backend that ignores its context is
// waited for at most releaseTimeout; its call then ends in the background.
func (l *Lock) join() {
	select {
	case <-l.exited:
		return
	default:
	}
	t := time.NewTimer(releaseTimeout)
	defer t.Stop()
	select {
	case <-l.exited:
	case <-t.C:
	}
}

// detached returns a context with ctx's values that ends after
// releaseTimeout, whatever ctx does.
func detached(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), releaseTimeout)
}

// release stops the renewals and removes the lock from the backend.
func (l *Lock) release(ctx context.Context) error {
	l.endLife(errReleased)
	l.join()
	rctx, cancel := detached(ctx)
	defer cancel()
	err := l.b.Release(rctx, l.req.ID, l.req.Owner)
	switch {
	case err == nil:
		l.end(released, fmt.Errorf("%w: %q was released", ErrNotHeld, l.req.ID), false)
		return nil
	case errors.Is(err, ErrNotHeld):
		lostErr := fmt.Errorf("%w: %q was taken over or expired before it was released", ErrLockLost, l.req.ID)
		l.end(lost, lostErr, true)
		return fmt.Errorf("locking: release %q: %w", l.req.ID, lostErr)
	default:
		l.end(released, fmt.Errorf("%w: %q: release failed: %w", ErrNotHeld, l.req.ID, err), false)
		return fmt.Errorf("locking: release %q: %w", l.req.ID, err)
	}
}

// releaseEnded is Release of a lock that is no longer held, or is being
// released on the holder's behalf.
func (l *Lock) releaseEnded() error {
	<-l.done // a release on the holder's behalf may be under way
	l.join() // and the give-back of a lost holding: nothing runs after Release
	l.mu.Lock()
	err := l.err
	l.mu.Unlock()
	return fmt.Errorf("locking: release %q: %w", l.req.ID, err)
}

// end moves the lock to a final state once, cancels With's function on a
// loss, closes Done and lets the next local waiter in.
func (l *Lock) end(state lockState, err error, lossy bool) bool {
	l.mu.Lock()
	if l.state == released || l.state == lost {
		l.mu.Unlock()
		return false
	}
	l.state, l.err, l.lossy = state, err, lossy
	onLoss := l.onLoss
	l.mu.Unlock()
	if lossy && onLoss != nil {
		onLoss(err)
	}
	// Count the end before Done closes, so that whoever waits on Done sees
	// it in the metrics; let the next local waiter in only after.
	reason := lossNotHeld
	if errors.Is(err, errLeaseRanOut) {
		reason = lossExpired
	}
	l.c.tel.ended(l.kind, lossy, reason)
	close(l.done)
	l.g.leave()
	return true
}

// newLock returns a held lock acquired at sent (when the acquiring request
// was sent) and starts renewing it until life ends or the lock is released
// or lost.
func (c *Client) newLock(life context.Context, b Backend, kind LockKind, req Request, token uint64, sent time.Time, g *gate, parent *Lock) *Lock {
	life, endLife := context.WithCancelCause(life)
	l := &Lock{
		c: c, b: b, kind: kind, req: req, token: token, g: g, parent: parent,
		done:    make(chan struct{}),
		exited:  make(chan struct{}),
		endLife: endLife,
	}
	go l.renew(life, sent) // the gate learnt of the holding from the grant (Client.ask)
	return l
}

// renew keeps the lease alive until life ends. It renews every third of the
// lease and retries a failed renewal with backoff. The lease is counted from
// the moment each request was sent, on this process's monotonic clock, which
// is never later than the moment the backend started it; and the lock is
// declared lost a tenth of a lease before that count runs out. So Done closes
// before any other owner can take the lock over, unless clocks run at rates
// more than 10% apart or the backend itself misjudges time.
//
// Renewals run in this goroutine, the lock's only one, on a context that
// ends with life and with that count: when life ends during one (Release,
// or the context the lock was acquired with), the renewal is cancelled and
// the lock released, never declared lost. A watchdog timer declares the
// loss when the count runs out even if the backend's call goes on; once it
// returns, the holding it may have extended is given back.
func (l *Lock) renew(life context.Context, acquired time.Time) {
	defer close(l.exited)
	lease := l.req.Lease
	interval := max(lease/3, time.Millisecond)
	lostAt := acquired.Add(lease - lease/10)
	next := interval
	for attempt := 0; ; {
		t := time.NewTimer(max(0, min(next, time.Until(lostAt))))
		select {
		case <-life.Done():
		case <-t.C:
		}
		t.Stop()
		if life.Err() != nil {
			l.endWithContext(life)
			return
		}
		if !time.Now().Before(lostAt) {
			l.loseTo(fmt.Errorf("%w: %q: %w", ErrLockLost, l.req.ID, errLeaseRanOut))
			// The store may still keep the holding (a renewal applied whose
			// reply was lost, a lease it rounded up): give it back.
			l.giveBack(life, false)
			return
		}
		l.warnOverrun()
		sent := time.Now()
		// The renewal runs inline, on a context that ends with the lock's
		// life (Release, or the context it was acquired with) and at
		// lostAt. A watchdog declares the loss at lostAt even if the
		// backend ignores its context and the call goes on.
		rctx, cancel := context.WithDeadline(life, lostAt)
		fired := make(chan struct{})
		watchdog := time.AfterFunc(time.Until(lostAt), func() {
			defer close(fired)
			l.loseTo(fmt.Errorf("%w: %q: %w (a renewal was still under way)", ErrLockLost, l.req.ID, errLeaseRanOut))
		})
		_, err := l.b.Renew(rctx, l.req)
		cancel()
		if !watchdog.Stop() {
			<-fired
			l.c.tel.renewal(life, l.kind, context.DeadlineExceeded)
			// The renewal may have extended the holding after the loss
			// was declared: give it back.
			l.giveBack(life, true)
			return
		}
		if life.Err() != nil {
			// Released, or the lock's context ended, during the renewal: it
			// no longer matters, and the release removes what it may
			// have extended.
			l.endWithContext(life)
			return
		}
		l.c.tel.renewal(life, l.kind, err)
		switch {
		case err == nil:
			lostAt = sent.Add(lease - lease/10)
			l.g.holding(sent.Add(lease))
			next, attempt = interval, 0
			l.renewWarn.reset()
		case errors.Is(err, ErrNotHeld):
			// The store's words, not its ErrNotHeld: a lost lock is
			// reported with ErrLockLost only.
			l.loseTo(fmt.Errorf("%w: %q: %v", ErrLockLost, l.req.ID, err))
			return
		default:
			if ok, left := l.renewWarn.allow(); ok {
				l.c.logger().Warn("locking: renewal failed; retrying", "lock_id", l.req.ID, "token", l.token, "error", err, "failures_not_logged", left)
			}
			next = l.c.backoff(attempt, lease)
			attempt++
		}
	}
}

// loseTo records that the lock was lost, unless Release got there first.
func (l *Lock) loseTo(err error) {
	l.mu.Lock()
	if l.state != held {
		l.mu.Unlock()
		return
	}
	l.mu.Unlock()
	if l.end(lost, err, true) {
		l.c.logger().Warn("locking: lock lost", "lock_id", l.req.ID, "token", l.token, "error", err)
	}
}

// giveBack removes this owner's holding from the store, if it still has
// one, after the lease ran out on this side: the store may still keep it (a
// renewal applied whose reply was lost, a lease it rounded up), or a
// renewal still pending when the loss was declared (late) may have
// extended it after all. It never removes another owner's lock.
func (l *Lock) giveBack(life context.Context, late bool) {
	ctx, cancel := detached(life)
	defer cancel()
	if err := l.b.Release(ctx, l.req.ID, l.req.Owner); err == nil && late {
		l.c.logger().Warn("locking: a renewal applied after the lock was given up; released it", "lock_id", l.req.ID, "token", l.token)
	}
}

// endWithContext handles the end of the lock's life: by Release (nothing to
// do here) or because the context it was acquired with is done, when the
// lock is released on the holder's behalf, on a detached context.
func (l *Lock) endWithContext(life context.Context) {
	if context.Cause(life) == errReleased {
		return
	}
	l.mu.Lock()
	if l.state != held {
		l.mu.Unlock()
		return
	}
	l.state = releasing
	l.mu.Unlock()
	if l.c.cloudRun {
		l.c.ctxEnds.warn(l.c.logger(), l.req.ID)
	}
	ctx, cancel := detached(life)
	defer cancel()
	err := l.b.Release(ctx, l.req.ID, l.req.Owner)
	l.c.tel.release(ctx, nil, l.kind, err)
	if err != nil && !errors.Is(err, ErrNotHeld) {
		l.c.logger().Warn("locking: release after context end failed; the lease will expire", "lock_id", l.req.ID, "token", l.token, "error", err)
	}
	l.end(released, fmt.Errorf("%w: %q was released when its context ended: %w", ErrNotHeld, l.req.ID, life.Err()), false)
}

// startOverrun records that With's context ended while its function still
// runs, and warns once; the renewer repeats the warning rarely after.
func (l *Lock) startOverrun() {
	l.mu.Lock()
	if l.state != held || !l.overrun.IsZero() {
		l.mu.Unlock()
		return
	}
	l.overrun = time.Now()
	l.mu.Unlock()
	l.overrunWarn.allow()
	l.c.logger().Warn("locking: the context of With ended while its function still runs; the lock stays held until the function returns",
		"lock_id", l.req.ID, "token", l.token)
}

// stopOverrun records that With's function returned.
func (l *Lock) stopOverrun() {
	l.mu.Lock()
	l.overrun = time.Time{}
	l.mu.Unlock()
}

// warnOverrun repeats the warning of startOverrun, rarely.
func (l *Lock) warnOverrun() {
	l.mu.Lock()
	since := l.overrun
	l.mu.Unlock()
	if since.IsZero() {
		return
	}
	if ok, left := l.overrunWarn.allow(); ok {
		l.c.logger().Warn("locking: the function of With still runs after its context ended; the lock stays held",
			"lock_id", l.req.ID, "token", l.token, "overrun", time.Since(since).Round(time.Millisecond), "warnings_not_logged", left)
	}
}

// rareWarn lets one kind of warning through at once, then at most once
// every warnEvery, counting those it holds back.
type rareWarn struct {
	mu   sync.Mutex
	last time.Time
	held int
}

// allow reports whether to log now, and how many were held back since the
// last one logged.
func (w *rareWarn) allow() (ok bool, heldBack int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	if !w.last.IsZero() && now.Sub(w.last) < warnEvery {
		w.held++
		return false, 0
	}
	w.last, heldBack, w.held = now, w.held, 0
	return true, heldBack
}

// reset forgets the last warning, so that the next one is logged at once.
func (w *rareWarn) reset() {
	w.mu.Lock()
	w.last, w.held = time.Time{}, 0
	w.mu.Unlock()
}

// maxCtxEndIDs bounds the ids ctxEndWarn remembers having warned about.
const maxCtxEndIDs = 1024

// ctxEndWarn warns that locks end with their context on Cloud Run: once per
// id (of the first maxCtxEndIDs), and at most every warnEvery.
type ctxEndWarn struct {
	rare rareWarn
	mu   sync.Mutex
	seen map[string]struct{} // guarded by mu
}

func (w *ctxEndWarn) warn(log *slog.Logger, id string) {
	w.mu.Lock()
	_, seen := w.seen[id]
	if !seen && len(w.seen) < maxCtxEndIDs {
		if w.seen == nil {
			w.seen = make(map[string]struct{})
		}
		w.seen[id] = struct{}{}
	}
	w.mu.Unlock()
	if seen {
		return
	}
	if ok, left := w.rare.allow(); ok {
		log.Warn("locking: a lock ended with the context it was acquired with, not by Release; on Cloud Run that release runs after the answer, when the instance's CPU may be throttled, and may come only when the lease runs out: Release before answering, or use With",
			"lock_id", id, "warnings_not_logged", left)
	}
}
