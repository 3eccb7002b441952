package locking_test

import (
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// TestDefaultPollRate checks the bound BENCHMARKS.md states for the default
// backoff: a waiting instance polls a held id at most 1/DefaultMinBackoff
// times a second, and, once backed off, at least 1/DefaultMaxBackoff times a
// second (so a release is noticed within DefaultMaxBackoff).
func TestDefaultPollRate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := memlock.New()
		holder := newClient(t, store, locking.Config{})
		l, err := holder.Acquire(t.Context(), "job")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Release(t.Context())
		b := &counting{Backend: store}
		waiter := newClient(t, b, locking.Config{})
		const wait = 10 * time.Second
		_, err = waiter.Acquire(t.Context(), "job", locking.MaxWait(wait))
		if !errors.Is(err, locking.ErrNotAcquired) {
			t.Fatalf("err = %v; want ErrNotAcquired", err)
		}
		n := b.acquires.Load()
		most := int64(wait/locking.DefaultMinBackoff) + 1
		least := int64(wait / locking.DefaultMaxBackoff)
		t.Logf("%d polls in %v (%.1f/s)", n, wait, float64(n)/wait.Seconds())
		if n < least || n > most {
			t.Errorf("%d polls in %v with the default backoff; want between %d and %d", n, wait, least, most)
		}
	})
}
