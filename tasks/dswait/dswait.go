package dswait

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"cloud.google.com/go/datastore"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/tasks"
)

// Kinds of the entities this package writes.
const (
	KindList   = "TaskguardWaitList"
	KindWaiter = "TaskguardWaiter"
	KindState  = "TaskguardWaitState"
)

// MaxWait is how long a waiting or running record is kept before its
// expiresAt passes.
const MaxWait = 30 * 24 * time.Hour

// List is a tasks.WaitList in Datastore. It is safe for concurrent use.
type List struct {
	client    *datastore.Client
	namespace string
	now       func() time.Time
}

// Options configures New.
type Options struct {
	// Namespace is the Datastore namespace of the entities; the default
	// namespace when empty.
	Namespace string
}

// New returns a List on client. The caller keeps and closes the client.
func New(client *datastore.Client, opts Options) (*List, error) {
	if client == nil {
		return nil, errors.New("dswait: nil datastore client")
	}
	return &List{client: client, namespace: opts.Namespace, now: time.Now}, nil
}

var _ tasks.WaitList = (*List)(nil)

type stateEntity struct {
	State     int       `datastore:"state,noindex"`
	Runner    string    `datastore:"runner,noindex"`
	Waiter    string    `datastore:"waiter,noindex"`
	Coalesce  bool      `datastore:"coalesce,noindex"`
	ExpiresAt time.Time `datastore:"expiresAt"`
}

type waiterEntity struct {
	Key      string    `datastore:"key,noindex"`
	Arrived  time.Time `datastore:"arrived,noindex"`
	Body     []byte    `datastore:"body,noindex"`
	Coalesce bool      `datastore:"coalesce,noindex"`
}

