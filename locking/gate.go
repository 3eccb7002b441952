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
type gate struct {
	c    *Client
	key  gateKey
	slot chan struct{} // capacity 1: full while a caller is in the gate
	refs int           // callers using the gate; guarded by c.mu

	mu      sync.Mutex
	expires time.Time     // when the known holder's lease runs out; zero when unknown or free
	held    bool          // expires is the lease of a lock held through this gate
	asking  chan struct{} // closed when the backend call in flight returns; nil when none
	failed  error         // the error of the last backend call, if it failed
}

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
		g = &gate{c: c, key: key, slot: make(chan struct{}, 1)}
		c.gates[key] = g
	}
	g.refs++
	c.mu.Unlock()

	select {
	case g.slot <- struct{}{}:
		return g, nil
	default:
	}
	start := time.Now()
	defer func() { *waited += time.Since(start) }()
	if !wait {
		g.mu.Lock()
		asking := g.asking
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
	case g.slot <- struct{}{}:
		return g, nil
	case <-timeout:
		g.unref()
		return nil, &NotAcquiredError{ID: id, Remaining: g.remaining(), TimedOut: true}
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
	<-g.slot
	g.unref()
}

func (g *gate) unref() {
	g.c.mu.Lock()
	defer g.c.mu.Unlock()
	if g.refs--; g.refs == 0 {
		delete(g.c.gates, g.key)
	}
}

// holding records that the lock is held through the gate until t.
func (g *gate) holding(t time.Time) {
	if g == nil {
		return
	}
	g.mu.Lock()
	g.expires, g.held = t, true
	g.mu.Unlock()
}

// ask marks a backend call in flight; answered ends it with what the call
// returned: a busy grant's Remaining is recorded as the holder's lease, an
// error as the reason a caller that does not wait cannot be told more.
func (g *gate) ask() {
	if g == nil {
		return
	}
	g.mu.Lock()
	g.asking = make(chan struct{})
	g.mu.Unlock()
}

func (g *gate) answered(grant Grant, err error) {
	if g == nil {
		return
	}
	g.mu.Lock()
	g.failed = err
	if err == nil && !grant.Acquired && grant.Remaining > 0 {
		g.expires, g.held = time.Now().Add(grant.Remaining), false
	}
	if g.asking != nil {
		close(g.asking)
		g.asking = nil
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
