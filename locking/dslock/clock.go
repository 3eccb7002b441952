package dslock

import (
	"math"
	"sync"
	"time"
)

// age is how long ago a lock was last acquired or renewed, and how much of
// its lease remains, as judged by one reader.
type age struct {
	since     time.Duration // time since the last acquire or renew
	remaining time.Duration // lease left; <= 0 means expired
	server    bool          // judged on server times
}

// judge measures rec as read at readTime.
//
// Where the server reports times (Firestore in Datastore mode, production
// and its emulator), both ends come from the server: the entity's update
// time is the commit time of the last acquire or renew, and readTime is the
// server's time of this read. No client clock is involved, so no margin is
// needed; the holder measured its lease from before it sent the write, so
// it gives the lease up no later than the server considers it expired.
//
// Otherwise (the legacy emulator returns zero times) the writer's clock
// (renewedAt) is compared with this reader's clock, and b.skew is taken off
// the measured age: a lease is expired only when it is expired even if the
// reader's clock runs b.skew ahead of the writer's.
func (b *Backend) judge(rec record, readTime time.Time) age {
	var since time.Duration
	server := !readTime.IsZero() && !rec.updated.IsZero()
	if server {
		since = readTime.Sub(rec.updated)
	} else {
		since = subSat(b.now().Sub(rec.renewedAt), b.skew)
	}
	return age{since: since, remaining: subSat(rec.lease, since), server: server}
}

// holdAge is Grant.Age of rec read at readTime by a lookup sent at asked
// (this Backend's clock): how long before the read the holder's last write
// reached the store. On server times it is exact. Otherwise it compares
// the writer's clock as it sent the write (renewedAt) with this reader's as
// it sent the read: each is about half a round trip before the store saw
// it, so the halves cancel (and the skew between the two clocks remains).
// It is 0, unknown, when negative.
func holdAge(rec record, readTime, asked time.Time) time.Duration {
	var d time.Duration
	if !readTime.IsZero() && !rec.updated.IsZero() {
		d = readTime.Sub(rec.updated)
	} else {
		d = asked.Sub(rec.renewedAt)
	}
	return max(d, 0)
}

// addSat returns a+b, held at the bounds of time.Duration instead of
// wrapping around: a lease judged from a broken clock or a huge stored value
// stays huge, never turns negative (expired) or the other way round.
func addSat(a, b time.Duration) time.Duration {
	s := a + b
	switch {
	case a > 0 && b > 0 && s < 0:
		return math.MaxInt64
	case a < 0 && b < 0 && s >= 0:
		return math.MinInt64
	}
	return s
}

// subSat returns a-b, held at the bounds of time.Duration.
func subSat(a, b time.Duration) time.Duration {
	if b == math.MinInt64 {
		if a >= 0 {
			return math.MaxInt64
		}
		return a - b // a < 0: a + 2⁶³ fits
	}
	return addSat(a, -b)
}

// hints remembers ids this Backend recently found held, so that the next
// Acquire of such an id starts with a read (1 RPC for a poll of a held lock)
// instead of a create (1 RPC for a free lock, 2 when held, one of them a
// failed write on the lock's entity). A hint outlives the Acquire that
// succeeds after it, and the Release of that holding (see released): a lock
// that was contended here is likely to be again, and its next Acquire here
// then reads instead of sending an Insert that fails on a waiter's holding.
// An id not found held for a minute goes back to create-first.
type hints struct {
	mu sync.Mutex
	m  map[string]time.Time // key name -> monotonic deadline of the hint; guarded by mu
}

const (
	maxHints   = 4096
	hintLinger = time.Minute // beyond the holder's remaining lease: it may expire, not vanish
)

func (h *hints) expectHeld(name string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	until, ok := h.m[name]
	if ok && time.Now().After(until) {
		delete(h.m, name)
		return false
	}
	return ok
}

func (h *hints) held(name string, remaining time.Duration) {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.m == nil {
		h.m = make(map[string]time.Time)
	}
	if len(h.m) >= maxHints {
		for k, until := range h.m {
			if now.After(until) {
				delete(h.m, k)
			}
		}
		if len(h.m) >= maxHints {
			clear(h.m)
		}
	}
	h.m[name] = now.Add(addSat(max(remaining, 0), hintLinger))
}

// released notes that this Backend released its holding of name: a hint
// there (the lock was found held here not long ago) lasts hintLinger more.
func (h *hints) released(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.m[name]; ok {
		h.m[name] = time.Now().Add(hintLinger)
	}
}

func (h *hints) forget(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.m, name)
}
