package locking

import (
	"context"
	"errors"
	"fmt"
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

type lockState int

const (
	held      lockState = iota
	releasing           // Release has started
	released            // Release finished, or the lock ended with its context
	lost
)

// A Lock is a held lock. Its lease is renewed in the background until
// Release, until it is lost, or until the context it was acquired with is
// done. Its methods are safe for concurrent use.
type Lock struct {
	c     *Client
	b     Backend
	kind  LockKind
	req   Request
	token uint64
	g     *gate // nil for locks acquired with StealAfter

	done     chan struct{}           // closed when the lock stops being held
	exited   chan struct{}           // closed when the renewer returns
	endLife  context.CancelCauseFunc // stops the renewer
	gateOnce sync.Once

	mu    sync.Mutex
	state lockState // guarded by mu
	err   error     // why the lock is no longer held; guarded by mu
	lossy bool      // err reports a loss (wraps ErrLockLost); guarded by mu
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
// error wrapping ErrLockLost if the lock was lost, or ErrNotHeld if it was
// released or ended with its context.
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

// Release releases the lock, first stopping its renewals and waiting for
// them to stop. It returns an error wrapping ErrNotHeld when the lock is no
// longer held: released before, lost (then it wraps ErrLockLost too), or taken
// over by another owner without this holder having noticed yet (the backend
// refuses to remove a lock it does not hold, and the error wraps ErrLockLost
// as well). Any other error is the backend's; the lock then expires at the end
// of its lease. Done is closed when Release returns.
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

// release stops the renewals and removes the lock from the backend.
func (l *Lock) release(ctx context.Context) error {
	l.endLife(errReleased)
	<-l.exited
	err := l.b.Release(ctx, l.req.ID, l.req.Owner)
	switch {
	case err == nil:
		l.end(released, fmt.Errorf("%w: %q was released", ErrNotHeld, l.req.ID), false)
		return nil
	case errors.Is(err, ErrNotHeld):
		lostErr := fmt.Errorf("%w: %q was taken over or expired before it was released", ErrLockLost, l.req.ID)
		l.end(lost, fmt.Errorf("%w (%w)", ErrNotHeld, lostErr), true)
		return fmt.Errorf("locking: release %q: %w (%w)", l.req.ID, ErrNotHeld, lostErr)
	default:
		l.end(released, fmt.Errorf("%w: %q: release failed: %w", ErrNotHeld, l.req.ID, err), false)
		return fmt.Errorf("locking: release %q: %w", l.req.ID, err)
	}
}

// releaseEnded is Release of a lock that is no longer held, or is being
// released on the holder's behalf.
func (l *Lock) releaseEnded() error {
	<-l.done // a release on the holder's behalf may be under way
	l.mu.Lock()
	err, lossy := l.err, l.lossy
	l.mu.Unlock()
	if lossy && !errors.Is(err, ErrNotHeld) {
		return fmt.Errorf("locking: release %q: %w (%w)", l.req.ID, ErrNotHeld, err)
	}
	return fmt.Errorf("locking: release %q: %w", l.req.ID, err)
}

// end moves the lock to a final state once, closes Done and lets the next
// local waiter in.
func (l *Lock) end(state lockState, err error, lossy bool) bool {
	l.mu.Lock()
	if l.state == released || l.state == lost {
		l.mu.Unlock()
		return false
	}
	l.state, l.err, l.lossy = state, err, lossy
	l.mu.Unlock()
	// Count the end before Done closes, so that whoever waits on Done sees
	// it in the metrics; let the next local waiter in only after.
	reason := lossNotHeld
	if errors.Is(err, errLeaseRanOut) {
		reason = lossExpired
	}
	l.c.tel.ended(l.kind, lossy, reason)
	close(l.done)
	l.gateOnce.Do(l.g.leave)
	return true
}

// newLock returns a held lock acquired at sent (when the acquiring request
// was sent) and starts renewing it.
func (c *Client) newLock(ctx context.Context, b Backend, kind LockKind, req Request, token uint64, sent time.Time, g *gate) *Lock {
	life, endLife := context.WithCancelCause(ctx)
	l := &Lock{
		c: c, b: b, kind: kind, req: req, token: token, g: g,
		done:    make(chan struct{}),
		exited:  make(chan struct{}),
		endLife: endLife,
	}
	g.setExpiry(sent.Add(req.Lease))
	go l.renew(life, sent)
	return l
}

// renew keeps the lease alive until life ends. It renews every third of the
// lease and retries a failed renewal with backoff. The lease is counted from
// the moment each request was sent, on this process's monotonic clock, which
// is never later than the moment the backend started it; and the lock is
// declared lost a tenth of a lease before that count runs out. So Done closes
// before any other owner can take the lock over, unless clocks run at rates
// more than 10% apart or the backend itself misjudges time.
func (l *Lock) renew(life context.Context, acquired time.Time) {
	defer close(l.exited)
	lease := l.req.Lease
	interval := max(lease/3, time.Millisecond)
	lostAt := acquired.Add(lease - lease/10)
	next := interval
	for attempt := 0; ; {
		wait := min(next, time.Until(lostAt))
		if wait <= 0 {
			l.loseTo(fmt.Errorf("%w: %q: %w", ErrLockLost, l.req.ID, errLeaseRanOut))
			return
		}
		t := time.NewTimer(wait)
		select {
		case <-life.Done():
			t.Stop()
			l.endWithContext(life)
			return
		case <-t.C:
		}
		if !time.Now().Before(lostAt) {
			continue // reported at the top
		}
		rctx, cancel := context.WithDeadline(life, lostAt)
		sent := time.Now()
		pending, err := l.renewBy(rctx, lostAt)
		cancel()
		if pending != nil {
			if life.Err() == nil {
				l.c.tel.renewal(life, l.kind, context.DeadlineExceeded)
			}
			l.loseTo(fmt.Errorf("%w: %q: %w (a renewal was still under way)", ErrLockLost, l.req.ID, errLeaseRanOut))
			<-pending // the call outlives the lock by no more than the backend's own timeouts
			return
		}
		if life.Err() == nil {
			l.c.tel.renewal(life, l.kind, err)
		}
		switch {
		case err == nil:
			lostAt = sent.Add(lease - lease/10)
			l.g.setExpiry(sent.Add(lease))
			next, attempt = interval, 0
		case life.Err() != nil:
			// Released or ended while renewing: handled at the top.
			next = 0
		case errors.Is(err, ErrNotHeld):
			l.loseTo(fmt.Errorf("%w: %q: %w", ErrLockLost, l.req.ID, err))
			return
		default:
			l.c.log.Warn("locking: renewal failed; retrying", "lock_id", l.req.ID, "token", l.token, "error", err)
			next = l.c.backoff(attempt)
			attempt++
		}
	}
}

// renewBy runs one Renew and returns its error, or, when lostAt passes
// first, a channel on which the call's error will come. A backend should
// return when ctx ends, but not every client library can (gomemcache takes
// no context; go-redis ignores deadlines unless told otherwise), and the
// loss must be declared on time whatever the backend does.
func (l *Lock) renewBy(ctx context.Context, lostAt time.Time) (pending <-chan error, err error) {
	res := make(chan error, 1)
	go func() {
		_, err := l.b.Renew(ctx, l.req)
		res <- err
	}()
	t := time.NewTimer(time.Until(lostAt))
	defer t.Stop()
	select {
	case err := <-res:
		return nil, err
	case <-t.C:
		select {
		case err := <-res: // returned just in time
			return nil, err
		default:
			return res, nil
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
		l.c.log.Warn("locking: lock lost", "lock_id", l.req.ID, "token", l.token, "error", err)
	}
}

// endWithContext handles the end of the lock's life: by Release (nothing to
// do here) or because the context it was acquired with is done, when the lock
// is released on the holder's behalf.
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
	ctx, cancel := context.WithTimeout(context.WithoutCancel(life), releaseTimeout)
	defer cancel()
	err := l.b.Release(ctx, l.req.ID, l.req.Owner)
	l.c.tel.release(ctx, nil, l.kind, err)
	if err != nil && !errors.Is(err, ErrNotHeld) {
		l.c.log.Warn("locking: release after context end failed; the lease will expire", "lock_id", l.req.ID, "token", l.token, "error", err)
	}
	l.end(released, fmt.Errorf("%w: %q was released when its context ended: %w", ErrNotHeld, l.req.ID, life.Err()), false)
}