func hash(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func (l *List) parent(lockID string) *datastore.Key {
	k := datastore.NameKey(KindList, hash(lockID), nil)
	k.Namespace = l.namespace
	return k
}

func (l *List) stateKey(lockID, key string) *datastore.Key {
	k := datastore.NameKey(KindState, hash(key), l.parent(lockID))
	k.Namespace = l.namespace
	return k
}

func (l *List) waiterKey(lockID, name string) *datastore.Key {
	k := datastore.NameKey(KindWaiter, name, l.parent(lockID))
	k.Namespace = l.namespace
	return k
}

// waiterName orders waiters by arrival, then by key (hex keeps byte order).
func waiterName(w tasks.Waiter) string {
	return fmt.Sprintf("%020d-%s", uint64(w.Arrived.UnixNano()), hex.EncodeToString([]byte(w.Key)))
}

// getState reads key's state entity in tx (or outside one when tx is nil);
// found is false when there is none.
func (l *List) getState(ctx context.Context, tx *datastore.Transaction, k *datastore.Key) (stateEntity, bool, error) {
	var e stateEntity
	var err error
	if tx != nil {
		err = tx.Get(k, &e)
	} else {
		err = l.client.Get(ctx, k, &e)
	}
	if errors.Is(err, datastore.ErrNoSuchEntity) {
		return stateEntity{}, false, nil
	}
	if err != nil {
		return stateEntity{}, false, err
	}
	return e, true, nil
}

// maxAttempts bounds the attempts of a transaction that conflicts with
// others on the same record.
const maxAttempts = 12

// transact runs fn in a transaction, again after a conflict, with a
// growing, jittered pause between attempts.
func (l *List) transact(ctx context.Context, fn func(tx *datastore.Transaction) error) error {
	var err error
	for attempt := range maxAttempts {
		if _, err = l.client.RunInTransaction(ctx, fn, datastore.MaxAttempts(1)); !errors.Is(err, datastore.ErrConcurrentTransaction) {
			return err
		}
		pause := time.Duration(attempt+1) * 5 * time.Millisecond
		select {
		case <-time.After(pause + rand.N(pause)):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return err
}

// Park implements tasks.WaitList. A known key is answered from a lookup;
// a new one is created by one commit of two insert mutations, which fails
// as a whole with ALREADY_EXISTS when another delivery created the record
// first (then that record is read). No transaction: a burst of deliveries
// parking one key (a coalescing job) does not contend for locks.
func (l *List) Park(ctx context.Context, lockID string, w tasks.Waiter) (tasks.WaiterState, error) {
	sk := l.stateKey(lockID, w.Key)
	for range 2 {
		e, found, err := l.getState(ctx, nil, sk)
		if err != nil {
			return tasks.Absent, fmt.Errorf("dswait: park %q: %w", w.Key, err)
		}
		if found {
			return tasks.WaiterState(e.State), nil
		}
		name := waiterName(w)
		ns := stateEntity{State: int(tasks.Waiting), Waiter: name, Coalesce: w.Coalesce, ExpiresAt: l.now().Add(MaxWait)}
		we := waiterEntity{Key: w.Key, Arrived: w.Arrived, Body: w.Body, Coalesce: w.Coalesce}
		_, err = l.client.Mutate(ctx, datastore.NewInsert(sk, &ns), datastore.NewInsert(l.waiterKey(lockID, name), &we))
		if err == nil {
			return tasks.Waiting, nil
		}
		if !alreadyExists(err) {
			return tasks.Absent, fmt.Errorf("dswait: park %q: %w", w.Key, err)
		}
	}
	return tasks.Absent, fmt.Errorf("dswait: park %q: created and gone at once", w.Key)
}

// alreadyExists reports whether err (or one of a MultiError's) is
// ALREADY_EXISTS.
func alreadyExists(err error) bool {
	var me datastore.MultiError
	if errors.As(err, &me) {
		for _, e := range me {
			if e != nil && alreadyExists(e) {
				return true
			}
		}
		return false
	}
	return status.Code(err) == codes.AlreadyExists
}

// Oldest implements tasks.WaitList.
func (l *List) Oldest(ctx context.Context, lockID string) (tasks.Waiter, bool, error) {
	q := datastore.NewQuery(KindWaiter).Ancestor(l.parent(lockID)).Namespace(l.namespace).Limit(1)
	var es []waiterEntity
	if _, err := l.client.GetAll(ctx, q, &es); err != nil {
		return tasks.Waiter{}, false, fmt.Errorf("dswait: oldest of %q: %w", lockID, err)
	}
	if len(es) == 0 {
		return tasks.Waiter{}, false, nil
	}
	e := es[0]
	return tasks.Waiter{Key: e.Key, Arrived: e.Arrived, Body: e.Body, Coalesce: e.Coalesce}, true, nil
}

// State implements tasks.WaitList.
func (l *List) State(ctx context.Context, lockID, key string) (tasks.WaiterState, string, error) {
	e, found, err := l.getState(ctx, nil, l.stateKey(lockID, key))
	if err != nil {
		return tasks.Absent, "", fmt.Errorf("dswait: state of %q: %w", key, err)
	}
	if !found {
		return tasks.Absent, "", nil
	}
	return tasks.WaiterState(e.State), e.Runner, nil
}

// Claim implements tasks.WaitList.
func (l *List) Claim(ctx context.Context, lockID, key, runner string) (bool, error) {
	sk := l.stateKey(lockID, key)
	var ok bool
	err := l.transact(ctx, func(tx *datastore.Transaction) error {
		ok = false
		e, found, err := l.getState(ctx, tx, sk)
		if err != nil || !found {
			return err
		}
		switch tasks.WaiterState(e.State) {
		case tasks.Running:
			ok = e.Runner == runner
			return nil
		case tasks.Waiting:
		default:
			return nil
		}
		if err := tx.Delete(l.waiterKey(lockID, e.Waiter)); err != nil {
			return err
		}
		ok = true
		if e.Coalesce {
			return tx.Delete(sk)
		}
		e.State, e.Runner, e.ExpiresAt = int(tasks.Running), runner, l.now().Add(MaxWait)
		_, err = tx.Put(sk, &e)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("dswait: claim %q: %w", key, err)
	}
	return ok, nil
}

// Finish implements tasks.WaitList.
func (l *List) Finish(ctx context.Context, lockID, key string) error {
	sk := l.stateKey(lockID, key)
	err := l.transact(ctx, func(tx *datastore.Transaction) error {
		e, found, err := l.getState(ctx, tx, sk)
		if err != nil {
			return err
		}
		if found && tasks.WaiterState(e.State) == tasks.Waiting {
			if err := tx.Delete(l.waiterKey(lockID, e.Waiter)); err != nil {
				return err
			}
		}
		_, err = tx.Put(sk, &stateEntity{State: int(tasks.Finished), ExpiresAt: l.now().Add(tasks.FinishedRetention)})
		return err
	})
	if err != nil {
		return fmt.Errorf("dswait: finish %q: %w", key, err)
	}
	return nil
}
