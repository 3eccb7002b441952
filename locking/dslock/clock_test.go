package dslock

import (
	"fmt"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// TestWhoseClock shows which clock judges expiry: the Firestore emulator
// returns read and update times, so a taker whose own clock runs far ahead
// still sees a live lease; the legacy emulator returns none, so the taker's
// clock decides, minus the skew margin.
func TestWhoseClock(t *testing.T) {
	const lease, skew = time.Second, 300 * time.Millisecond
	cases := []struct {
		ahead      time.Duration // how far the taker's clock runs ahead of the holder's
		legacyTake bool          // want the legacy (client clock) path to take over
	}{
		{0, false},
		{lease + skew/2, false}, // past the lease on the taker's clock, but within the margin
		{lease + 2*skew, true},  // past lease and margin
		{time.Hour, true},
	}
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		holder := newBackend(t, e, Options{})
		for i, tc := range cases {
			t.Run(fmt.Sprintf("ahead=%v", tc.ahead), func(t *testing.T) {
				taker := newBackend(t, e, Options{ClockSkew: skew, Now: func() time.Time { return time.Now().Add(tc.ahead) }})
				id := fmt.Sprintf("clock-%d", i)
				mustAcquire(t, holder, req(id, lease))
				g, err := taker.Acquire(t.Context(), req(id, lease))
				if err != nil {
					t.Fatal(err)
				}
				want := tc.legacyTake && e.Mode == dstest.Legacy
				if g.Acquired != want {
					t.Fatalf("taker %v ahead: Acquired = %v; want %v", tc.ahead, g.Acquired, want)
				}
				if !g.Acquired {
					// Remaining: server path: lease minus the RPC's time;
					// client path: lease + margin - offset.
					lo, hi := lease-500*time.Millisecond, lease
					if e.Mode == dstest.Legacy {
						lo, hi = lease+skew-tc.ahead-500*time.Millisecond, lease+skew-tc.ahead
					}
					if g.Remaining < lo || g.Remaining > hi {
						t.Errorf("Remaining = %v; want in [%v, %v]", g.Remaining, lo, hi)
					}
				}
			})
		}
	})
}

// TestJudgeUsesServerTimesOnlyWhenBothPresent checks the fallback rule on
// records, without an emulator.
func TestJudgeUsesServerTimesOnlyWhenBothPresent(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	b := &Backend{skew: time.Second, now: func() time.Time { return now }}
	rec := record{lease: 10 * time.Second, renewedAt: now.Add(-4 * time.Second), updated: now.Add(-30 * time.Second)}
	cases := []struct {
		name      string
		updated   time.Time
		readTime  time.Time
		server    bool
		remaining time.Duration
	}{
		{"server times", rec.updated, now.Add(-25 * time.Second), true, 5 * time.Second},
		{"no read time", rec.updated, time.Time{}, false, 7 * time.Second},
		{"no update time", time.Time{}, now, false, 7 * time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := rec
			r.updated = tc.updated
			a := b.judge(r, tc.readTime)
			if a.server != tc.server || a.remaining != tc.remaining {
				t.Errorf("judge = %+v; want server=%v remaining=%v", a, tc.server, tc.remaining)
			}
		})
	}
}
