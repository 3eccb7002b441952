package dswait

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"strconv"
	"sync"
	"time"

	"cloud.google.com/go/datastore"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/tasks"
)

// Kinds of the entities this package writes.
const (
	KindWake   = "TaskguardWaitWake"
	KindRecord = "TaskguardWaitRecord"
	KindRun    = "TaskguardWaitRun"
	KindBody   = "TaskguardWaitBody"
)

// Kinds are the kinds this package writes; each has expiresAt (unindexed),
// for a TTL policy (deploy/02-datastore.sh sets one on each).
var Kinds = []string{KindRecord, KindRun, KindBody, KindWake}

// MaxWait is how long a record that waits or runs, and a lock id's head, are
// kept after their last write before their expiresAt passes (garbage
// collection by a TTL policy; never read for correctness).
const MaxWait = 30 * 24 * time.Hour

// bodyPart is the largest part of a body kept in one KindBody entity
// (Datastore's entity limit is 1 MiB); inlineBody the largest body kept in
// its record.
const (
	bodyPart   = 900_000
	inlineBody = 32 << 10
)

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

// wakeEntity is a lock id's pending wake of one kind: it exists while the
// wake is pending. Arming inserts it (an insert that fails when it exists
// decides between concurrent arms, without a transaction); taking it
// deletes it, in a transaction that checks its generation.
type wakeEntity struct {
	Epoch     int64     `datastore:"epoch,noindex"`
	Gen       int64     `datastore:"gen,noindex"`
	Due       time.Time `datastore:"due,noindex"`
	ExpiresAt time.Time `datastore:"expiresAt,noindex"`
}

// recordEntity is a waiter record, named by its key (and, as a run, by its
// runner).
type recordEntity struct {
	Key    string `datastore:"key,noindex"`
	State  int    `datastore:"state,noindex"`
	Runner string `datastore:"runner,noindex"`
	// Q is set while the record waits, and indexed: the hash of the lock
	// id, the arrival and the key, so that the lock id's waiters are a range
	// of the index in FIFO order.
	Q        string    `datastore:"q,omitempty"`
	Arrived  time.Time `datastore:"arrived,noindex"`
	Job      string    `datastore:"job,noindex"`
	Coalesce bool      `datastore:"coalesce,noindex"`
	// A body of at most inlineBody bytes is kept in Body; a larger one
	// apart, in BodyParts KindBody entities named from BodyName (unique for
	// every park), so that records stay small.
	Body       []byte    `datastore:"body,noindex"`
	BodyName   string    `datastore:"bodyName,noindex"`
	BodyParts  int       `datastore:"bodyParts,noindex"`
	FinishedAt time.Time `datastore:"finishedAt,noindex"`
	ExpiresAt  time.Time `datastore:"expiresAt,noindex"`
}

// bodyEntity is a part of a waiter's body.
type bodyEntity struct {
	Body      []byte    `datastore:"body,noindex"`
	ExpiresAt time.Time `datastore:"expiresAt,noindex"`
}

func hash(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))
}

func (l *List) wakeKey(lockID string, kind tasks.WakeKind) *datastore.Key {
	return l.child(KindWake, hash(lockID, kind.String()), nil)
}

func (l *List) child(kind, name string, parent *datastore.Key) *datastore.Key {
	k := datastore.NameKey(kind, name, parent)
	k.Namespace = l.namespace
	return k
}

// Every entity but a large body's rest is a root entity: no two records
// share an entity group.

func (l *List) recordKey(lockID, key string) *datastore.Key {
	return l.child(KindRecord, hash(lockID, key), nil)
}

func (l *List) runKey(lockID, runner string) *datastore.Key {
	return l.child(KindRun, hash(lockID, runner), nil)
}

// queuePos orders a lock id's waiters by arrival, then by key (hex keeps
// byte order), after a prefix of the lock id's hash that spreads lock ids
// over the index.
func queuePos(lockID string, w tasks.Waiter) string {
	return fmt.Sprintf("%s-%020d-%s", hash(lockID), uint64(w.Arrived.UnixNano()), hex.EncodeToString([]byte(w.Key)))
}

