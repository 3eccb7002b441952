package locking

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// A gate queues the callers of one Client that wait for the same lock, so
// that only one of them (the one in the gate) polls the backend, and a
// release in this process lets the next caller in at once. The caller in the
// gate keeps it while it holds the lock.
//
// The gate also remembers what this process last learnt of the lock's
// holder, so that a caller that does not wait is told how long the holder's
// lease still runs even when another local caller asked the backend.
//
// Local hand-offs are bounded, as sync.Mutex bounds them in its starvation
// mode: a release here lets the next local caller in at once, while a caller
// of another process (another instance) only learns of the release at its
// next poll, so a run of local callers could keep the lock from it for
// ever. After fairHandoffs grants in a row through the gate that together
// lasted fairRuns MinBackoffs or more, the next local caller leaves the lock
// free in the store for one window (see yield) before it asks: long enough
// for a remote waiter's next poll to land in it, since a remote waiter that
// began waiting during the run polls at most every tenth of its wait (the
// same Config on every instance). A remote waiter therefore gets the lock
// at the end of the run of local holds it arrived during, at the latest.
type gate struct {
	c    *Client
	key  gateKey
	refs int           // callers using the gate; guarded by c.mu
	in   bool          // a caller is in the gate, or slot says who is; guarded by c.mu
	slot chan struct{} // made by the first caller to queue, then full while a caller is in the gate; guarded by c.mu

	mu      sync.Mutex
	expires time.Time     // when the known holder's lease runs out; zero when unknown or free
	held    bool          // expires is the lease of a lock held through this gate
	asking  bool          // a backend call is in flight
	answer  chan struct{} // made by a caller that waits for that call's answer; closed with it
	failed  error         // the error of the last backend call, if it failed
	streak  int           // grants in a row through the gate since the last window or other holder
	since   time.Time     // when the run of streak grants began
}

// fairHandoffs and fairRuns bound a run of local hand-offs (see gate): after
// fairHandoffs grants in a row that together lasted fairRuns·MinBackoff or
// more (200 ms by default), the next local caller yields a window. The
// window costs the local callers at most about a fifth of the run's time,
// and only while they queue without a pause.
const (
	fairHandoffs = 4
	fairRuns     = 10
)

type gateKey struct {
	kind LockKind
	id   string
}

// enter waits for the gate of (kind, id) until it is free, deadline (if not
// zero) passes or ctx is done. With wait false it does not wait for the
// gate, only for the answer of a backend call another caller has in flight
// (so that it can report the holder's remaining lease). It adds the time it
// waited to *waited.
func (c *Client) enter(ctx context.Context, kind LockKind, id string, wait bool, deadline time.Time, waited *time.Duration) (*gate, error) {
	key := gateKey{kind, id}
	c.mu.Lock()
	g := c.gates[key]
	if g == nil {
		g = gates.Get().(*gate)
		g.c, g.key = c, key
		c.gates[key] = g
	}
	g.refs++
	if !g.in {
		g.in = true
		c.mu.Unlock()
		return g, nil
	}
	if g.slot != nil {
		select {
		case g.slot <- struct{}{}: // free: the caller in it left
			c.mu.Unlock()
			return g, nil
		default:
		}
	}
	var slot chan struct{}
	if wait {
		if g.slot == nil {
			// The first caller to queue makes the slot, full with the
			// turn of the caller in the gate, who empties it on leaving.
			g.slot = make(chan struct{}, 1)
			g.slot <- struct{}{}
		}
		slot = g.slot
	}
	c.mu.Unlock()

	start := time.Now()
	defer func() { *waited += time.Since(start) }()
	if !wait {
		g.mu.Lock()
		var asking chan struct{}
		if g.asking {
			if g.answer == nil {
				g.answer = make(chan struct{})
			}
			asking = g.answer
		}
		g.mu.Unlock()
		if asking != nil {
			select {
			case <-asking:
			case <-ctx.Done():
			}
		}
		g.mu.Lock()
		failed := g.failed
		g.mu.Unlock()
		rem := g.remaining()
		g.unref()
		if failed != nil {
			// The caller ahead could not reach the store: nobody is known
			// to hold the lock, and this caller would fail the same way.
			return nil, fmt.Errorf("locking: acquire %q: %w", id, failed)
		}
		return nil, &NotAcquiredError{ID: id, Remaining: rem}
	}
	var timeout <-chan time.Time
	if !deadline.IsZero() {
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		timeout = t.C
	}
	select {
	case slot <- struct{}{}:
		return g, nil
	case <-timeout:
		rem := g.remaining()
		g.unref()
		return nil, &NotAcquiredError{ID: id, Remaining: rem, TimedOut: true}
	case <-ctx.Done():
		g.unref()
		return nil, fmt.Errorf("locking: acquire %q: %w", id, ctx.Err())
	}
}

