package dslock

import "sync"

// holding is what a Backend knows about a lock it holds: the entity version
// its own last successful write produced, the holding's fencing token, and
// the incarnation of the entity it lives in (see record.incarnation).
type holding struct {
	version int64
	token   uint64
	origin  uint64
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
// a stale, missing or evicted entry costs RPCs, never correctness.
type holdings struct {
	mu sync.Mutex
	m  map[heldKey]holding // guarded by mu
}

// maxHoldings bounds the entries; when full, arbitrary entries are dropped.
const maxHoldings = 4096

func (h *holdings) get(name, owner string) (holding, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, ok := h.m[heldKey{name, owner}]
	return v, ok
}

func (h *holdings) put(name, owner string, v holding) {
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
	if !ok && len(h.m) >= maxHoldings {
		for old := range h.m {
			delete(h.m, old)
			if len(h.m) < maxHoldings*3/4 {
				break
			}
		}
	}
	h.m[k] = v
}

// drop forgets the holding of name by owner, if it is still v (the zero v
// matches any): a concurrent renewal that stored a newer version keeps it.
func (h *holdings) drop(name, owner string, v holding) {
	h.mu.Lock()
	defer h.mu.Unlock()
	k := heldKey{name, owner}
	if cur, ok := h.m[k]; ok && (v == holding{} || cur == v) {
		delete(h.m, k)
	}
}
