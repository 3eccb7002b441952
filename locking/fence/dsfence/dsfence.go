// Package dsfence keeps a fence (see package fence) in Cloud Datastore
// (Firestore in Datastore mode), inside the caller's own transaction of
// cloud.google.com/go/datastore, so the check composes with the caller's
// other reads and writes:
//
//	_, err := dsClient.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
//		if err := dsfence.Check(tx, "order-42", fence.FromContext(ctx)); err != nil {
//			return err // errors.Is(err, fence.ErrStale): this holder lost its lock
//		}
//		_, err := tx.Put(orderKey, &order)
//		return err
//	})
//
// The fence is kept either on a small record per lock id (Check, Records)
// or on the caller's own entity (Field), at the caller's choice.
//
// Cost. Check reads the fence record in the transaction (one Lookup RPC)
// and, when the token is higher than the highest accepted — the first write
// of a holding — puts the record, which travels in the transaction's own
// commit: no extra RPC, one more entity written. A Field costs nothing
// beyond the entity's own read and write. The fence record is written once
// per holding, well within Datastore's guidance of about one sustained
// write per second per entity for holdings of a second or more.
//
// Racing holders. A transaction that read a fence record conflicts with
// one that raises it, so writes land in token order however a stale holder
// and the next one interleave. With optimistic concurrency the stale
// holder's commit fails and RunInTransaction's retry refuses its token.
// With pessimistic concurrency (Firestore in Datastore mode's default) the
// stale holder's open transaction holds a lock on the record: its write,
// checked before the next holder's, lands first, and the next holder's
// transaction waits or fails with datastore.ErrConcurrentTransaction, to be
// retried. So a holder frozen inside its transaction — between Check and
// commit — delays the next holder's writes until it resumes or Datastore
// ends its transaction; it never lands a write after them.
package dsfence

import (
	"errors"
	"fmt"

	"cloud.google.com/go/datastore"

	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/fence"
)

// DefaultKind is the entity kind of fence records when Records.Kind is empty.
const DefaultKind = "TaskguardFence"

// Property names of a fence record (and of a Field's properties).
const (
	propFormat = "format"
	propLockID = "lockID"
	propToken  = "token"
)

// Records names where fence records are kept: one entity per lock id, under
// Kind in Namespace, named by dslock.KeyName(lockID) (the hex SHA-256 of the
// id, so any id fits a key name). The zero value keeps them under
// DefaultKind in the default namespace.
type Records struct {
	// Kind is the entity kind; empty means DefaultKind.
	Kind string
	// Namespace is the Datastore namespace; empty means the default one.
	Namespace string
}

// Key returns the key of the fence record of lockID.
func (r Records) Key(lockID string) *datastore.Key {
	kind := r.Kind
	if kind == "" {
		kind = DefaultKind
	}
	k := datastore.NameKey(kind, dslock.KeyName(lockID), nil)
	k.Namespace = r.Namespace
	return k
}

// Check is Records{}.Check: the fence record of lockID under DefaultKind in
// the default namespace.
func Check(tx *datastore.Transaction, lockID string, tok fence.Token) error {
	return Records{}.Check(tx, lockID, tok)
}