// leave frees the gate for the next caller. It is a no-op on a nil gate.
func (g *gate) leave() {
	if g == nil {
		return
	}
	g.mu.Lock()
	if g.held { // released or lost: this process no longer knows a holder
		g.expires, g.held = time.Time{}, false
	}
	g.mu.Unlock()
	c := g.c
	c.mu.Lock()
	slot := g.slot
	if slot == nil { // nobody queued: no turn to pass on
		g.in = false
		g.unrefLocked()
		return
	}
	c.mu.Unlock()
	<-slot
	g.unref()
}

// unref drops a caller's use of the gate; the last one removes it from
// the client, and puts it back in the pool. Nobody uses a gate after its
// last unref (a Lock's renewal updates it only while the lock is held).
func (g *gate) unref() {
	g.c.mu.Lock()
	g.unrefLocked()
}

// unrefLocked is unref called with the client's mu held, which it unlocks.
func (g *gate) unrefLocked() {
	c := g.c
	g.refs--
	last := g.refs == 0
	if last {
		delete(c.gates, g.key)
	}
	c.mu.Unlock()
	if last {
		// Nobody is in the gate or awaits an answer.
		*g = gate{}
		gates.Put(g)
	}
}

// gates holds unused gates for reuse: an uncontended Acquire then
// allocates none. (A gate goes back without its channels: channels made in
// a testing/synctest bubble must not be used outside it.)
var gates = sync.Pool{New: func() any { return new(gate) }}

// holding records that the lock is held through the gate until t.
func (g *gate) holding(t time.Time) {
	if g == nil {
		return
	}
	g.mu.Lock()
	g.expires, g.held = t, true
	g.mu.Unlock()
}

// yield returns how long the caller that just entered the gate leaves the
// lock free in the store before asking for it: zero unless the run of local
// grants is long enough (see gate), and then a window that a remote waiter's
// next poll lands in: on a backend that announces releases (notified), one
// MinBackoff, since remote waiters are woken at once; otherwise the longest
// gap a remote waiter that began during the run leaves between two polls,
// plus one MinBackoff for the round trips. It ends the run.
func (g *gate) yield(c *Client, notified bool) time.Duration {
	if g == nil {
		return 0
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.streak < fairHandoffs {
		return 0
	}
	run := time.Since(g.since)
	if run < fairRuns*c.minBackoff {
		return 0
	}
	g.streak = 0
	if notified {
		return c.minBackoff
	}
	return c.maxPollGap(run) + c.minBackoff
}

// ask marks a backend call in flight; answered ends it with what the call,
// sent at sent for a lease, returned: a grant is recorded as held through
// the gate until sent+lease, and as one more hand-off in the current run; a
// busy grant's Remaining as the holder's lease; an error as the reason a
// caller that does not wait cannot be told more.
func (g *gate) ask() {
	if g == nil {
		return
	}
	g.mu.Lock()
	g.asking = true
	g.mu.Unlock()
}

func (g *gate) answered(grant Grant, err error, sent time.Time, lease time.Duration) {
	if g == nil {
		return
	}
	g.mu.Lock()
	g.failed = err
	if err == nil && grant.Acquired {
		g.expires, g.held = sent.Add(lease), true
		if g.streak == 0 {
			g.since = sent
		}
		g.streak++
	}
	if err == nil && !grant.Acquired {
		g.streak = 0 // another owner holds it: the run of local grants ended
		if grant.Remaining > 0 {
			g.expires, g.held = time.Now().Add(grant.Remaining), false
		}
	}
	g.asking = false
	if g.answer != nil {
		close(g.answer)
		g.answer = nil
	}
	g.mu.Unlock()
}

func (g *gate) remaining() time.Duration {
	g.mu.Lock()
	exp := g.expires
	g.mu.Unlock()
	if exp.IsZero() {
		return 0
	}
	return max(0, time.Until(exp))
}
