package locking

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// releasedError is Err of a released lock; it wraps ErrNotHeld (a type
// rather than fmt.Errorf: every Release needs one).
type releasedError struct{ id string }

func (e *releasedError) Error() string {
	return ErrNotHeld.Error() + ": " + strconv.Quote(e.id) + " was released"
}
func (e *releasedError) Unwrap() error { return ErrNotHeld }

// errLeaseRanOut tells a loss by failed renewals from a loss to another
// owner.
var errLeaseRanOut = errors.New("lease ran out before a renewal succeeded")

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
	c    *Client
	b    Backend
	kind LockKind
	req  Request
	// measured: telemetry recorded the acquisition (Config's providers
	// listened then), so it records the renewals and end too, and b is
	// the metered backend.
	measured bool
	token    uint64
	g        *gate // nil for locks acquired with StealAfter
	parent   *Lock // the lock With held in the context this one was taken in

	life     context.Context         // the lock lives no longer than it; its values go to every store call
	stopLife func() bool             // stops the watch of life's end
	done     atomic.Value            // chan struct{}: made by Done when asked for, closed when the lock stops being held; written under mu
	released releasedError           // Err once released by Release (kept here: no allocation)
	onLoss   context.CancelCauseFunc // With's function context; nil outside With

	releaseCtx opContext // the context of the release (lastCall)

	// The renewal schedule, used by one tick at a time.
	lostAt  time.Time // a tenth of a lease before the lease, as counted here, runs out
	attempt int       // renewals failed in a row

	// waited: Acquire waited for the lock, so that the release records
	// how long the holding lasted since wrote, when the store saw its last
	// write (acquire or renewal; see holdLog). wrote is guarded by mu.
	waited bool
	wrote  time.Time

	mu            sync.Mutex
	state         lockState               // guarded by mu
	err           error                   // why the lock is no longer held; guarded by mu
	lossy         bool                    // err reports a loss (wraps ErrLockLost); guarded by mu
	overrun       time.Time               // when With's context ended while its function ran; guarded by mu
	due           time.Time               // when the next renewal is due; guarded by c.renewals.mu
	timer         *time.Timer             // the lock's own renewal timer, in a testing/synctest bubble only; guarded by mu
	dueIdx        int                     // index in c.renewals, -1 when not scheduled; guarded by c.renewals.mu
	renewal       chan struct{}           // closed when the tick under way returns; nil between ticks; guarded by mu
	ctx           context.Context         // Context's, made when first asked for; guarded by mu
	cancelCtx     context.CancelCauseFunc // ends ctx; guarded by mu
	cancelRenewal func()                  // cancels the store call of the tick under way; guarded by mu

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
func (l *Lock) Done() <-chan struct{} {
	if d, ok := l.done.Load().(chan struct{}); ok {
		return d
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	d, ok := l.done.Load().(chan struct{})
	if !ok {
		d = make(chan struct{})
		l.done.Store(d)
	}
	return d
}

// Context returns a context that ends when the lock stops being held, as
// Done closes: context.Cause then returns Err, an error wrapping
// ErrLockLost if the lock was lost, or ErrNotHeld if it was released
// (by Release, at the end of With, or when the context it was acquired
// with ended); ctx.Err() is context.Canceled. It carries the values of the
// context the lock was acquired with. Hand it to work that must stop with
// the lock, as etcd's concurrency.Session.Ctx: inside With, the function's
// own context does more (it also ends with With's context).
//
// The context is made on the first call, and later calls return the same
// one; it runs no goroutine (the lock cancels it as it ends).
func (l *Lock) Context() context.Context {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ctx == nil {
		l.ctx, l.cancelCtx = context.WithCancelCause(context.WithoutCancel(l.life))
		if l.state == released || l.state == lost {
			l.cancelCtx(l.err)
		}
	}
	return l.ctx
}

// closedChan is Done of a lock that ended before anyone asked for Done.
var closedChan = make(chan struct{})

func init() { close(closedChan) }

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
	if l.stopRenewals() {
		l.stopLife()
		err = l.release(ctx)
	} else {
		err = l.releaseEnded()
	}
	l.c.tel.release(ctx, span, l.kind, err, l.measured)
	return err
}

