// Package memlock is the in-memory lock backend: correct within one process,
// fast, and needing no configuration. It is what locking.Default uses when
// the environment names no other store, and the double to use in tests of
// code that takes locks: pass memlock.New() to locking.New.
//
// Callers of one locking.Client queue in-process: a second Acquire of an id
// through the client that holds it waits for that holder's Release (or
// MaxWait), even when the holder's lease has run out on a clock moved with
// WithClock; it never takes over. To play two instances in a test (a
// takeover, a steal), make two clients with locking.New over the same
// Backend.
//
// Locks live in this process's memory only, so they exclude nothing across
// processes or instances. Fencing tokens come from one counter per Backend,
// so they increase per id for the Backend's life and start again with a new
// Backend (or process). Expiry and StealAfter are judged on the Backend's
// clock, time.Now unless WithClock replaces it.
package memlock

import (
	"context"
	"fmt"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/internal/memstore"
)

// Backend is an in-memory locking.Backend. It is safe for concurrent use.
type Backend struct {
	s *memstore.Store
}

// An Option configures New.
type Option func(*config)

type config struct {
	now func() time.Time
}

// WithClock makes the backend read time from now, for tests that move time
// by hand or skew it. now must be safe for concurrent use.
func WithClock(now func() time.Time) Option {
	return func(c *config) {
		if now != nil {
			c.now = now
		}
	}
}

// New returns an empty backend.
func New(opts ...Option) *Backend {
	cfg := config{now: time.Now}
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	return &Backend{s: memstore.New(cfg.now)}
}

// Acquire implements locking.Backend. It never fails.
// InProcess reports true: the store lives in this process's memory, so its
// locks exclude nothing across instances (see locking.Client.InProcess).
func (b *Backend) InProcess() bool { return true }

func (b *Backend) Acquire(_ context.Context, r locking.Request) (locking.Grant, error) {
	if err := r.Validate(); err != nil {
		return locking.Grant{}, fmt.Errorf("memlock: acquire: %w", err)
	}
	return locking.Grant(b.s.Acquire(r.ID, r.Owner, r.Lease, r.StealAfter)), nil
}

// Renew implements locking.Backend.
func (b *Backend) Renew(_ context.Context, r locking.Request) (locking.Grant, error) {
	if err := r.Validate(); err != nil {
		return locking.Grant{}, fmt.Errorf("memlock: renew: %w", err)
	}
	tok, ok := b.s.Renew(r.ID, r.Owner, r.Lease)
	if !ok {
		return locking.Grant{}, fmt.Errorf("memlock: renew %q: %w", r.ID, locking.ErrNotHeld)
	}
	return locking.Grant{Acquired: true, Token: tok}, nil
}

// Release implements locking.Backend.
func (b *Backend) Release(_ context.Context, id, owner string) error {
	if !b.s.Release(id, owner) {
		return fmt.Errorf("memlock: release %q: %w", id, locking.ErrNotHeld)
	}
	return nil
}

// Probe implements locking.Prober. It never fails.
func (b *Backend) Probe(_ context.Context, id string) (bool, time.Duration, error) {
	held, left := b.s.Probe(id)
	return held, left, nil
}

// Held reports how many locks the backend holds (stored and not expired), so
// that a test can check that nothing was left held.
func (b *Backend) Held() int { return b.s.Held() }
