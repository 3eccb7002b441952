package locking

import (
	"fmt"
	"time"
)

// LockKind selects how strong a lock is, and so which backend stores it.
type LockKind int

const (
	// Strong locks are for correctness: while one owner holds an id no other
	// owner does, as long as the backend is consistent (Cloud Datastore in
	// production). It is the default.
	Strong LockKind = iota
	// Weak locks are for efficiency only: they avoid most overlapping work but
	// may let two owners in when the store loses data (memcached or Valkey
	// restarting, evicting or failing over).
	Weak
)

// String returns "strong" or "weak".
func (k LockKind) String() string {
	switch k {
	case Strong:
		return "strong"
	case Weak:
		return "weak"
	}
	return fmt.Sprintf("LockKind(%d)", int(k))
}

// An Option changes how one Acquire or With call behaves.
type Option func(*options)

type options struct {
	wait       bool
	maxWait    time.Duration // 0: until ctx is done
	stealAfter time.Duration // 0: only expired leases are taken over
	kind       LockKind
	lease      time.Duration // 0: the client's default
	err        error         // the first invalid option
	measured   bool          // telemetry records this call and its lock (set by the client)
}

func (o *options) fail(err error) {
	if o.err == nil {
		o.err = err
	}
}

// Wait says whether to wait while the lock is held by someone else (the
// default, true) or to fail at once with ErrNotAcquired (false).
func Wait(wait bool) Option {
	return func(o *options) { o.wait = wait }
}

// MaxWait bounds how long Acquire waits for a held lock: once d has passed it
// fails with ErrNotAcquired. Without it Acquire waits until ctx is done.
// d must be positive and at most MaxLease.
func MaxWait(d time.Duration) Option {
	return func(o *options) {
		if d <= 0 || d > MaxLease {
			o.fail(invalid("MaxWait(%v): must be positive and at most MaxLease (%v)", d, MaxLease))
		}
		o.maxWait = d
	}
}

// StealAfter lets Acquire take over a lock whose holder has not acquired or
// renewed it within d, even before its lease expires: djangae's
// steal_after_ms. Holders renew every third of their lease, so a d shorter
// than that can take a lock from a live holder, who then finds out at its
// next renewal (Done closes). d must be positive: there is no "never steal",
// since an expired lease is always taken over. It must be at most MaxLease.
func StealAfter(d time.Duration) Option {
	return func(o *options) {
		if d <= 0 || d > MaxLease {
			o.fail(invalid("StealAfter(%v): must be positive and at most MaxLease (%v)", d, MaxLease))
		}
		o.stealAfter = d
	}
}

// Kind selects the lock kind; the default is Strong.
func Kind(k LockKind) Option {
	return func(o *options) {
		if k != Strong && k != Weak {
			o.fail(invalid("unknown lock kind %v", k))
		}
		o.kind = k
	}
}

// Lease sets how long the lock stays held if its holder stops renewing it
// (the holder crashed, or lost its network). While held it is renewed
// automatically every third of d. A longer lease makes a dead holder's lock
// wait longer before it is taken over; a shorter one costs more renewals.
// The default is the client's Config.Lease. d must be positive and at most
// MaxLease; a lease shorter than the store's resolution is rounded up by the
// store (to a millisecond on Valkey/Redis, to whole seconds on memcached).
func Lease(d time.Duration) Option {
	return func(o *options) {
		if d <= 0 || d > MaxLease {
			o.fail(invalid("Lease(%v): must be positive and at most MaxLease (%v)", d, MaxLease))
		}
		o.lease = d
	}
}