func (l *List) bodyKeys(name string, parts int) []*datastore.Key {
	var ks []*datastore.Key
	for i := range parts {
		ks = append(ks, l.child(KindBody, fmt.Sprintf("%s/%d", name, i), nil))
	}
	return ks
}

// found reads the outcome of a GetMulti: which entities were found, or the
// first error other than a missing entity.
func found(err error, n int) ([]bool, error) {
	ok := make([]bool, n)
	if err == nil {
		for i := range ok {
			ok[i] = true
		}
		return ok, nil
	}
	var me datastore.MultiError
	if !errors.As(err, &me) {
		return nil, err
	}
	for i, e := range me {
		switch {
		case e == nil:
			ok[i] = true
		case errors.Is(e, datastore.ErrNoSuchEntity):
		default:
			return nil, e
		}
	}
	return ok, nil
}

// live reports whether a found record counts (a Finished one past
// FinishedRetention counts as absent).
func (l *List) live(r recordEntity, ok bool) bool {
	return ok && !(tasks.WaiterState(r.State) == tasks.Finished && l.now().Sub(r.FinishedAt) > tasks.FinishedRetention)
}

// maxAttempts bounds the attempts of a transaction that conflicts with
// others on the same lock id; between attempts it pauses a random time up
// to a bound that doubles from 10 ms to maxPause.
const (
	maxAttempts = 40
	maxPause    = 500 * time.Millisecond
)

// retryable reports a transaction that may succeed when tried again: a
// conflict at commit, or a read or commit aborted by contention.
func retryable(err error) bool {
	return errors.Is(err, datastore.ErrConcurrentTransaction) || status.Code(err) == codes.Aborted
}