// stopRenewals moves a held lock to releasing, stops its renewals, and
// cancels and waits for the renewal under way, if any: nothing of the lock
// runs when it returns (but a store call that ignores its context, waited
// for at most releaseTimeout). It reports false, doing nothing, when the
// lock is not held (any more) or is being released already.
func (l *Lock) stopRenewals() bool {
	l.mu.Lock()
	if l.state != held {
		l.mu.Unlock()
		return false
	}
	l.state = releasing
	l.c.renewals.remove(l)
	r, cancel := l.renewal, l.cancelRenewal
	l.mu.Unlock()
	if r != nil {
		cancel()
		waitAtMost(r, releaseTimeout)
	}
	return true
}

// waitRenewal waits for the tick under way, if any, at most releaseTimeout.
func (l *Lock) waitRenewal() {
	l.mu.Lock()
	r := l.renewal
	l.mu.Unlock()
	if r != nil {
		waitAtMost(r, releaseTimeout)
	}
}

// waitAtMost waits until ch is closed or d has passed.
func waitAtMost(ch <-chan struct{}, d time.Duration) {
	select {
	case <-ch:
		return
	default:
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	}
}

// detached returns a context with ctx's values that ends releaseTimeout
// after the store first looks at it, whatever ctx does, and its cancel
// function.
func detached(ctx context.Context) (context.Context, func()) {
	c := &opContext{parent: ctx, bound: releaseTimeout}
	return c, c.cancel
}

// lastCall returns the context of the release of the lock, as detached
// does: a field of the lock, since a lock is released once (by Release or
// when its life ends, after stopRenewals).
func (l *Lock) lastCall(ctx context.Context) *opContext {
	l.releaseCtx = opContext{parent: ctx, bound: releaseTimeout}
	return &l.releaseCtx
}

// opContext is the context of a store call made on a lock's behalf once the
// caller's context no longer counts (a release, a renewal, a give-back): it
// has parent's values but not its cancellation, and ends at its deadline or
// when cancel is called. Its deadline is deadline, or, when that is zero,
// bound after the first look at it (Deadline, Done or Err), so that a call
// that honours its context is bounded from its start. It behaves as
// context.WithDeadline(context.WithoutCancel(parent), deadline), which it
// makes only when the store asks for Done, for Err after the deadline or
// cancel, or for a child context: a store that never does (the in-memory
// one) costs no allocation, timer or clock reading for it.
type opContext struct {
	parent context.Context
	bound  time.Duration

	mu       sync.Mutex
	deadline time.Time          // guarded by mu
	made     context.Context    // nil until asked for; guarded by mu
	stop     context.CancelFunc // made's; guarded by mu
	canceled bool               // cancel was called; guarded by mu
}

// fix returns the deadline, fixing it first if needed. Called with mu held.
func (c *opContext) fix() time.Time {
	if c.deadline.IsZero() {
		c.deadline = time.Now().Add(c.bound)
	}
	return c.deadline
}

// Deadline implements context.Context.
func (c *opContext) Deadline() (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.fix(), true
}

// Done implements context.Context.
func (c *opContext) Done() <-chan struct{} { return c.ctx().Done() }

// Err implements context.Context.
func (c *opContext) Err() error {
	c.mu.Lock()
	live := c.made == nil && !c.canceled && time.Now().Before(c.fix())
	c.mu.Unlock()
	if live {
		return nil
	}
	return c.ctx().Err()
}

// Value implements context.Context: parent's values. (Asked for the key of
// a cancelable context, as context.Cause and child contexts do, it answers
// for the context it made, never for parent's.)
func (c *opContext) Value(key any) any {
	c.mu.Lock()
	made := c.made
	c.mu.Unlock()
	if made != nil {
		return made.Value(key)
	}
	return context.WithoutCancel(c.parent).Value(key)
}

func (c *opContext) String() string { return "locking.opContext" }

// ctx makes the context c stands for, once.
func (c *opContext) ctx() context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.made == nil {
		c.made, c.stop = context.WithDeadline(context.WithoutCancel(c.parent), c.fix())
		if c.canceled {
			c.stop()
		}
	}
	return c.made
}

