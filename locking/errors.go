package locking

import (
	"errors"
	"fmt"
	"time"
)

var (
	// ErrNotAcquired reports that a lock could not be acquired: it was held
	// and the caller asked not to wait (Wait(false)), or MaxWait passed. The
	// error returned is a *NotAcquiredError, which says which id and, when
	// known, how long the holder's lease still runs. It is djangae's
	// LockAcquisitionError.
	ErrNotAcquired = errors.New("locking: not acquired")

	// ErrLockLost reports that a lock stopped being held before its holder
	// released it: renewals failed until the lease ran out, another owner took
	// it over, or the store no longer has it. Lock.Err, Lock.Release and With
	// return it for a lost lock.
	ErrLockLost = errors.New("locking: lock lost")

	// ErrNotHeld reports, from a Backend, that the owner does not hold the
	// lock (any more); from Lock.Release and Lock.Err, that the lock was
	// released already (by Release, or when its context ended). A lost lock
	// is reported with ErrLockLost instead: one sentinel per meaning.
	ErrNotHeld = errors.New("locking: lock not held")

	// ErrReentrant reports an Acquire or With of a lock that an enclosing
	// With in the same context chain still holds: the same id of the same
	// client and kind, or of the same store value. (A lock from Acquire is
	// not in any context and is not detected.) Locks are not re-entrant; waiting would wait for itself until
	// the caller's context or MaxWait ends. It is returned at once, before
	// any I/O, wrapped in an error that names the id.
	ErrReentrant = errors.New("locking: lock already held by this context (locks are not re-entrant)")

	// ErrNoBackend reports a lock kind for which the client has no backend.
	// It wraps ErrInvalid: the client is configured without it.
	ErrNoBackend = NewInvalid("locking: no backend for this lock kind")

	// ErrInvalid reports bad input: an empty id, a duration that is not
	// positive or is above MaxLease, an unknown kind. It is returned before any I/O.
	ErrInvalid = errors.New("locking: invalid argument")
)

// NotAcquiredError is the error returned when a lock is held by someone else
// and the caller would not, or could no longer, wait for it.
// errors.Is(err, ErrNotAcquired) reports true for it.
type NotAcquiredError struct {
	// ID is the lock id that was not acquired. With nested locks it tells
	// which one failed.
	ID string
	// Remaining is how long the current holder's lease still runs, when the
	// backend reported it; zero when unknown. It is a hint for retrying (the
	// holder may renew or release at any time), not a promise.
	Remaining time.Duration
	// TimedOut reports that MaxWait passed while waiting; false means the
	// caller asked not to wait.
	TimedOut bool
}

func (e *NotAcquiredError) Error() string {
	why := "held by another owner"
	if e.TimedOut {
		why = "max wait passed while held by another owner"
	}
	return fmt.Sprintf("locking: not acquired: %q: %s", e.ID, why)
}

// Is reports whether target is ErrNotAcquired.
func (e *NotAcquiredError) Is(target error) bool { return target == ErrNotAcquired }

// NewInvalid returns a new error whose text is text and that wraps
// ErrInvalid: a package's own sentinel for one kind of bad input or
// configuration (mclock.ErrInvalidOptions, tasks.ErrInvalidConfig, ...), so
// that errors.Is(err, ErrInvalid) alone tells bad configuration from a
// failing store, whichever package refused it.
func NewInvalid(text string) error { return &invalidError{text} }

type invalidError struct{ text string }

func (e *invalidError) Error() string { return e.text }
func (e *invalidError) Unwrap() error { return ErrInvalid }

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, args...)...)
}