// transact runs fn in a transaction, again after a conflict or an abort,
// with a growing, jittered pause between attempts. An attempt is 3 RPCs:
// begin, lookup, commit. (With datastore.BeginLater, which would begin it
// with the lookup, the conformance tests' transactions on the Firestore
// emulator were retried until their deadline: not used.)
func (l *List) transact(ctx context.Context, fn func(tx *datastore.Transaction) error) error {
	var err error
	for attempt := range maxAttempts {
		_, err = l.client.RunInTransaction(ctx, fn, datastore.MaxAttempts(1))
		if !retryable(err) {
			return err
		}
		pause := min(10*time.Millisecond<<min(attempt, 10), maxPause)
		select {
		case <-time.After(pause/4 + mrand.N(pause)):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return err
}

// randomID returns a positive random 63-bit number: wake names built from
// two of them never repeat.
func randomID() int64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return int64(binary.BigEndian.Uint64(b[:])>>1) | 1
}

// head returns lockID's oldest waiting record: a query of lockID's range
// of the q index (an inequality and an order on one property, served by
// the built-in index: no index.yaml; strongly consistent in Firestore in
// Datastore mode). Records are small: their bodies are kept apart.
func (l *List) head(ctx context.Context, lockID string) (tasks.Waiter, bool, error) {
	prefix := hash(lockID)
	q := datastore.NewQuery(KindRecord).Namespace(l.namespace).
		FilterField("q", ">=", prefix+"-").FilterField("q", "<", prefix+".").Order("q").Limit(1)
	var es []recordEntity
	if _, err := l.client.GetAll(ctx, q, &es); err != nil {
		return tasks.Waiter{}, false, err
	}
	if len(es) == 0 {
		return tasks.Waiter{}, false, nil
	}
	return tasks.Waiter{Key: es[0].Key, Job: es[0].Job, Arrived: es[0].Arrived, Coalesce: es[0].Coalesce}, true, nil
}

// armHead arms a wake of kind due at due for lockID, whose oldest waiter
// is head, unless one is pending that the rule (tasks.Supersedes) keeps:
// 1 lookup, and 1 commit (an insert) when it arms; a transaction instead
// when it supersedes a pending one.
func (l *List) armHead(ctx context.Context, lockID string, head tasks.Waiter, kind tasks.WakeKind, due time.Time) (tasks.Wake, error) {
	cur, pending, err := l.readWake(ctx, lockID, kind)
	if err != nil {
		return tasks.Wake{}, err
	}
	return l.armRead(ctx, lockID, head, kind, due, cur, pending)
}

// readWake reads lockID's pending wake of kind, if any.
func (l *List) readWake(ctx context.Context, lockID string, kind tasks.WakeKind) (wakeEntity, bool, error) {
	var cur wakeEntity
	err := l.client.Get(ctx, l.wakeKey(lockID, kind), &cur)
	if errors.Is(err, datastore.ErrNoSuchEntity) {
		return wakeEntity{}, false, nil
	}
	return cur, err == nil, err
}

// armRead is armHead once the pending wake has been read.
func (l *List) armRead(ctx context.Context, lockID string, head tasks.Waiter, kind tasks.WakeKind, due time.Time, cur wakeEntity, pending bool) (tasks.Wake, error) {
	wk := l.wakeKey(lockID, kind)
	var err error
	if pending && !tasks.Supersedes(kind, cur.Due, due, l.now()) {
		return tasks.Wake{}, nil
	}
	e := wakeEntity{Epoch: randomID(), Gen: randomID(), Due: due.UTC(), ExpiresAt: due.Add(MaxWait).UTC()}
	wake := tasks.Wake{Kind: kind, Epoch: uint64(e.Epoch), Gen: uint64(e.Gen), Due: due, Job: head.Job}
	if !pending {
		_, err = l.client.Mutate(ctx, datastore.NewInsert(wk, &e))
		if alreadyExists(err) {
			return tasks.Wake{}, nil // armed by a concurrent caller
		}
		if err != nil {
			return tasks.Wake{}, err
		}
		return wake, nil
	}
	armed := false
	err = l.transact(ctx, func(tx *datastore.Transaction) error {
		armed = false
		var cur wakeEntity
		if err := tx.Get(wk, &cur); err == nil && !tasks.Supersedes(kind, cur.Due, due, l.now()) {
			return nil
		} else if err != nil && !errors.Is(err, datastore.ErrNoSuchEntity) {
			return err
		}
		armed = true
		_, err := tx.Put(wk, &e)
		return err
	})
	if err != nil || !armed {
		return tasks.Wake{}, err
	}
	return wake, nil
}

// writeBody writes body in parts, before the record that names it: a
// failure leaves at most parts that no record names (removed by the TTL
// policy on their expiresAt), never a record without its body.
func (l *List) writeBody(ctx context.Context, name string, body []byte) (int, error) {
	parts := max((len(body)+bodyPart-1)/bodyPart, 1)
	keys := l.bodyKeys(name, parts)
	exp := l.now().Add(MaxWait).UTC()
	var muts []*datastore.Mutation
	for i, k := range keys {
		part := body[min(i*bodyPart, len(body)):min((i+1)*bodyPart, len(body))]
		muts = append(muts, datastore.NewUpsert(k, &bodyEntity{Body: part, ExpiresAt: exp}))
	}
	_, err := l.client.Mutate(ctx, muts...)
	return parts, err
}

// readBody reads a body written by writeBody.
func (l *List) readBody(get func([]*datastore.Key, any) error, name string, parts int) ([]byte, error) {
	bs := make([]bodyEntity, parts)
	if err := get(l.bodyKeys(name, parts), bs); err != nil {
		return nil, fmt.Errorf("reading the body: %w", err)
	}
	var body []byte
	for _, b := range bs {
		body = append(body, b.Body...)
	}
	return body, nil
}

// Park implements tasks.WaitList: for a new key, 1 commit of one insert
// (the record, its body inline: all or nothing; a body over inlineBody is
// written apart first, 1 commit more); for a key that has a record, that
// insert fails and 1 lookup reads the record; then the Safety wake: 1 query
// and 1 lookup sent together, and 1 insert when it arms one, about once a
// lease.
func (l *List) Park(ctx context.Context, lockID string, w tasks.Waiter, safetyDue time.Time) (tasks.WaiterState, bool, tasks.Wake, error) {
	rk := l.recordKey(lockID, w.Key)
	st, created := tasks.Waiting, false
	rec := recordEntity{Key: w.Key, State: int(tasks.Waiting), Q: queuePos(lockID, w), Arrived: w.Arrived.UTC(), Job: w.Job,
		Coalesce: w.Coalesce, ExpiresAt: l.now().Add(MaxWait).UTC()}
	if len(w.Body) <= inlineBody {
		rec.Body = w.Body
	} else {
		rec.BodyName = hash(lockID, w.Key, strconv.FormatInt(l.now().UnixNano(), 10), strconv.FormatUint(mrand.Uint64(), 10))
		var err error
		if rec.BodyParts, err = l.writeBody(ctx, rec.BodyName, w.Body); err != nil {
			return tasks.Absent, false, tasks.Wake{}, fmt.Errorf("dswait: park %q: writing its body: %w", w.Key, err)
		}
	}
	// The insert decides for a new key; for a key that has a record (a
	// retry or duplicate of a park, or a task that ran) it fails, and the
	// record is read: a finished one past its retention is replaced.
	_, err := l.client.Mutate(ctx, datastore.NewInsert(rk, &rec))
	created = err == nil
	for attempt := 0; !created; attempt++ {
		if !alreadyExists(err) || attempt > 1 {
			return tasks.Absent, false, tasks.Wake{}, fmt.Errorf("dswait: park %q: %w", w.Key, err)
		}
		var known recordEntity
		if err = l.client.Get(ctx, rk, &known); errors.Is(err, datastore.ErrNoSuchEntity) {
			// Deleted since (a coalescing record claimed): insert again.
			_, err = l.client.Mutate(ctx, datastore.NewInsert(rk, &rec))
			created = err == nil
			continue
		} else if err != nil {
			return tasks.Absent, false, tasks.Wake{}, fmt.Errorf("dswait: park %q: %w", w.Key, err)
		}
		if l.live(known, true) {
			st = tasks.WaiterState(known.State)
			break
		}
		err = l.transact(ctx, func(tx *datastore.Transaction) error {
			var cur recordEntity
			if err := tx.Get(rk, &cur); err == nil && l.live(cur, true) {
				return status.Error(codes.AlreadyExists, "record exists")
			}
			_, err := tx.Put(rk, &rec)
			return err
		})
		created = err == nil
	}
	if st != tasks.Waiting {
		return st, false, tasks.Wake{}, nil
	}
	head := tasks.Waiter{Key: w.Key, Job: w.Job}
	var (
		wg      sync.WaitGroup
		cur     wakeEntity
		pending bool
		werr    error
	)
	wg.Go(func() { cur, pending, werr = l.readWake(ctx, lockID, tasks.Safety) })
	h, ok, err := l.head(ctx, lockID)
	wg.Wait()
	if err != nil {
		return st, created, tasks.Wake{}, fmt.Errorf("dswait: park %q: %w", w.Key, err)
	} else if ok {
		head = h
	}
	var wake tasks.Wake
	if err = werr; err == nil {
		wake, err = l.armRead(ctx, lockID, head, tasks.Safety, safetyDue, cur, pending)
	}
	if err != nil {
		return st, created, tasks.Wake{}, fmt.Errorf("dswait: park %q: arming its safety wake: %w", w.Key, err)
	}
	if wake.IsZero() && !created && pending {
		// A retry or duplicate of a park: the pending Safety may never have
		// been created (its creator died, or its Disarm failed); creating
		// it again under its name is idempotent.
		wake = tasks.Wake{Kind: tasks.Safety, Epoch: uint64(cur.Epoch), Gen: uint64(cur.Gen), Due: cur.Due, Job: head.Job}
	}
	return st, created, wake, nil
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

// Peek implements tasks.WaitList: 1 query and, for a key, 1 lookup, sent
// together.
func (l *List) Peek(ctx context.Context, lockID, key string) (tasks.Waiter, bool, tasks.WaiterState, string, error) {
	var (
		wg       sync.WaitGroup
		rec      recordEntity
		recErr   error
		st       = tasks.Absent
		runner   string
		head     tasks.Waiter
		ok       bool
		queryErr error
	)
	if key != "" {
		wg.Go(func() {
			recErr = l.client.Get(ctx, l.recordKey(lockID, key), &rec)
			if errors.Is(recErr, datastore.ErrNoSuchEntity) {
				recErr = nil
			} else if recErr == nil && l.live(rec, true) {
				st, runner = tasks.WaiterState(rec.State), rec.Runner
			}
		})
	}
	head, ok, queryErr = l.head(ctx, lockID)
	wg.Wait()
	if err := errors.Join(queryErr, recErr); err != nil {
		return tasks.Waiter{}, false, tasks.Absent, "", fmt.Errorf("dswait: peek %q: %w", lockID, err)
	}
	return head, ok, st, runner, nil
}

// Arm implements tasks.WaitList: 1 query (the oldest waiter) and 1 lookup
// (the pending wake), sent together, and 1 commit (an insert) when it arms
// a wake.
func (l *List) Arm(ctx context.Context, lockID string, kind tasks.WakeKind, due time.Time) (tasks.Wake, error) {
	// The query and the lookup are sent together.
	var (
		wg      sync.WaitGroup
		cur     wakeEntity
		pending bool
		werr    error
	)
	wg.Go(func() { cur, pending, werr = l.readWake(ctx, lockID, kind) })
	head, ok, err := l.head(ctx, lockID)
	wg.Wait()
	if err = errors.Join(err, werr); err == nil && ok {
		var w tasks.Wake
		if w, err = l.armRead(ctx, lockID, head, kind, due, cur, pending); err == nil {
			return w, nil
		}
	}
	if err != nil {
		return tasks.Wake{}, fmt.Errorf("dswait: arm %q: %w", lockID, err)
	}
	return tasks.Wake{}, nil
}

// Disarm implements tasks.WaitList: a transaction of 1 lookup and 1
// commit.
func (l *List) Disarm(ctx context.Context, lockID string, w tasks.Wake) error {
	if _, err := l.take(ctx, lockID, w.Kind, w.Gen); err != nil {
		return fmt.Errorf("dswait: disarm %q: %w", lockID, err)
	}
	return nil
}

// take deletes lockID's pending wake of kind if its generation is gen.
func (l *List) take(ctx context.Context, lockID string, kind tasks.WakeKind, gen uint64) (bool, error) {
	wk := l.wakeKey(lockID, kind)
	ok := false
	err := l.transact(ctx, func(tx *datastore.Transaction) error {
		ok = false
		var cur wakeEntity
		if err := tx.Get(wk, &cur); err != nil {
			if errors.Is(err, datastore.ErrNoSuchEntity) {
				return nil
			}
			return err
		}
		if uint64(cur.Gen) != gen {
			return nil
		}
		ok = true
		return tx.Delete(wk)
	})
	return ok, err
}

// Take implements tasks.WaitList: a transaction of 1 lookup and 1 commit,
// and, with a safetyDue, 1 query and what arming costs (see Park).
func (l *List) Take(ctx context.Context, lockID string, kind tasks.WakeKind, gen uint64, safetyDue time.Time) (bool, tasks.Wake, error) {
	ok, err := l.take(ctx, lockID, kind, gen)
	var wake tasks.Wake
	if err == nil && !safetyDue.IsZero() {
		var head tasks.Waiter
		var anyone bool
		if head, anyone, err = l.head(ctx, lockID); err == nil && anyone {
			wake, err = l.armHead(ctx, lockID, head, tasks.Safety, safetyDue)
		}
	}
	if err != nil {
		return false, tasks.Wake{}, fmt.Errorf("dswait: take a wake of %q: %w", lockID, err)
	}
	return ok, wake, nil
}

// Claim implements tasks.WaitList: a transaction of 1 lookup (record and
// run) and 1 commit (and 1 lookup of a body kept apart).
func (l *List) Claim(ctx context.Context, lockID, key, runner string) (tasks.Waiter, bool, error) {
	var (
		got recordEntity
		ok  bool
	)
	rk, uk := l.recordKey(lockID, key), l.runKey(lockID, runner)
	err := l.transact(ctx, func(tx *datastore.Transaction) error {
		ok = false
		recs := make([]recordEntity, 2)
		fs, err := found(tx.GetMulti([]*datastore.Key{rk, uk}, recs), 2)
		if err != nil {
			return err
		}
		rec, run := recs[0], recs[1]
		if fs[1] && run.Key == key {
			got, ok = run, true
			return nil
		}
		if !fs[0] || tasks.WaiterState(rec.State) != tasks.Waiting {
			return nil
		}
		run, err = l.claimIn(tx, rk, uk, rec, runner)
		got, ok = run, err == nil
		return err
	})
	return l.claimed(ctx, got, ok, err, "claim", key)
}

// TakeClaim implements tasks.WaitList: a transaction of 1 lookup (the
// wake, the runner's run and the record) and 1 commit (and 1 lookup of a
// body kept apart).
func (l *List) TakeClaim(ctx context.Context, lockID string, kind tasks.WakeKind, gen uint64, key, runner string) (tasks.Waiter, bool, error) {
	var (
		got recordEntity
		ok  bool
	)
	wk, uk := l.wakeKey(lockID, kind), l.runKey(lockID, runner)
	keys := []*datastore.Key{wk, uk}
	if key != "" {
		keys = append(keys, l.recordKey(lockID, key))
	}
	err := l.transact(ctx, func(tx *datastore.Transaction) error {
		ok = false
		var (
			wake wakeEntity
			recs = make([]recordEntity, 2)
		)
		dst := []any{&wake, &recs[0], &recs[1]}
		fs, err := found(tx.GetMulti(keys, dst[:len(keys)]), len(keys))
		if err != nil {
			return err
		}
		if fs[0] && uint64(wake.Gen) == gen {
			if err := tx.Delete(wk); err != nil {
				return err
			}
		}
		if fs[1] {
			got, ok = recs[0], true
			return nil
		}
		if key == "" || !fs[2] || tasks.WaiterState(recs[1].State) != tasks.Waiting {
			return nil
		}
		run, err := l.claimIn(tx, keys[2], uk, recs[1], runner)
		got, ok = run, err == nil
		return err
	})
	return l.claimed(ctx, got, ok, err, "take a wake and claim", key)
}

// errStaleHead ends a FinishClaim transaction whose head query named a
// record that no longer waits: it is tried again with a new query.
var errStaleHead = errors.New("dswait: the oldest waiter changed")

// errNotDone is a FinishClaim whose done is not its runner's claim.
var errNotDone = errors.New("dswait: FinishClaim of a record that is not the runner's claim")

// FinishClaim implements tasks.WaitList: the head query sent with the
// transaction's begin, then 1 lookup (the runner's run, done's record and
// the head's) and 1 commit: 4 RPCs in 3 round trips (and 1 lookup of a body
// kept apart, and 1 commit deleting done's body kept apart).
func (l *List) FinishClaim(ctx context.Context, lockID, done, runner string) (tasks.Waiter, bool, error) {
	type headResult struct {
		w   tasks.Waiter
		ok  bool
		err error
	}
	var (
		got    recordEntity
		ok     bool
		bodies []*datastore.Key
		err    error
	)
	uk := l.runKey(lockID, runner)
	for range maxAttempts {
		hc := make(chan headResult, 1)
		go func() {
			w, ok, err := l.head(ctx, lockID)
			hc <- headResult{w, ok, err}
		}()
		var h *headResult
		err = l.transact(ctx, func(tx *datastore.Transaction) error {
			ok, bodies = false, nil
			if h == nil {
				r := <-hc
				h = &r
			} else {
				// An attempt after a conflict: the head may have moved.
				w, found, err := l.head(ctx, lockID)
				h = &headResult{w, found, err}
			}
			if h.err != nil {
				return h.err
			}
			keys := []*datastore.Key{uk}
			di, ki := -1, -1 // done's and the head's records in keys
			if done != "" {
				di, keys = len(keys), append(keys, l.recordKey(lockID, done))
			}
			switch {
			case h.ok && h.w.Key == done:
				ki = di // a coalescing record's key, parked again while it ran
			case h.ok:
				ki, keys = len(keys), append(keys, l.recordKey(lockID, h.w.Key))
			}
			recs := make([]recordEntity, len(keys))
			fs, err := found(tx.GetMulti(keys, recs), len(keys))
			if err != nil {
				return err
			}
			run, claimed := recs[0], fs[0]
			if claimed && run.Key != done || !claimed && done != "" {
				return fmt.Errorf("%w: runner %q's claim is %q, not %q", errNotDone, runner, run.Key, done)
			}
			var next recordEntity
			if ki >= 0 {
				next = recs[ki]
				if !fs[ki] || tasks.WaiterState(next.State) != tasks.Waiting {
					return errStaleHead
				}
			}
			if done != "" {
				bodies = l.bodyKeys(run.BodyName, run.BodyParts)
				if !run.Coalesce {
					// As Finish: done's record is finished (a coalescing run
					// leaves the key's record, a newer waiter, as it is).
					if fs[di] {
						bodies = append(bodies, l.bodyKeys(recs[di].BodyName, recs[di].BodyParts)...)
					}
					if err := l.finishIn(tx, keys[di], done); err != nil {
						return err
					}
					if ki == di {
						return errStaleHead // the head was done's record, now finished
					}
				}
			}
			if ki < 0 {
				if claimed {
					return tx.Delete(uk)
				}
				return nil
			}
			run, err = l.claimIn(tx, keys[ki], uk, next, runner)
			got, ok = run, err == nil
			return err
		})
		if !errors.Is(err, errStaleHead) {
			break
		}
	}
	if err == nil {
		l.dropBodies(ctx, bodies)
	}
	return l.claimed(ctx, got, ok, err, "finish "+strconv.Quote(done)+" and claim the oldest waiter of", lockID)
}

// claimed turns the outcome of a claiming transaction (Claim, TakeClaim)
// into their results: the claimed run as a Waiter, its body read, or the
// error, wrapped with what was done to key.
func (l *List) claimed(ctx context.Context, got recordEntity, ok bool, err error, what, key string) (tasks.Waiter, bool, error) {
	if err == nil && ok {
		var w tasks.Waiter
		if w, err = l.waiter(ctx, got); err == nil {
			return w, true, nil
		}
	}
	if err != nil {
		return tasks.Waiter{}, false, fmt.Errorf("dswait: %s %q: %w", what, key, err)
	}
	return tasks.Waiter{}, false, nil
}

// claimIn writes, in tx, the claim of the waiting record rec (at rk) by
// runner (its run at uk), and returns the run.
func (l *List) claimIn(tx *datastore.Transaction, rk, uk *datastore.Key, rec recordEntity, runner string) (recordEntity, error) {
	run := rec
	run.State, run.Runner, run.Q = int(tasks.Running), runner, ""
	if _, err := tx.Put(uk, &run); err != nil {
		return recordEntity{}, err
	}
	if rec.Coalesce {
		return run, tx.Delete(rk)
	}
	rec.State, rec.Runner, rec.Q = int(tasks.Running), runner, ""
	rec.Body, rec.BodyName, rec.BodyParts = nil, "", 0
	rec.ExpiresAt = l.now().Add(MaxWait).UTC()
	_, err := tx.Put(rk, &rec)
	return run, err
}

// waiter reads r's body and returns it as a Waiter.
func (l *List) waiter(ctx context.Context, r recordEntity) (tasks.Waiter, error) {
	if r.BodyParts == 0 {
		return tasks.Waiter{Key: r.Key, Arrived: r.Arrived, Job: r.Job, Body: r.Body, Coalesce: r.Coalesce}, nil
	}
	body, err := l.readBody(func(ks []*datastore.Key, dst any) error { return l.client.GetMulti(ctx, ks, dst) }, r.BodyName, r.BodyParts)
	if err != nil {
		return tasks.Waiter{}, err
	}
	return tasks.Waiter{Key: r.Key, Arrived: r.Arrived, Job: r.Job, Body: body, Coalesce: r.Coalesce}, nil
}

// Running implements tasks.WaitList: 1 lookup (2 for a body kept apart).
func (l *List) Running(ctx context.Context, lockID, runner string) (tasks.Waiter, bool, error) {
	var r recordEntity
	err := l.client.Get(ctx, l.runKey(lockID, runner), &r)
	if errors.Is(err, datastore.ErrNoSuchEntity) {
		return tasks.Waiter{}, false, nil
	}
	var w tasks.Waiter
	if err == nil {
		w, err = l.waiter(ctx, r)
	}
	if err != nil {
		return tasks.Waiter{}, false, fmt.Errorf("dswait: running %q: %w", runner, err)
	}
	return w, true, nil
}

// Finish implements tasks.WaitList: a transaction of 1 lookup and 1
// commit (and 1 commit deleting a body kept apart).
func (l *List) Finish(ctx context.Context, lockID, key, runner string) error {
	rk := l.recordKey(lockID, key)
	var bodies []*datastore.Key
	err := l.transact(ctx, func(tx *datastore.Transaction) error {
		bodies = nil
		keys := []*datastore.Key{rk}
		if runner != "" {
			keys = append(keys, l.runKey(lockID, runner))
		}
		recs := make([]recordEntity, len(keys))
		fs, err := found(tx.GetMulti(keys, recs), len(keys))
		if err != nil {
			return err
		}
		if runner != "" && fs[1] && recs[1].Key == key {
			if err := tx.Delete(keys[1]); err != nil {
				return err
			}
			bodies = l.bodyKeys(recs[1].BodyName, recs[1].BodyParts)
			if recs[1].Coalesce {
				return nil // the key's record, if any, is a newer waiter
			}
		}
		if fs[0] {
			bodies = append(bodies, l.bodyKeys(recs[0].BodyName, recs[0].BodyParts)...)
		}
		return l.finishIn(tx, rk, key)
	})
	if err != nil {
		return fmt.Errorf("dswait: finish %q: %w", key, err)
	}
	l.dropBodies(ctx, bodies)
	return nil
}

// finishIn writes, in tx, key's record (at rk) as Finished, kept for
// tasks.FinishedRetention.
func (l *List) finishIn(tx *datastore.Transaction, rk *datastore.Key, key string) error {
	now := l.now().UTC()
	_, err := tx.Put(rk, &recordEntity{Key: key, State: int(tasks.Finished), FinishedAt: now, ExpiresAt: now.Add(tasks.FinishedRetention)})
	return err
}

// dropBodies deletes the body parts of finished records. Garbage only: a
// failure leaves parts the TTL policy removes.
func (l *List) dropBodies(ctx context.Context, bodies []*datastore.Key) {
	if len(bodies) > 0 {
		_ = l.client.DeleteMulti(ctx, bodies)
	}
}
