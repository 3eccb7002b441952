package locking

import (
	"context"
	"time"
)

// Backend is the storage a lock lives in. It performs a handful of atomic
// operations on one record per lock id; waiting, leases, renewal, loss
// detection and With are written once, in this package, on top of it.
//
// Every method must be safe for concurrent use and atomic with respect to
// every other call on the same id, from any process that shares the store.
// Methods return promptly when ctx is done. A backend retries transient
// store errors itself, inside ctx; an error it returns is final for that call.
//
// Time (lease expiry, StealAfter) is judged by the backend, on the store's own
// clock where the store has one, so that holders and takers never compare
// readings of different machines' clocks. Backends document whose clock they
// use and the skew margin they apply otherwise.
type Backend interface {
	// Acquire takes the lock for r.Owner with a lease of r.Lease when it is
	// free, when its lease has expired, or when r.StealAfter > 0 and its
	// holder has not acquired or renewed it within r.StealAfter.
	// When the lock is held by someone else, Acquire returns a Grant with
	// Acquired false and a nil error. Two concurrent takers of one expired
	// lock never both succeed.
	Acquire(ctx context.Context, r Request) (Grant, error)

	// Renew extends the lease of a lock that r.Owner holds to r.Lease from
	// now and returns a Grant with the token issued at acquisition. It returns
	// an error wrapping ErrNotHeld when r.Owner no longer holds the lock
	// (released, expired and taken over, or removed).
	// r.StealAfter is ignored.
	Renew(ctx context.Context, r Request) (Grant, error)

	// Release removes the lock if, and only if, owner holds it. It returns an
	// error wrapping ErrNotHeld when owner does not hold it; it never removes
	// another owner's lock.
	Release(ctx context.Context, id, owner string) error
}

// A Notifier is a Backend that can announce releases, so that waiters need
// not poll for them. It is optional: the client uses it when the Backend it
// was configured with implements it (package redislock's does, through
// Valkey/Redis pub/sub), or wraps one that does and says so with Unwrap (see
// Wrapper).
//
// Announcements may be lost (pub/sub delivers at most once, and nothing is
// delivered while a connection is down); the client covers a lost one with a
// safety poll every SafetyPoll, and with a poll when the holder's lease runs
// out (an expiry is not announced).
type Notifier interface {
	// Watch starts announcing releases of id: once the watch is in effect
	// (so that the poll it prompts sees any release that came before), after
	// each release of id in the store, and whenever an announcement may have
	// been missed (a reconnect), a value is sent on released without
	// blocking (the channel has a buffer of one, so announcements coalesce). stop ends the watch
	// and frees what it holds; it must be called, and may be called more
	// than once. Watch returns an error when the store cannot announce; the
	// client then polls.
	Watch(ctx context.Context, id string) (released <-chan struct{}, stop func(), err error)
}

// Request describes one Acquire or Renew call to a Backend.
type Request struct {
	// ID is the caller's lock id: any non-empty string. Backends map it to a
	// safe key (hashing it, typically).
	ID string
	// Owner is a random, unique token naming this holder. Renew and Release
	// succeed only for the owner that acquired the lock.
	Owner string
	// Lease is how long the lock stays held without renewal. Always > 0.
	Lease time.Duration
	// StealAfter, when > 0, lets Acquire take over a lock whose holder has not
	// acquired or renewed it within this duration, even if its lease has not
	// expired yet. Zero means only expired leases are taken over.
	StealAfter time.Duration
}

// Grant is the outcome of Backend.Acquire or Backend.Renew.
type Grant struct {
	// Acquired reports whether the caller now holds the lock.
	Acquired bool
	// Token is the fencing token of this holding: strictly greater than every
	// token the backend issued earlier for the same id. Renew returns the same
	// token as the Acquire it extends. Valid only when Acquired.
	Token uint64
	// TookOver reports that Acquire replaced a previous holder whose lease had
	// expired or who was stolen from.
	TookOver bool
	// Remaining, when Acquired is false, is how long the current holder's
	// lease still runs, if the backend knows it (0 when unknown).
	Remaining time.Duration
	// Age, when Acquired is false, is how long before the store answered
	// the current holder acquired the lock or last renewed it, as the store
	// saw those writes, if the backend knows it (0 when unknown). The client
	// uses it only to time its polls (see Client.Acquire): it learns how long
	// an id's holdings last and polls just after the current one should end.
	// An estimate is fine; it is never used to decide who holds the lock.
	Age time.Duration
}

