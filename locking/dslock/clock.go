package dslock

import (
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
		since = b.now().Sub(rec.renewedAt) - b.skew
	}
	return age{since: since, remaining: rec.lease - since, server: server}
}

// hints remembers ids this Backend recently found held, and until when the
// holder's lease was known to run, so that the next Acquire of such an id
// can skip the create-then-read of an unknown id: while that lease runs, a
// poll is the create alone (1 RPC: it fails while the lock is held and takes
// it at once when the holder has released); once it may have ended, the
// poll starts with a read (to judge expiry and take over).
type hints struct {
	mu sync.Mutex
	m  map[string]hint // key name -> hint; guarded by mu
}

// hint is what one read of a held lock taught: both times are on the local
// monotonic clock.
type hint struct {
	expires time.Time // no later than the end of the holder's lease as read
	until   time.Time // when to forget the hint
}

const (
	maxHints   = 4096
	hintLinger = time.Minute // beyond the holder's remaining lease: it may expire, not vanish
)

// expectHeld reports whether name was recently found held and, if so, how
// much of the holder's lease was then known to remain (<= 0 when it may
// have ended).
func (h *hints) expectHeld(name string) (held bool, left time.Duration) {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	e, ok := h.m[name]
	if ok && now.After(e.until) {
		delete(h.m, name)
		return false, 0
	}
	return ok, e.expires.Sub(now)
}

// held records name as held with remaining lease as judged by a read sent
// at readSent (local clock), so the remembered end is never later than the
// lease's end.
func (h *hints) held(name string, readSent time.Time, remaining time.Duration) {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.m == nil {
		h.m = make(map[string]hint)
	}
	if len(h.m) >= maxHints {
		for k, e := range h.m {
			if now.After(e.until) {
				delete(h.m, k)
			}
		}
		if len(h.m) >= maxHints {
			clear(h.m)
		}
	}
	h.m[name] = hint{expires: readSent.Add(remaining), until: now.Add(max(remaining, 0) + hintLinger)}
}

func (h *hints) forget(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.m, name)
}
