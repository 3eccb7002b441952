package locking_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// announcing is an in-memory Notifier: a release wakes every watcher of its
// id.
type announcing struct {
	*memlock.Backend
	watches atomic.Int64

	mu       sync.Mutex
	watchers map[string][]chan struct{}
}

func newAnnouncing() *announcing {
	return &announcing{Backend: memlock.New(), watchers: make(map[string][]chan struct{})}
}

func (a *announcing) Watch(_ context.Context, id string) (<-chan struct{}, func(), error) {
	a.watches.Add(1)
	ch := make(chan struct{}, 1)
	a.mu.Lock()
	a.watchers[id] = append(a.watchers[id], ch)
	a.mu.Unlock()
	ch <- struct{}{} // the watch is in effect
	stop := func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		ws := a.watchers[id]
		for i, w := range ws {
			if w == ch {
				a.watchers[id] = append(ws[:i], ws[i+1:]...)
				break
			}
		}
	}
	return ch, stop, nil
}

func (a *announcing) Release(ctx context.Context, id, owner string) error {
	err := a.Backend.Release(ctx, id, owner)
	a.mu.Lock()
	for _, w := range a.watchers[id] {
		select {
		case w <- struct{}{}:
		default:
		}
	}
	a.mu.Unlock()
	return err
}

// decorator is what a user puts around a Backend (a call counter here); it
// keeps the wrapped backend's capabilities by implementing locking.Wrapper.
type decorator struct {
	b     locking.Backend
	calls atomic.Int64
}

func (d *decorator) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	d.calls.Add(1)
	return d.b.Acquire(ctx, r)
}

func (d *decorator) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	d.calls.Add(1)
	return d.b.Renew(ctx, r)
}

func (d *decorator) Release(ctx context.Context, id, owner string) error {
	d.calls.Add(1)
	return d.b.Release(ctx, id, owner)
}

func (d *decorator) Unwrap() locking.Backend { return d.b }

// TestWrappedNotifierStillAnnounces: a waiter behind a decorator that
// implements Unwrap is woken by the wrapped backend's announcement of a
// release (within a moment, not at its next poll), twice wrapped too; a
// decorator without Unwrap hides the capability, as documented.
func TestWrappedNotifierStillAnnounces(t *testing.T) {
	tests := []struct {
		name     string
		wrap     func(locking.Backend) locking.Backend
		announce bool
	}{
		{"bare", func(b locking.Backend) locking.Backend { return b }, true},
		{"wrapped", func(b locking.Backend) locking.Backend { return &decorator{b: b} }, true},
		{"wrapped twice", func(b locking.Backend) locking.Backend { return &decorator{b: &decorator{b: b}} }, true},
		{"embedded without Unwrap", func(b locking.Backend) locking.Backend { return wrapped{b} }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				store := newAnnouncing()
				holder := newClient(t, store, locking.Config{})
				// The waiter polls every 10 s at most, 10 s at least: only
				// an announcement wakes it sooner.
				waiter := newClient(t, tt.wrap(store), locking.Config{MinBackoff: 10 * time.Second, MaxBackoff: 10 * time.Second})
				held, err := holder.Acquire(t.Context(), "job")
				if err != nil {
					t.Fatal(err)
				}
				got := make(chan time.Duration, 1)
				go func() {
					start := time.Now()
					l, err := waiter.Acquire(t.Context(), "job")
					if err != nil {
						t.Error(err)
						got <- -1
						return
					}
					got <- time.Since(start)
					_ = l.Release(t.Context())
				}()
				time.Sleep(time.Second)
				synctest.Wait()
				if err := held.Release(t.Context()); err != nil {
					t.Fatal(err)
				}
				waited := <-got
				if tt.announce {
					if store.watches.Load() == 0 || waited > time.Second+time.Millisecond {
						t.Errorf("waiter watched %d times, acquired after %v; want a watch and the lock at the release (1s)", store.watches.Load(), waited)
					}
				} else if store.watches.Load() != 0 || waited < 10*time.Second {
					t.Errorf("waiter behind a decorator without Unwrap watched %d times, acquired after %v; want polls only (10s)", store.watches.Load(), waited)
				}
			})
		})
	}
}

// TestWrappedInProcess: Client.InProcess sees memlock behind a decorator
// that implements Unwrap.
func TestWrappedInProcess(t *testing.T) {
	c := newClient(t, &decorator{b: memlock.New()}, locking.Config{})
	if !c.InProcess(locking.Strong) {
		t.Errorf("InProcess(Strong) = false for a wrapped memlock backend; want true")
	}
	if c := newClient(t, &decorator{b: &counting{}}, locking.Config{}); c.InProcess(locking.Strong) {
		t.Errorf("InProcess(Strong) = true for a backend that does not say so")
	}
}
