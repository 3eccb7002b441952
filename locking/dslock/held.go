package dslock

import (
	"sync"
	"time"
)

// holding is what a Backend knows about a lock it holds: the entity version
// its own last successful write produced, the holding's fencing token, the
// incarnation of the entity it lives in (see record.incarnation), and when
// the lease that write granted ends on this machine's monotonic clock.
type holding struct {
	version int64
	token   uint64
	origin  uint64
	until   time.Time
}

// heldKey names one holding: a lock (by key name) and its owner token.
type heldKey struct {
	name, owner string
}

// holdings remembers, per lock and owner, the version of this Backend's last
// successful acquire or renewal of it, so that Renew and Release can send
// their conditional write directly (1 RPC) instead of reading first. An entry
// is only ever a guess: a write conditional on a version that changed fails
// with FailedPrecondition and the caller falls back to reading the entity, so
// a stale or missing entry costs RPCs, never correctness.
//
// There is no fixed cap: every holding this Backend keeps alive has its
// entry, however many there are. An entry is freed when its holding ends
// here (released, found lost, given up), and otherwise once its lease ended
// more than heldLinger ago (a holder that stopped renewing without releasing:
// its lock expires, and so does the entry). Expired entries are swept when
// the table has doubled since the last sweep, so memory stays proportional
// to the holdings alive and each put costs O(1) amortized.
type holdings struct {
	mu        sync.Mutex
	m         map[heldKey]holding // guarded by mu
	nextSweep int                 // sweep when len(m) reaches it; guarded by mu
}

// heldLinger is how long an entry outlives its lease, for a renewal that
// comes late (an expired lease nobody took over is still the holder's).
const heldLinger = time.Minute

// minSweep is the table size below which expired entries are not swept.
const minSweep = 1024

func (h *holdings) get(name, owner string) (holding, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, ok := h.m[heldKey{name, owner}]
	return v, ok
}

// put remembers v, a write of a holding granting lease, made just now.
func (h *holdings) put(name, owner string, v holding, lease time.Duration) {
	now := time.Now()
	v.until = now.Add(lease)
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.m == nil {
		h.m = make(map[heldKey]holding)
	}
	k := heldKey{name, owner}
	cur, ok := h.m[k]
	if ok && cur.version > v.version {
		// A concurrent write of ours landed later; versions only grow.
		return
	}
	h.m[k] = v
	if len(h.m) >= max(h.nextSweep, minSweep) {
		for old, e := range h.m {
			if now.After(e.until.Add(heldLinger)) {
				delete(h.m, old)
			}
		}
		h.nextSweep = 2 * len(h.m)
	}
}

// drop forgets the holding of name by owner, if it is still the write of
// v.version (the zero v matches any): a concurrent renewal that stored a
// newer version keeps it.
func (h *holdings) drop(name, owner string, v holding) {
	h.mu.Lock()
	defer h.mu.Unlock()
	k := heldKey{name, owner}
	if cur, ok := h.m[k]; ok && (v.version == 0 || cur.version == v.version) {
		delete(h.m, k)
	}
}

// len reports how many holdings are remembered.
func (h *holdings) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.m)
}