// cancel ends c (and frees its timer, if it made one).
func (c *opContext) cancel() {
	c.mu.Lock()
	c.canceled = true
	stop := c.stop
	c.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// release removes the lock from the backend, its renewals stopped.
func (l *Lock) release(ctx context.Context) error {
	rctx := l.lastCall(ctx)
	defer rctx.cancel()
	var sent time.Time
	if l.waited {
		sent = time.Now()
	}
	err := l.b.Release(rctx, l.req.ID, l.req.Owner)
	switch {
	case err == nil:
		if l.waited {
			l.mu.Lock()
			wrote := l.wrote
			l.mu.Unlock()
			l.c.holds.record(gateKey{l.kind, l.req.ID}, sent.Add(time.Since(sent)/2).Sub(wrote))
		}
		l.released = releasedError{l.req.ID}
		l.end(released, &l.released, false)
		l.c.released(rctx, l.kind, l.req.ID)
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
	<-l.Done()      // a release on the holder's behalf may be under way
	l.waitRenewal() // and the give-back of a lost holding: nothing runs after Release
	l.mu.Lock()
	err := l.err
	l.mu.Unlock()
	return fmt.Errorf("locking: release %q: %w", l.req.ID, err)
}

// end moves the lock to a final state once, cancels With's function on a
// loss, closes Done, ends Context and lets the next local waiter in.
func (l *Lock) end(state lockState, err error, lossy bool) bool {
	l.mu.Lock()
	if l.state == released || l.state == lost {
		l.mu.Unlock()
		return false
	}
	l.state, l.err, l.lossy = state, err, lossy
	onLoss := l.onLoss
	l.c.renewals.remove(l)
	l.mu.Unlock()
	l.stopLife()
	if lossy && onLoss != nil {
		onLoss(err)
	}
	// Count the end before Done closes, so that whoever waits on Done sees
	// it in the metrics; let the next local waiter in only after.
	reason := lossNotHeld
	if lossy && errors.Is(err, errLeaseRanOut) {
		reason = lossExpired
	}
	if l.measured {
		l.c.tel.ended(l.kind, lossy, reason)
	}
	l.mu.Lock()
	if d, ok := l.done.Load().(chan struct{}); ok {
		close(d)
	} else {
		l.done.Store(closedChan)
	}
	if l.cancelCtx != nil {
		l.cancelCtx(err)
	}
	l.mu.Unlock()
	l.g.leave()
	return true
}

// newLock returns a held lock acquired at sent (when the acquiring request
// was sent), whose lease it renews until life ends or the lock is released
// or lost. A held lock runs no goroutine of its own: the client's renewal
// schedule starts each renewal (tick) in a goroutine of its own when it is
// due, and the end of life is watched with context.AfterFunc.
func (c *Client) newLock(life context.Context, b Backend, o options, req Request, token uint64, sent, wrote time.Time, g *gate, parent *Lock) *Lock {
	l := &Lock{
		c: c, b: b, kind: o.kind, req: req, token: token, g: g, parent: parent, measured: o.measured,
		life:   life,
		lostAt: sent.Add(req.Lease - req.Lease/10),
		dueIdx: -1,
		waited: !wrote.IsZero(),
		wrote:  wrote,
	}
	// The gate learnt of the holding from the grant (Client.ask).
	l.mu.Lock()
	if life.Done() == nil { // With's lock, or a context that never ends
		l.stopLife = never
	} else {
		l.stopLife = context.AfterFunc(life, l.lifeEnded)
	}
	c.renewals.add(l, sent.Add(l.interval()))
	l.mu.Unlock()
	return l
}

// renewals is a client's schedule of the renewals of its held locks: a heap
// by due time, and one timer that fires at the earliest. Scheduling and
// unscheduling a renewal takes a mutex and no allocation, where a timer per
// lock would take two allocations and a timer of the runtime's each.
//
// The timer is not stopped when the schedule empties: it fires once more,
// finds nothing due, and is set again by the next lock scheduled. So a
// client that takes a lock after another costs no timer operation, unless
// the new renewal is due before the timer fires.
type renewals struct {
	mu    sync.Mutex
	locks []*Lock     // a heap by due; guarded by mu
	timer *time.Timer // fires at armed; made at the first add; guarded by mu
	armed time.Time   // when timer fires; zero when it is not set; guarded by mu
}

// add schedules l's next renewal at due, which was read from time.Now.
// l must not be scheduled, and its mu must be held.
//
// In a testing/synctest bubble (whose fake clock gives time.Now no
// monotonic reading) the lock gets a timer of its own instead: a timer
// made in a bubble must not be used outside it, nor one made outside it
// in it, and a client may serve one bubble after another.
func (r *renewals) add(l *Lock, due time.Time) {
	if due == due.Round(0) {
		if l.timer == nil {
			l.timer = time.AfterFunc(time.Until(due), l.tick)
		} else {
			l.timer.Reset(time.Until(due))
		}
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	l.due = due
	l.dueIdx = len(r.locks)
	r.locks = append(r.locks, l)
	r.up(l.dueIdx)
	if !r.armed.IsZero() && !due.Before(r.armed) {
		return // the timer fires first, and sets itself again
	}
	r.armed = due
	if r.timer == nil {
		r.timer = time.AfterFunc(time.Until(due), r.fire)
	} else {
		r.timer.Reset(time.Until(due))
	}
}

// remove unschedules l's renewal, if it is scheduled. l's mu must be held.
func (r *renewals) remove(l *Lock) {
	if l.timer != nil {
		l.timer.Stop()
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	i := l.dueIdx
	if i < 0 {
		return
	}
	last := len(r.locks) - 1
	r.swap(i, last)
	r.locks[last] = nil
	r.locks = r.locks[:last]
	l.dueIdx = -1
	if i < last {
		r.down(i)
		r.up(i)
	}
}

// fire starts the renewals that are due, each in a goroutine of its own,
// and sets the timer for the next.
func (r *renewals) fire() {
	r.mu.Lock()
	now := time.Now()
	var due []*Lock
	for len(r.locks) > 0 && !r.locks[0].due.After(now) {
		l := r.locks[0]
		last := len(r.locks) - 1
		r.swap(0, last)
		r.locks[last] = nil
		r.locks = r.locks[:last]
		l.dueIdx = -1
		r.down(0)
		due = append(due, l)
	}
	r.armed = time.Time{}
	if len(r.locks) > 0 {
		r.armed = r.locks[0].due
		r.timer.Reset(r.armed.Sub(now))
	}
	r.mu.Unlock()
	for _, l := range due {
		go l.tick()
	}
}

func (r *renewals) swap(i, j int) {
	r.locks[i], r.locks[j] = r.locks[j], r.locks[i]
	r.locks[i].dueIdx, r.locks[j].dueIdx = i, j
}

func (r *renewals) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !r.locks[i].due.Before(r.locks[p].due) {
			return
		}
		r.swap(i, p)
		i = p
	}
}

func (r *renewals) down(i int) {
	n := len(r.locks)
	for {
		c := 2*i + 1
		if c >= n {
			return
		}
		if c+1 < n && r.locks[c+1].due.Before(r.locks[c].due) {
			c++
		}
		if !r.locks[c].due.Before(r.locks[i].due) {
			return
		}
		r.swap(i, c)
		i = c
	}
}

// never is stopLife for a life that cannot end.
func never() bool { return false }

// interval is the time between two renewals: a third of the lease.
func (l *Lock) interval() time.Duration { return max(l.req.Lease/3, time.Millisecond) }

// tick makes one renewal and schedules the next. It keeps the lease alive:
// every third of the lease, with backoff after a failure. The lease is
// counted from the moment each request was sent, on this process's
// monotonic clock, which is never later than the moment the backend started
// it; and the lock is declared lost a tenth of a lease before that count
// runs out. So Done closes before any other owner can take the lock over,
// unless clocks run at rates more than 10% apart or the backend itself
// misjudges time.
//
// The renewal's store call runs on a context that ends at that count and
// that Release (or the end of life) cancels, and waits for: the lock is then
// released, never declared lost. A watchdog timer declares the loss when the
// count runs out even if the call goes on; once it returns, the holding it
// may have extended is given back.
func (l *Lock) tick() {
	l.mu.Lock()
	if l.state != held {
		l.mu.Unlock()
		return
	}
	done := make(chan struct{})
	defer close(done)
	rctx := &opContext{parent: l.life, deadline: l.lostAt}
	defer rctx.cancel()
	l.renewal, l.cancelRenewal = done, rctx.cancel
	l.mu.Unlock()

	next, again := l.renew(rctx)

	l.mu.Lock()
	l.renewal, l.cancelRenewal = nil, nil
	if again && l.state == held {
		l.c.renewals.add(l, time.Now().Add(next))
	}
	l.mu.Unlock()
}

// renew makes one renewal on rctx and returns the pause before the next, or
// false when the lock ended (lost, or released meanwhile).
func (l *Lock) renew(rctx context.Context) (next time.Duration, again bool) {
	lease := l.req.Lease
	lostAt := l.lostAt
	if !time.Now().Before(lostAt) {
		l.loseTo(fmt.Errorf("%w: %q: %w", ErrLockLost, l.req.ID, errLeaseRanOut))
		// The store may still keep the holding (a renewal applied whose
		// reply was lost, a lease it rounded up): give it back.
		l.giveBack(false)
		return 0, false
	}
	l.warnOverrun()
	sent := time.Now()
	fired := make(chan struct{})
	watchdog := time.AfterFunc(time.Until(lostAt), func() {
		defer close(fired)
		l.loseTo(fmt.Errorf("%w: %q: %w (a renewal was still under way)", ErrLockLost, l.req.ID, errLeaseRanOut))
	})
	_, err := l.b.Renew(rctx, l.req)
	if !watchdog.Stop() {
		<-fired
		if l.measured {
			l.c.tel.renewal(l.life, l.kind, context.DeadlineExceeded)
		}
		// The renewal may have extended the holding after the loss was
		// declared: give it back.
		l.giveBack(true)
		return 0, false
	}
	l.mu.Lock()
	ended := l.state != held
	if !ended && err == nil {
		// Under mu while held: the gate is still this lock's (end leaves
		// it after the state changes).
		l.g.holding(sent.Add(lease))
		l.wrote = sent.Add(time.Since(sent) / 2)
	}
	l.mu.Unlock()
	if ended {
		// Released, or the lock's life ended, during the renewal: it no
		// longer matters, and the release removes what it may have
		// extended.
		return 0, false
	}
	if l.measured {
		l.c.tel.renewal(l.life, l.kind, err)
	}
	switch {
	case err == nil:
		l.lostAt = sent.Add(lease - lease/10)
		l.attempt = 0
		l.renewWarn.reset()
		return min(l.interval(), time.Until(l.lostAt)), true
	case errors.Is(err, ErrNotHeld):
		// The store's words, not its ErrNotHeld: a lost lock is reported
		// with ErrLockLost only.
		l.loseTo(fmt.Errorf("%w: %q: %v", ErrLockLost, l.req.ID, err))
		return 0, false
	default:
		if ok, left := l.renewWarn.allow(); ok {
			l.c.logger().Warn("locking: renewal failed; retrying", "lock_id", l.req.ID, "token", l.token, "error", err, "failures_not_logged", left)
		}
		next = l.c.backoff(l.attempt, lease)
		l.attempt++
		return max(0, min(next, time.Until(lostAt))), true
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
func (l *Lock) giveBack(late bool) {
	ctx, cancel := detached(l.life)
	defer cancel()
	if err := l.b.Release(ctx, l.req.ID, l.req.Owner); err == nil && late {
		l.c.logger().Warn("locking: a renewal applied after the lock was given up; released it", "lock_id", l.req.ID, "token", l.token)
	}
}

// lifeEnded releases the lock on the holder's behalf, on a detached
// context, when the context it was acquired with is done (context.AfterFunc
// runs it). It does nothing once Release has started or the lock ended.
func (l *Lock) lifeEnded() {
	if !l.stopRenewals() {
		return
	}
	if l.c.cloudRun {
		l.c.ctxEnds.warn(l.c.logger(), l.req.ID)
	}
	ctx := l.lastCall(l.life)
	defer ctx.cancel()
	err := l.b.Release(ctx, l.req.ID, l.req.Owner)
	l.c.tel.release(ctx, nil, l.kind, err, l.measured)
	if err != nil && !errors.Is(err, ErrNotHeld) {
		l.c.logger().Warn("locking: release after context end failed; the lease will expire", "lock_id", l.req.ID, "token", l.token, "error", err)
	}
	l.end(released, fmt.Errorf("%w: %q was released when its context ended: %w", ErrNotHeld, l.req.ID, l.life.Err()), false)
	if err == nil {
		l.c.released(ctx, l.kind, l.req.ID)
	}
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

// cancelOnLoss makes a loss of the lock cancel fn's context with the loss
// error as its cause, at once if the lock is lost already.
func (l *Lock) cancelOnLoss(cancel context.CancelCauseFunc) {
	l.mu.Lock()
	if l.lossy {
		err := l.err
		l.mu.Unlock()
		cancel(err)
		return
	}
	l.onLoss = cancel
	l.mu.Unlock()
}
