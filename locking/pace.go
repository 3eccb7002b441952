package locking

import (
	"context"
	"log/slog"
	mrand "math/rand/v2"
	"sync"
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
// announcements when it has them, polls spaced by pollGap otherwise, and
// on such a backend one poll timed to reach the store just after the
// holding waited for is expected to end (see expect).
type waiter struct {
	n       Notifier // nil: poll
	log     *slog.Logger
	ch      <-chan struct{}
	stopFn  func()
	started bool // a watch was tried

	// The holding waited for, and its expected end (see expect).
	wrote   time.Time     // its last write (acquire or renewal), on this clock; zero: unknown
	within  time.Duration // how far wrote may be off: half the round trip it was read in
	ends    time.Time     // when a poll should reach the store to find it released; zero: no aim
	aimed   time.Time     // the last ends set in this wait
	rtt     time.Duration // the shortest round trip of a poll in this wait
	missed  int           // polls that found the holding still there after ends
	overdue int           // holdings in this wait that outlasted their aim and its missed polls
}

// Timing polls to an expected release. Lock holdings of one id tend to
// last alike (one kind of job per id), and a backend that answers a busy
// poll with the holding's age (Grant.Age) tells the waiter when the current
// holding began. A Client remembers how long its own recent holdings of an
// id lasted when it had waited for them (holdLog), and a waiter that knows
// both aims one poll at the store a little after the current holding
// should end: the hand-off is then about that margin and the acquire's own
// round trips, instead of half a poll gap on average. If the aimed poll
// still finds the holding, up to missedPolls more follow at MinBackoff
// starts; then the schedule of pollGap goes on.
//
// What it costs beyond the schedule is bounded: an aim moves a scheduled
// poll (earlier, or later by less than a round trip), at most one per
// longest gap of the schedule (so at most doubling its rate, and only
// while new holdings keep coming), plus at most missedPolls per holding
// that outlasts its aim; after maxOverdue such holdings a wait aims no more
// (a long job among short ones, or a holder's renewals, which restart the
// holding's age).
const (
	// missedPolls is how many polls follow a missed aim at MinBackoff.
	missedPolls = 2
	// maxOverdue is how many holdings may outlast their aims in one wait.
	maxOverdue = 2
	// holdLogSize bounds the ids a Client remembers holdings of.
	holdLogSize = 1024
)

// aimMargin is how long after the expected end of a holding the aimed poll
// reaches the store: a quarter of MinBackoff (5 ms by default), room for
// holdings that last a little longer and for the estimates' error.
func (c *Client) aimMargin() time.Duration { return c.minBackoff / 4 }

// holdLog remembers, per lock (kind, id), how long this Client's last
// three holdings of it lasted, from their last write to their release
// (each as the store saw it: at the middle of the call's round trip),
// for holdings it had waited for (contended ids only). At most holdLogSize
// ids; a new id beyond that replaces an arbitrary one.
type holdLog struct {
	mu sync.Mutex
	m  map[gateKey]holdTimes // guarded by mu
}

type holdTimes struct {
	d [3]time.Duration
	n int // holdings recorded; the latest is d[(n-1)%3]
}

// record adds a holding of key that lasted d.
func (h *holdLog) record(key gateKey, d time.Duration) {
	if d <= 0 {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	t, ok := h.m[key]
	if !ok {
		if h.m == nil {
			h.m = make(map[gateKey]holdTimes)
		}
		if len(h.m) >= holdLogSize {
			for k := range h.m {
				delete(h.m, k)
				break
			}
		}
	}
	t.d[t.n%len(t.d)] = d
	t.n++
	h.m[key] = t
}

// longest returns how long a holding of key is expected to last at most:
// the longest of the last three recorded. A guess too long costs the
// hand-off its excess; one too short costs a poll that finds the lock held,
// and a round trip more, so the guess leans long: on a loaded machine (or
// a slow network) holdings of one length end a few milliseconds apart.
func (h *holdLog) longest(key gateKey) (time.Duration, bool) {
	h.mu.Lock()
	t, ok := h.m[key]
	h.mu.Unlock()
	if !ok || t.n == 0 {
		return 0, false
	}
	return max(t.d[0], t.d[1], t.d[2]), true
}

// expect notes a busy answer to a poll whose round trip took rtt and that
// the store read at read (the middle of that round trip), after waited of
// polling, with the holding's age (Grant.Age; 0: unknown), and aims the
// next poll at the holding's expected end: its last write plus the longest
// recent holding of key, plus aimMargin. A holding already seen (its last
// write as far from the one noted as the two reads' half round trips
// allow) keeps its aim.
func (w *waiter) expect(c *Client, key gateKey, read time.Time, waited, rtt, age time.Duration) {
	if w.ch != nil {
		return // announced releases: nothing to aim at
	}
	if w.rtt == 0 || rtt < w.rtt {
		w.rtt = rtt // the shortest: the store's round trip, with the least queueing
	}
	if age <= 0 {
		w.wrote, w.ends, w.missed = time.Time{}, time.Time{}, 0
		return
	}
	wrote := read.Add(-age)
	if !w.wrote.IsZero() && wrote.Sub(w.wrote).Abs() <= w.within+rtt/2+time.Millisecond {
		return // the same holding
	}
	w.wrote, w.within, w.ends, w.missed = wrote, rtt/2, time.Time{}, 0
	if w.overdue >= maxOverdue {
		return
	}
	if !w.aimed.IsZero() && read.Sub(w.aimed) < c.maxPollGap(waited) {
		return // an aim at most every longest gap of the schedule
	}
	if d, ok := c.holds.longest(key); ok {
		w.ends = wrote.Add(d + c.aimMargin())
		w.aimed = w.ends
	}
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
//
// With an expected end of the holding (see expect), the poll that would
// start less than a round trip before the one aimed at it is moved to it
// (earlier or, by less than a round trip, later), so that it reaches the
// store just after that end; and a poll that still found the holding
// after it is followed by up to missedPolls more at MinBackoff starts.
func (w *waiter) pause(c *Client, waited, remaining, took time.Duration) time.Duration {
	if w.ch == nil {
		p := max(0, c.pollGap(waited)-took)
		if w.ends.IsZero() {
			return p
		}
		// The aimed poll starts half a round trip before it reaches the store.
		until := time.Until(w.ends.Add(-w.rtt / 2))
		switch {
		case until > 0:
			if p > until-w.rtt {
				p = until
			}
		case w.missed < missedPolls:
			w.missed++
			p = min(p, max(0, c.minBackoff-took))
		default: // the holding outlasted its aim: back to the schedule
			w.ends = time.Time{}
			w.overdue++
		}
		return p
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
