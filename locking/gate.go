package locking

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"
)

// A gate queues the callers of one Client that wait for the same lock, so
// that only one of them (the one in the gate) polls the backend, and a
// release in this process lets the next caller in at once. The caller in the
// gate keeps it while it holds the lock.
type gate struct {
	c    *Client
	key  gateKey
	slot chan struct{} // capacity 1: full while a caller is in the gate
	refs int           // callers using the gate; guarded by c.mu
	// expires is when the lease of the lock held through this gate runs out
	// (Unix nanoseconds, 0 when none is held): the Remaining reported to
	// local callers that do not wait.
	expires atomic.Int64
}

type gateKey struct {
	kind LockKind
	id   string
}

// enter waits for the gate of (kind, id) until it is free, deadline (if not
// zero) passes or ctx is done. With wait false it does not wait. It adds the
// time it waited to *waited.
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
	if !wait {
		g.unref()
		return nil, &NotAcquiredError{ID: id, Remaining: g.remaining()}
	}
	start := time.Now()
	defer func() { *waited += time.Since(start) }()
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
	g.expires.Store(0)
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

func (g *gate) setExpiry(t time.Time) {
	if g != nil {
		g.expires.Store(t.UnixNano())
	}
}

func (g *gate) remaining() time.Duration {
	exp := g.expires.Load()
	if exp == 0 {
		return 0
	}
	return max(0, time.Until(time.Unix(0, exp)))
}