// MaxLease is the longest duration a lock accepts: for Lease (Config.Lease
// and the Lease option), StealAfter and MaxWait. A longer one is refused with
// ErrInvalid before any I/O. A day is far beyond the longest request Cloud
// Run or Cloud Tasks serves (60 and 30 minutes), yet short enough that
// "now + lease" never overflows on any store.
const MaxLease = 24 * time.Hour

// Validate reports whether r is a request a Backend serves: a non-empty ID
// and Owner, 0 < Lease <= MaxLease and 0 <= StealAfter <= MaxLease. The
// error it returns wraps ErrInvalid and names the bad field. The core never
// sends an invalid request; backends call Validate first so that a direct
// caller is refused the same way by every store. A positive duration below a
// store's resolution (1 ns, say) is valid: the store rounds it up, never down
// to zero.
func (r Request) Validate() error {
	switch {
	case r.ID == "":
		return invalid("request: empty lock id")
	case r.Owner == "":
		return invalid("request %q: empty owner", r.ID)
	case r.Lease <= 0 || r.Lease > MaxLease:
		return invalid("request %q: lease %v is not in (0, %v]", r.ID, r.Lease, MaxLease)
	case r.StealAfter < 0 || r.StealAfter > MaxLease:
		return invalid("request %q: StealAfter %v is not in [0, %v]", r.ID, r.StealAfter, MaxLease)
	}
	return nil
}

// Wrapper is how a decorator around a Backend (metrics, tracing, a poll
// counter, a hand-off on Release) keeps the capabilities of the Backend it
// wraps: Unwrap returns that Backend.
//
// Beyond its three methods a Backend may have capabilities that the client
// uses when it finds them: Notifier (it announces releases, so waiters need
// not poll) and InProcessBackend (its locks live in this process only). The
// client looks for each on the Backend it was configured with and then, for
// as long as the value is a Wrapper, on the Backend it wraps — the
// convention of errors.Unwrap. A decorator that does not implement Unwrap
// hides them: a wrapped Notifier's waiters then poll, at up to 1/MinBackoff
// tries a second, instead of being woken within a round trip. A decorator
// that implements a capability itself (a Watch of its own) is found first.
// Unwrap must not return its receiver; a chain is followed for at most 64
// steps.
type Wrapper interface {
	Unwrap() Backend
}

// InProcessBackend is a Backend that says whether its locks live in this
// process's memory only (package memlock's does, and the in-memory store of
// the default client): such locks exclude nothing across instances, which
// Client.InProcess reports and code that needs cross-instance exclusion
// refuses.
type InProcessBackend interface {
	InProcess() bool
}

// A Prober is a Backend that can tell whether a lock is held without
// taking it (packages memlock and dslock, and the in-memory store of the
// default client, implement it). Code that must not wait for a holder to
// notice it, such as park mode's enqueue (package tasks), reads a lock this
// way instead of trying to take it, which would write.
type Prober interface {
	// Probe reports whether id is held now, judged as Acquire judges it (a
	// lease that has ended counts as free), and when held how much of the
	// lease is left. It writes nothing; on Datastore it is one lookup.
	Probe(ctx context.Context, id string) (held bool, remaining time.Duration, err error)
}

// maxUnwrap bounds the chain of Unwrap calls that capability follows.
const maxUnwrap = 64

// capability returns the first value of the chain b, b.Unwrap(), ... that
// implements T.
func capability[T any](b Backend) (T, bool) {
	for range maxUnwrap {
		if b == nil {
			break
		}
		if c, ok := b.(T); ok {
			return c, true
		}
		w, ok := b.(Wrapper)
		if !ok {
			break
		}
		b = w.Unwrap()
	}
	var zero T
	return zero, false
}
