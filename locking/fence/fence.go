package fence

import (
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/taskguard/taskguard/locking"
)

// Format marks a fence record written by this package (and its store
// subpackages). A record without it, or with another value, was written by
// someone else and is refused with ErrForeign rather than overwritten.
const Format = "taskguard-fence/1"

// MaxToken is the highest token a fence accepts: stores keep signed 64-bit
// integers. Every backend's tokens stay far below it.
const MaxToken = math.MaxInt64

var (
	// ErrStale reports a token lower than the highest the fence has
	// accepted: the holder lost its lock and a later holder has written. The
	// error is a *StaleError, and it matches locking.ErrLockLost too.
	ErrStale = errors.New("fence: stale token (a later holder has written)")

	// ErrWrongLock reports a token of another lock id than the one that
	// guards the resource, or a record that fences another lock id.
	ErrWrongLock = errors.New("fence: token of another lock")

	// ErrForeign reports a fence record that this package did not write:
	// no Format marker, another marker, or fields of the wrong type. It is
	// never overwritten.
	ErrForeign = errors.New("fence: record not written by a taskguard fence")

	// ErrInvalid reports a token that cannot be checked: zero, above
	// MaxToken, or with an empty lock id (no lock held). It is returned
	// before any I/O, and it wraps locking.ErrInvalid.
	ErrInvalid = fmt.Errorf("fence: invalid token: %w", locking.ErrInvalid)
)

// Token is a fencing token with the id of the lock whose holding it names.
type Token struct {
	LockID string
	Value  uint64
}

// Of returns the token of the held lock l (a *locking.Lock from Acquire,
// locking.FromContext, or tasks.Delivery.Lock). For a nil l it returns the
// zero Token, which every check refuses with ErrInvalid.
func Of(l *locking.Lock) Token {
	if l == nil {
		return Token{}
	}
	return Token{LockID: l.ID(), Value: l.Token()}
}

// FromContext returns the token of the lock that locking.With (or
// lockhttp.Guard, or tasks.Worker) holds for the function running with ctx:
// Of(locking.FromContext(ctx)). Outside such a function it returns the zero
// Token, which every check refuses with ErrInvalid.
func FromContext(ctx context.Context) Token {
	return Of(locking.FromContext(ctx))
}

// Validate returns nil for a token a fence can check, otherwise an error
// wrapping ErrInvalid that says what is wrong.
func (t Token) Validate() error {
	switch {
	case t.LockID == "" && t.Value == 0:
		return fmt.Errorf("%w: zero token (no lock held: use fence.Of with a held lock)", ErrInvalid)
	case t.LockID == "":
		return fmt.Errorf("%w: token %d has no lock id", ErrInvalid, t.Value)
	case t.Value == 0:
		return fmt.Errorf("%w: token 0 for lock %q (tokens start at 1)", ErrInvalid, t.LockID)
	case t.Value > MaxToken:
		return fmt.Errorf("%w: token %d for lock %q is above %d", ErrInvalid, t.Value, t.LockID, uint64(MaxToken))
	}
	return nil
}

// StaleError is the error of a refused token. errors.Is matches it with
// ErrStale and with locking.ErrLockLost: its holder has lost the lock.
type StaleError struct {
	LockID  string
	Token   uint64 // the refused token
	Highest uint64 // the highest token the fence has accepted
}

func (e *StaleError) Error() string {
	return fmt.Sprintf("fence: stale token %d for lock %q: the fence has accepted %d (the lock was lost and a later holder has written)",
		e.Token, e.LockID, e.Highest)
}

// Is reports whether target is ErrStale or locking.ErrLockLost.
func (e *StaleError) Is(target error) bool {
	return target == ErrStale || target == locking.ErrLockLost
}

// State is what a fence record keeps. The zero State is a fence that has
// accepted nothing yet.
type State struct {
	Format  string // Format when written by this package
	LockID  string // the lock id that guards the resource
	Highest uint64 // the highest token accepted
}

// IsZero reports whether s is a fence that has accepted nothing.
func (s State) IsZero() bool { return s == State{} }

// Admit applies the fence rule: it checks tok for the resource guarded by
// lockID against s and returns the state to store and whether it differs
// from s (the token is higher than any accepted before). It returns an
// error, and s unchanged, when tok is invalid (ErrInvalid), when tok or s
// belongs to another lock id (ErrWrongLock), when s was not written by this
// package (ErrForeign), or when tok is lower than s.Highest (a *StaleError).
// It does no I/O; the store subpackages call it between their read and
// their write.
func (s State) Admit(lockID string, tok Token) (next State, changed bool, err error) {
	if err := tok.Validate(); err != nil {
		return s, false, err
	}
	if lockID == "" {
		return s, false, fmt.Errorf("%w: empty lock id for the fence", ErrInvalid)
	}
	if tok.LockID != lockID {
		return s, false, fmt.Errorf("%w: the fence is for lock %q, the token %d is of lock %q", ErrWrongLock, lockID, tok.Value, tok.LockID)
	}
	if s.IsZero() {
		return State{Format: Format, LockID: lockID, Highest: tok.Value}, true, nil
	}
	if s.Format != Format {
		return s, false, fmt.Errorf("%w: format marker %q, want %q", ErrForeign, s.Format, Format)
	}
	if s.LockID != lockID {
		return s, false, fmt.Errorf("%w: the record fences lock %q, not %q", ErrWrongLock, s.LockID, lockID)
	}
	if s.Highest == 0 || s.Highest > MaxToken {
		return s, false, fmt.Errorf("%w: highest token %d is out of range", ErrForeign, s.Highest)
	}
	switch {
	case tok.Value < s.Highest:
		return s, false, &StaleError{LockID: lockID, Token: tok.Value, Highest: s.Highest}
	case tok.Value == s.Highest:
		return s, false, nil
	}
	s.Highest = tok.Value
	return s, true, nil
}
