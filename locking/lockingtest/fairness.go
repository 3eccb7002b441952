package lockingtest

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
)

// remoteNotStarved checks that callers of one client taking an id in turn
// do not keep it from another client (another instance) for ever: local
// hand-offs are bounded, so a remote waiter gets the lock within its
// MaxWait. Both clients use the default timing, as deployed code does.
func (s *suite) remoteNotStarved(t *testing.T) {
	const (
		tries   = 5
		maxWait = 3 * time.Second
		hold    = 50 * time.Millisecond
	)
	lockID := id(t, "x")
	newClient := func() *locking.Client {
		c, err := locking.New(locking.Config{Strong: s.newBackend(t)})
		if err != nil {
			t.Fatalf("locking.New: %v", err)
		}
		return c
	}
	a, b := newClient(), newClient()

	var (
		stopped atomic.Bool
		wg      sync.WaitGroup
		mu      sync.Mutex
		aHolds  int
		aErrors []error
	)
	// Instance A: two requests that take the id in turn, without pause.
	for range 2 {
		wg.Go(func() {
			for !stopped.Load() {
				err := a.With(t.Context(), lockID, func(context.Context) error {
					mu.Lock()
					aHolds++
					mu.Unlock()
					time.Sleep(hold)
					return nil
				})
				if err != nil {
					mu.Lock()
					aErrors = append(aErrors, err)
					mu.Unlock()
					return
				}
			}
		})
	}
	var missed []error
	for i := range tries {
		// Let A's run of hand-offs start again before B asks, at another
		// point of it each time.
		time.Sleep(time.Duration(5+3*i) * hold)
		start := time.Now()
		l, err := b.Acquire(t.Context(), lockID, locking.MaxWait(maxWait))
		if err != nil {
			mu.Lock()
			n := aHolds
			mu.Unlock()
			t.Logf("try %d: %v after %v (A had held the id %d times so far)", i+1, err, time.Since(start).Round(time.Millisecond), n)
			missed = append(missed, err)
			continue
		}
		mu.Lock()
		n := aHolds
		mu.Unlock()
		t.Logf("try %d: acquired after %v (A %d)", i+1, time.Since(start).Round(time.Millisecond), n)
		time.Sleep(hold)
		if err := l.Release(t.Context()); err != nil {
			t.Errorf("try %d: Release: %v", i+1, err)
		}
	}
	stopped.Store(true)
	wg.Wait()
	if err := errors.Join(aErrors...); err != nil {
		t.Fatalf("instance A: %v", err)
	}
	if aHolds == 0 {
		t.Fatalf("instance A never held the id: the test did not contend")
	}
	if len(missed) > 0 {
		t.Fatalf("instance B did not get the id within MaxWait(%v) in %d of %d tries while instance A's two callers took it in turn (%d holds): local hand-offs starve remote waiters",
			maxWait, len(missed), tries, aHolds)
	}
}
