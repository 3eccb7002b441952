package locking

import (
	"context"
	"log/slog"
	mrand "math/rand/v2"
	"time"
)

// SafetyPoll is how often, at most, a waiter whose backend announces
// releases (a Notifier) polls all the same, in case an announcement was
// lost: every 2 to 3 seconds per waited id per Client.
const SafetyPoll = 2 * time.Second

// waitDivisor sets how the gap between two polls grows with the time
// already waited, on backends that do not announce releases: the gap is at
// most a tenth of it (within MinBackoff and MaxBackoff), so that a release
// is noticed within about 4% of the time waited, on average, and a long wait
// costs a few polls a second at most.
const waitDivisor = 10

// pollGap returns the pause before the next poll of a caller that has been
// polling a held lock for waited: jitter over [hi/2, hi], never below
// MinBackoff, where hi is waited/10 within [MinBackoff, MaxBackoff]. Short
// waits poll often and notice a release quickly; long waits poll rarely, so
// their cost grows with the logarithm of the time waited, not with the time.
func (c *Client) pollGap(waited time.Duration) time.Duration {
	hi := c.maxPollGap(waited)
	lo := max(c.minBackoff, hi/2)
	if hi <= lo {
		return lo
	}
	return lo + mrand.N(hi-lo+1)
}

// maxPollGap is the longest pause pollGap returns after waited.
func (c *Client) maxPollGap(waited time.Duration) time.Duration {
	return min(max(waited/waitDivisor, c.minBackoff), c.maxBackoff)
}

// waiter is one Acquire's waiting between polls: a watch of the backend's
// announcements when it has them, polls spaced by pollGap otherwise.
type waiter struct {
	n       Notifier // nil: poll
	log     *slog.Logger
	ch      <-chan struct{}
	stopFn  func()
	started bool // a watch was tried
}

// wants reports whether a watch should be started now.
func (w *waiter) wants() bool { return w.n != nil && !w.started }

// start starts the watch; on failure the waiter polls.
func (w *waiter) start(ctx context.Context, id string) {
	w.started = true
	ch, stop, err := w.n.Watch(ctx, id)
	if err != nil {
		w.log.Debug("locking: the backend cannot announce releases; polling", "lock_id", id, "error", err)
		return
	}
	w.ch, w.stopFn = ch, stop
}

// pause is the time to wait before the next poll after waited of polling,
// remaining being the holder's lease as the last answer reported it (0 when
// unknown) and took the round trip of that poll.
//
// Without announcements the schedule (pollGap) spaces the polls' starts,
// so the poll's own round trip counts toward the pause: with a distant
// store (a 30 ms round trip to Datastore) a waiter notices a release
// within its gap of it, not a gap and a round trip; and it still starts
// at most one poll per gap (polls never overlap).
func (w *waiter) pause(c *Client, waited, remaining, took time.Duration) time.Duration {
	if w.ch == nil {
		return max(0, c.pollGap(waited)-took)
	}
	// Announced releases wake the waiter at once; a poll every 2 to 3 s
	// covers a lost announcement, and one as the lease runs out an expiry.
	p := SafetyPoll + mrand.N(SafetyPoll/2+1)
	if remaining > 0 {
		p = min(p, remaining+c.minBackoff)
	}
	return max(p, c.minBackoff)
}

// sleep waits for d, an announcement, or ctx, and returns ctx.Err() in the
// last case.
func (w *waiter) sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-w.ch: // nil without a watch: never ready
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stop ends the watch, if any.
func (w *waiter) stop() {
	if w.stopFn != nil {
		w.stopFn()
	}
}

// backoff returns the pause before retry attempt+1 of a failed renewal of
// a lease: full jitter over [minBackoff, min(cap, minBackoff·2^attempt)],
// where cap is maxBackoff and at most a thirtieth of the lease, so that a
// lease sees many retries before it runs out.
func (c *Client) backoff(attempt int, lease time.Duration) time.Duration {
	ceil := max(c.minBackoff, min(c.maxBackoff, lease/30))
	if attempt < 62 && c.minBackoff <= ceil>>attempt {
		ceil = c.minBackoff << attempt // no overflow: at most maxBackoff
	}
	if ceil <= c.minBackoff {
		return c.minBackoff
	}
	return c.minBackoff + mrand.N(ceil-c.minBackoff+1)
}
