package locking

import (
	"context"
	"fmt"
	"time"

	"github.com/taskguard/taskguard/locking/internal/memstore"
)

// memory is the in-process backend of the default client when the
// environment names no other. Package memlock exports the same store.
type memory struct{ s *memstore.Store }

func (m memory) Acquire(_ context.Context, r Request) (Grant, error) {
	if err := r.Validate(); err != nil {
		return Grant{}, err
	}
	res := m.s.Acquire(r.ID, r.Owner, r.Lease, r.StealAfter)
	return Grant(res), nil
}

func (m memory) Renew(_ context.Context, r Request) (Grant, error) {
	if err := r.Validate(); err != nil {
		return Grant{}, err
	}
	tok, ok := m.s.Renew(r.ID, r.Owner, r.Lease)
	if !ok {
		return Grant{}, fmt.Errorf("%w: %q", ErrNotHeld, r.ID)
	}
	return Grant{Acquired: true, Token: tok}, nil
}

func (m memory) Release(_ context.Context, id, owner string) error {
	if !m.s.Release(id, owner) {
		return fmt.Errorf("%w: %q", ErrNotHeld, id)
	}
	return nil
}

// Probe implements Prober.
func (m memory) Probe(_ context.Context, id string) (bool, time.Duration, error) {
	held, left := m.s.Probe(id)
	return held, left, nil
}

// InProcess reports true: these locks live in this process only.
func (memory) InProcess() bool { return true }

func newMemory() Backend { return memory{memstore.New(time.Now)} }
