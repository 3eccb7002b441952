package locking_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// TestPollSchedule checks the schedule of a waiter's polls on a backend that
// does not announce releases, on a fake clock (a test of the schedule, not
// of the machine's speed): over a 60 s wait one waiting client polls at most
// 2 times a second on average, and a release after a wait of T is noticed
// within a tenth of T (within MinBackoff and MaxBackoff) every time, and
// within max(25 ms, 5% of T) at the median.
func TestPollSchedule(t *testing.T) {
	t.Run("PollsOver60s", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			store := memlock.New()
			holder := newClient(t, store, locking.Config{})
			l, err := holder.Acquire(t.Context(), "job", locking.Lease(2*time.Minute))
			if err != nil {
				t.Fatal(err)
			}
			defer l.Release(t.Context())
			b := &counting{Backend: store}
			waiter := newClient(t, b, locking.Config{})
			const wait = 60 * time.Second
			_, err = waiter.Acquire(t.Context(), "job", locking.MaxWait(wait))
			if !errors.Is(err, locking.ErrNotAcquired) {
				t.Fatalf("err = %v; want ErrNotAcquired", err)
			}
			n := b.acquires.Load()
			t.Logf("%d polls in %v (%.2f/s)", n, wait, float64(n)/wait.Seconds())
			if n > 2*int64(wait/time.Second) {
				t.Errorf("%d polls in a %v wait; want at most 2 a second", n, wait)
			}
			if least := int64(wait / locking.DefaultMaxBackoff); n < least {
				t.Errorf("%d polls in a %v wait; want at least one per DefaultMaxBackoff (%d)", n, wait, least)
			}
		})
	})
	for _, waited := range []time.Duration{100 * time.Millisecond, time.Second, 10 * time.Second, 60 * time.Second} {
		t.Run("HandOffAfter"+waited.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				bound := func(w time.Duration) time.Duration {
					return min(max(w/10, locking.DefaultMinBackoff), locking.DefaultMaxBackoff)
				}
				worst := bound(waited)
				var lat []time.Duration
				for range 101 {
					store := memlock.New()
					// Release at a random phase of the waiter's polls.
					w := waited + rand.N(worst)
					d := handOffAfter(t, store, store, w)
					if d > bound(w) {
						t.Errorf("a hand-off took %v after a wait of %v; want at most %v", d, w, bound(w))
					}
					lat = append(lat, d)
				}
				slices.Sort(lat)
				p50, most := lat[len(lat)/2], lat[len(lat)-1]
				goal := max(25*time.Millisecond, waited/20)
				t.Logf("after %v: hand-off p50 %v, max %v (goal p50 %v)", waited, p50, most, goal)
				if p50 > goal {
					t.Errorf("hand-off p50 %v after a wait of %v; want at most %v", p50, waited, goal)
				}
			})
		})
	}
}

// distant is a backend a one-way delay away: each Acquire reaches the
// store after delay, and its answer the caller delay later.
type distant struct {
	locking.Backend
	delay time.Duration
}

func (d distant) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	time.Sleep(d.delay)
	g, err := d.Backend.Acquire(ctx, r)
	time.Sleep(d.delay)
	return g, err
}

// TestPollScheduleDistantStore checks that the schedule spaces the starts
// of polls, not the gaps between an answer and the next poll: with the
// store 15 ms away each way (production's Datastore), a release after a
// 500 ms wait is noticed by a poll that reaches the store within the
// schedule's gap (50 ms) of it, or a round trip when that is longer, and
// answered 15 ms later: never more than 65 ms after the release. Counting
// the gap from the answer, as before, took up to a gap and three one-way
// delays (95 ms), 64 ms at the median in BenchmarkDistance.
func TestPollScheduleDistantStore(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const delay = 15 * time.Millisecond
		const waited = 500 * time.Millisecond
		gap := func(w time.Duration) time.Duration {
			return min(max(w/10, locking.DefaultMinBackoff), locking.DefaultMaxBackoff)
		}
		var lat []time.Duration
		for range 51 {
			store := memlock.New()
			w := waited + rand.N(gap(waited))
			d := handOffAfter(t, store, distant{store, delay}, w)
			if most := max(gap(w), 2*delay) + delay; d > most {
				t.Errorf("a hand-off took %v after a wait of %v, the store %v away; want at most %v", d, w, delay, most)
			}
			lat = append(lat, d)
		}
		slices.Sort(lat)
		t.Logf("hand-off p50 %v, max %v", lat[len(lat)/2], lat[len(lat)-1])
	})
}

// handOffAfter has a client on holderStore hold a lock while a client on
// waiterStore waits for it, releases it after w, and returns how long after
// the release the waiter had it.
func handOffAfter(t *testing.T, holderStore, waiterStore locking.Backend, w time.Duration) time.Duration {
	t.Helper()
	holder := newClient(t, holderStore, locking.Config{})
	waiter := newClient(t, waiterStore, locking.Config{})
	l, err := holder.Acquire(t.Context(), "job", locking.Lease(2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan time.Time, 1)
	go func() {
		w, err := waiter.Acquire(t.Context(), "job")
		if err != nil {
			t.Error(err)
		}
		got <- time.Now()
		w.Release(t.Context())
	}()
	time.Sleep(w)
	released := time.Now()
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	return (<-got).Sub(released)
}
