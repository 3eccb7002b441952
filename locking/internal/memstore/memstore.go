// Package memstore is the in-process lock table behind locking/memlock and
// the embedded default of package locking. It knows nothing of the locking
// package so that both can use it without an import cycle.
package memstore

import (
	"sync"
	"time"
)

// Store is a table of locks guarded by one mutex. Its zero value is not
// usable; call New.
type Store struct {
	now func() time.Time

	mu      sync.Mutex
	entries map[string]*entry // guarded by mu
	// lastToken is the last fencing token issued for any id; one counter
	// for all ids keeps tokens increasing per id without remembering ids
	// that were released. Guarded by mu.
	lastToken uint64
	acquires  uint64 // guarded by mu; paces the sweep of expired entries
}

// sweepEvery is how many acquisitions pass between sweeps of entries whose
// holders vanished without releasing.
const sweepEvery = 1024

type entry struct {
	owner   string
	token   uint64
	renewed time.Time // last acquire or renewal, on the store's clock
	expires time.Time
}

// New returns an empty store that reads time from now.
func New(now func() time.Time) *Store {
	return &Store{now: now, entries: make(map[string]*entry)}
}

// Result is the outcome of Acquire.
type Result struct {
	Acquired  bool
	Token     uint64
	TookOver  bool
	Remaining time.Duration
	Age       time.Duration // since the holder's last acquire or renewal, when not Acquired
}

// Acquire takes id for owner when it is free, expired (lease has passed
// since the last acquire or renewal), or (stealAfter > 0) stealAfter has
// passed since then: the same boundary for both, as on the other backends.
//
// Any lease and stealAfter are safe, up to math.MaxInt64: expiry times
// saturate at the largest time instead of wrapping around (time.Time.Add),
// so a huge lease is held, never turned into an expired one. A 1 ns lease
// or stealAfter ends 1 ns later on the store's clock.
func (s *Store) Acquire(id, owner string, lease, stealAfter time.Duration) Result {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	e, held := s.entries[id]
	tookOver := false
	if held {
		live := now.Before(e.expires)
		fresh := stealAfter <= 0 || now.Sub(e.renewed) < stealAfter
		if live && fresh {
			return Result{Remaining: e.expires.Sub(now), Age: now.Sub(e.renewed)}
		}
		tookOver = true
	}
	s.lastToken++
	s.entries[id] = &entry{owner: owner, token: s.lastToken, renewed: now, expires: now.Add(lease)}
	if s.acquires++; s.acquires%sweepEvery == 0 {
		s.sweep(now)
	}
	return Result{Acquired: true, Token: s.lastToken, TookOver: tookOver}
}

// sweep drops expired entries. An expired entry is free for anyone to take,
// so dropping it changes no outcome; it only bounds memory. Called with mu held.
func (s *Store) sweep(now time.Time) {
	for id, e := range s.entries {
		if !now.Before(e.expires) {
			delete(s.entries, id)
		}
	}
}

// Renew extends owner's lease on id. It reports false when owner does not
// hold id; an expired lease that nobody took over is still owner's.
func (s *Store) Renew(id, owner string, lease time.Duration) (uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[id]
	if !ok || e.owner != owner {
		return 0, false
	}
	now := s.now()
	e.renewed, e.expires = now, now.Add(lease)
	return e.token, true
}

// Release removes id if owner holds it and reports whether it did.
func (s *Store) Release(id, owner string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[id]
	if !ok || e.owner != owner {
		return false
	}
	delete(s.entries, id)
	return true
}

// Probe reports whether id is held now (stored and not expired) and the
// lease left when it is.
func (s *Store) Probe(id string) (bool, time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[id]
	if !ok {
		return false, 0
	}
	if left := e.expires.Sub(s.now()); left > 0 {
		return true, left
	}
	return false, 0
}

// Held reports how many locks are held: stored and not expired.
func (s *Store) Held() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	now, n := s.now(), 0
	for _, e := range s.entries {
		if now.Before(e.expires) {
			n++
		}
	}
	return n
}