// Check reads the fence record of lockID in tx and admits tok by the rule
// of fence.State.Admit: it returns nil when tok is at least the highest
// token accepted (and, when it is higher, puts the raised record in tx), and
// otherwise an error, with nothing put: a *fence.StaleError (errors.Is
// fence.ErrStale and locking.ErrLockLost) for a lower token, fence.ErrInvalid
// for a zero token or one without a lock id (checked before any I/O),
// fence.ErrWrongLock for a token of another lock id than lockID,
// fence.ErrForeign for a record at the key that this package did not write,
// or the transaction's own read error. On any error the caller must not
// commit its write; returning the error from the function given to
// RunInTransaction rolls the transaction back.
//
// Check costs one Lookup RPC, and one more entity written in the commit when
// the token rises (see the package documentation).
func (r Records) Check(tx *datastore.Transaction, lockID string, tok fence.Token) error {
	if _, _, err := (fence.State{}).Admit(lockID, tok); err != nil {
		return err // bad input: before any I/O
	}
	if tx == nil {
		return fmt.Errorf("%w: nil transaction", fence.ErrInvalid)
	}
	key := r.Key(lockID)
	var props datastore.PropertyList
	var st fence.State
	switch err := tx.Get(key, &props); {
	case errors.Is(err, datastore.ErrNoSuchEntity):
	case err != nil:
		return fmt.Errorf("dsfence: read fence record of %q: %w", lockID, err)
	default:
		if st, err = decode(props); err != nil {
			return fmt.Errorf("dsfence: fence record %v: %w", key, err)
		}
	}
	next, changed, err := st.Admit(lockID, tok)
	if err != nil || !changed {
		return err
	}
	if _, err := tx.Put(key, encode(next)); err != nil {
		return fmt.Errorf("dsfence: put fence record of %q: %w", lockID, err)
	}
	return nil
}

// decode reads a fence record; anything but the three properties of the
// right types is foreign.
func decode(props datastore.PropertyList) (fence.State, error) {
	var st fence.State
	seen := 0
	for _, p := range props {
		var ok bool
		switch p.Name {
		case propFormat:
			st.Format, ok = p.Value.(string)
		case propLockID:
			st.LockID, ok = p.Value.(string)
		case propToken:
			var v int64
			v, ok = p.Value.(int64)
			ok = ok && v > 0
			st.Highest = uint64(v)
		default:
			return fence.State{}, fmt.Errorf("%w: unexpected property %q", fence.ErrForeign, p.Name)
		}
		if !ok {
			return fence.State{}, fmt.Errorf("%w: property %q holds %T %v", fence.ErrForeign, p.Name, p.Value, p.Value)
		}
		seen++
	}
	if seen != 3 || st.Format != fence.Format {
		return fence.State{}, fmt.Errorf("%w: format marker %q, want %q, and %d of 3 properties", fence.ErrForeign, st.Format, fence.Format, seen)
	}
	return st, nil
}

func encode(st fence.State) *datastore.PropertyList {
	return &datastore.PropertyList{
		{Name: propFormat, Value: st.Format, NoIndex: true},
		{Name: propLockID, Value: st.LockID, NoIndex: true},
		{Name: propToken, Value: int64(st.Highest), NoIndex: true},
	}
}

// Field is a fence kept on the caller's own entity: add it as a struct
// field (a value, not a pointer) of the entity the lock guards, and call
// Admit on the entity read in the transaction before putting it back. It
// costs no RPC of its own. Its zero value has accepted nothing. Its
// properties are unindexed and named after the field ("Fence.token", ...).
//
//	type Order struct {
//		Items []string
//		Fence dsfence.Field
//	}
type Field struct {
	Format string `datastore:"format,noindex"`
	LockID string `datastore:"lockID,noindex"`
	Token  int64  `datastore:"token,noindex"`
}

// Admit admits tok for the entity guarded by lockID by the rule of
// fence.State.Admit, and raises the field when tok is higher than any
// accepted. It returns the same errors as Records.Check, and leaves the
// field unchanged on error; the caller must then not put the entity.
func (f *Field) Admit(lockID string, tok fence.Token) error {
	st := fence.State{Format: f.Format, LockID: f.LockID}
	if f.Token < 0 {
		return fmt.Errorf("%w: token field holds %d", fence.ErrForeign, f.Token)
	}
	st.Highest = uint64(f.Token)
	next, changed, err := st.Admit(lockID, tok)
	if err != nil || !changed {
		return err
	}
	*f = Field{Format: next.Format, LockID: next.LockID, Token: int64(next.Highest)}
	return nil
}
