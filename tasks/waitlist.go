package tasks

import (
	"container/heap"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"time"
)

// WaiterState is the state of a waiter record in a WaitList.
type WaiterState int

// States of a waiter record.
const (
	// Absent: no record (never parked, or finished longer ago than
	// FinishedRetention).
	Absent WaiterState = iota
	// Waiting: parked behind the lock, in the list.
	Waiting
	// Running: claimed by a runner that runs or ran the job and has not
	// finished it; out of the list.
	Running
	// Finished: the job ran to an end (success or permanent failure), or
	// was set aside; out of the list, kept for FinishedRetention so that a
	// late duplicate of the delivery is not run.
	Finished
)

func (s WaiterState) String() string {
	switch s {
	case Waiting:
		return "waiting"
	case Running:
		return "running"
	case Finished:
		return "finished"
	default:
		return "absent"
	}
}

// A Waiter is a delivery parked behind a busy lock.
type Waiter struct {
	// Key identifies the delivery's task: the queue id and task name (for a
	// coalescing job, the queue id and the job).
	Key string
	// Arrived is when the task joined the lock id's line (a first
	// delivery's ETA, a retry's arrival, or when Enqueue parked it); the list is
	// ordered by it, then by Key.
	Arrived time.Time
	// Job is the task's job name.
	Job string
	// Body is the task's envelope: what runs when the waiter's turn comes.
	// Peek leaves it nil; Claim and Running return it.
	Body []byte
	// Coalesce marks the record of a coalescing job (Coalesce): Claim
	// removes it from its key, so that a delivery that comes while the run
	// runs parks a new record.
	Coalesce bool
}

// WakeKind is the kind of a wake: a continuation task that gives a lock
// id's oldest waiter its turn.
type WakeKind int

// Kinds of wake. A lock id has at most one pending wake of each kind.
const (
	// Handoff is due now: the lock was released while waiters wait.
	Handoff WakeKind = iota + 1
	// Safety is due when the current holder's lease could end: it runs the
	// oldest waiter if the holder died without handing off.
	Safety
)

func (k WakeKind) String() string {
	switch k {
	case Handoff:
		return "handoff"
	case Safety:
		return "safety"
	default:
		return "none"
	}
}

// A Wake is a continuation task a WaitList asks its caller to create. Its
// task name is derived from LockID, Epoch and Gen (unique for every wake a
// lock id ever has), so creating it twice creates one task.
type Wake struct {
	Kind WakeKind
	// Epoch identifies the life of the lock id's list header (random, new
	// when the header is created); Gen counts the wakes armed in it.
	Epoch, Gen uint64
	// Due is when the wake should run.
	Due time.Time
	// Job is the job of the oldest waiter when the wake was armed: the wake
	// takes the lock with that job's lock options.
	Job string
}

// IsZero reports whether w is no wake.
func (w Wake) IsZero() bool { return w.Kind == 0 }

// StaleWake is how long after its due time a pending wake that was never
// delivered is given up and armed anew under a new name (its creation
// failed without being undone, or the queue delayed it that long; a late
// delivery of a superseded wake does no harm).
const StaleWake = 2 * time.Minute

// Supersedes reports whether a wake of kind due at due is to be armed
// although one due at pending is pending, at now: when the pending one is
// stale (StaleWake past its due time), or, for a Safety wake, due more than
// a second later. A pending Handoff (due when armed) is never superseded
// while fresh. A WaitList implementation applies this rule.
func Supersedes(kind WakeKind, pending, due, now time.Time) bool {
	if now.Sub(pending) >= StaleWake {
		return true
	}
	return kind == Safety && pending.Sub(due) > time.Second
}

// FinishedRetention is how long a WaitList keeps a Finished record: Cloud
// Tasks' dedup window, after which a task name may come back as new.
const FinishedRetention = time.Hour

// A WaitList keeps, per lock id, the deliveries parked behind that lock and
// the lock id's pending wakes, for a Worker in park mode (WithParking); a
// Worker in 429 mode keeps its run records in one too (WithRunRecords).
// Implementations must be safe for concurrent use by many processes and
// strongly consistent (a call sees every call that returned before it
// began); each change of a record (park, claim, finish) and each change of
// a wake (arm, take, disarm) is atomic, but a call may make one of each, one
// after the other. waitlisttest.Run checks the contract.
//
// A lock id has at most one pending wake of each kind. A wake is armed
// (Park, Arm, Take return it for their caller to create) only while a
// waiter waits. A pending wake stops being pending when it is taken (its
// delivery came), disarmed (its creation failed), superseded (a wake of the
// same kind armed with an earlier due time), or StaleWake after its due time.
type WaitList interface {
	// Park records w as waiting for lockID unless a record of w.Key exists
	// (a Finished record past FinishedRetention counts as absent; creating
	// the record is atomic), then arms the Safety wake due at safetyDue
	// unless one is pending due no later. It returns the state of w.Key's
	// record afterwards, whether this call created it, and the wake to
	// create: the armed one, or, when the record existed (a retry or a
	// duplicate of a park), the pending Safety wake, which may never have
	// been created (creating it again by name is idempotent).
	Park(ctx context.Context, lockID string, w Waiter, safetyDue time.Time) (st WaiterState, created bool, wake Wake, err error)
	// Peek returns lockID's oldest waiting record (without its Body) and
	// whether there is one, and the state of key's record and its runner
	// when Running (key may be empty).
	Peek(ctx context.Context, lockID, key string) (head Waiter, ok bool, st WaiterState, runner string, err error)
	// Arm arms a wake of kind due at due, for lockID, when a waiter waits
	// and no wake of kind is pending due no later; it returns the wake to
	// create, or the zero Wake.
	Arm(ctx context.Context, lockID string, kind WakeKind, due time.Time) (Wake, error)
	// Disarm ends w's pending state if it is still pending (its task could
	// not be created), so that the next Arm arms a new one.
	Disarm(ctx context.Context, lockID string, w Wake) error
	// Take marks the wake of kind and gen delivered: it stops being pending
	// and ok is true, unless it is not the pending wake of its kind (taken
	// already, disarmed or superseded). In the same step, when safetyDue is
	// not zero, it arms the Safety wake as Park does and returns it.
	Take(ctx context.Context, lockID string, kind WakeKind, gen uint64, safetyDue time.Time) (ok bool, wake Wake, err error)
	// Claim moves key's record from Waiting to Running by runner and returns
	// it, Body included; it also succeeds when the record is Running by
	// runner already. A runner claims one record at a time: the Worker
	// finishes (or reruns, see Running) a runner's claim before it claims
	// another. Of concurrent Claims by different runners at most one
	// succeeds. A Coalesce record leaves its key (its state becomes Absent)
	// and is kept for runner only.
	Claim(ctx context.Context, lockID, key, runner string) (Waiter, bool, error)
	// TakeClaim is a wake's turn in one atomic step: it takes the wake of
	// kind and gen as Take does (without arming: the caller arms the next
	// Safety wake with Arm), and claims key's record for runner as Claim
	// does (key may be empty: nothing to claim). When runner has a claim it
	// has not finished (a retry of the wake whose run failed or whose
	// process died), TakeClaim returns that record, whatever its key, and
	// claims nothing: the caller runs it again first. Claim and Take are
	// made atomically with each other: on error neither happened.
	TakeClaim(ctx context.Context, lockID string, kind WakeKind, gen uint64, key, runner string) (Waiter, bool, error)
	// FinishClaim is a runner's step from one waiter to the next, holding
	// the lock, in one atomic step: it finishes done, runner's claim, as
	// Finish(lockID, done, runner) does, and claims lockID's oldest waiting
	// record for runner as Claim does, returning it (ok false: none waits;
	// done is finished all the same). done is runner's claim, or empty when
	// runner has none (then it claims the oldest waiter); otherwise it
	// fails, changing nothing.
	FinishClaim(ctx context.Context, lockID, done, runner string) (Waiter, bool, error)
	// Running returns the record runner claimed and has not finished.
	Running(ctx context.Context, lockID, runner string) (Waiter, bool, error)
	// Finish marks key's record Finished (creating it when absent), taking
	// it out of the list if it waits, and ends runner's claim (runner may be
	// empty). A Finished record is kept for at least FinishedRetention. When
	// runner's claim is of a Coalesce record, the key's record (a newer
	// waiter, if any) is left as it is.
	Finish(ctx context.Context, lockID, key, runner string) error
}

// MemoryWaitList is a WaitList in this process's memory, for tests and for a
// single process (the local runner). The zero value is ready to use. Each
// call costs O(log n) for a lock id with n records (amortised: finished
// records leave in the order they finished, claimed ones leave the FIFO when
// they reach its head).
type MemoryWaitList struct {
	mu    sync.Mutex
	locks map[string]*memList // guarded by mu
	now   func() time.Time
	// expiry lists the lock ids in the order their records finished, so
	// that a lock id's list is dropped once nothing in it is kept (its
	// finished records past retention, nothing waiting, running or
	// pending); guarded by mu.
	expiry []memExpiry
}

type memExpiry struct {
	lockID string
	at     time.Time
}

type memList struct {
	epoch   uint64
	gen     uint64
	pending [3]Wake // by WakeKind; zero when none
	seq     uint64
	recs    map[string]*memRecord // key -> record
	runs    map[string]*memRecord // runner -> claimed record
	// waiting holds the records parked in this list, oldest first; a
	// record that left Waiting (or its key) is dropped when it reaches the
	// head.
	waiting memHeap
	// finished holds the records marked Finished, in the order they were
	// (by the list's clock); an entry whose record finished again since, or
	// left its key, is dropped when it reaches the front.
	finished []memFinished
}

type memRecord struct {
	w        Waiter
	seq      uint64
	state    WaiterState
	runner   string
	finished time.Time
}

type memFinished struct {
	r  *memRecord
	at time.Time
}

// before reports whether waiter a comes before b in a wait list's order (the
// one every WaitList keeps): by Arrived, then by Key.
func before(a, b Waiter) bool {
	if !a.Arrived.Equal(b.Arrived) {
		return a.Arrived.Before(b.Arrived)
	}
	return a.Key < b.Key
}

// memHeap orders records by arrival, then key (container/heap).
type memHeap []*memRecord

func (h memHeap) Len() int           { return len(h) }
func (h memHeap) Less(i, j int) bool { return before(h[i].w, h[j].w) }
func (h memHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *memHeap) Push(x any)        { *h = append(*h, x.(*memRecord)) }
func (h *memHeap) Pop() any {
	old := *h
	r := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return r
}

func (m *MemoryWaitList) clock() time.Time {
	if m.now != nil {
		return m.now()
	}
	return time.Now()
}

func randomEpoch() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return binary.BigEndian.Uint64(b[:]) | 1
}

// list returns lockID's list, dropping finished records past retention
// (those at the front of its finished records) and the lists of other lock
// ids that keep nothing any more (amortised O(1) per call). m.mu must be
// held.
func (m *MemoryWaitList) list(lockID string) *memList {
	if m.locks == nil {
		m.locks = map[string]*memList{}
	}
	now := m.clock()
	for len(m.expiry) > 0 && now.Sub(m.expiry[0].at) > FinishedRetention {
		id := m.expiry[0].lockID
		m.expiry[0] = memExpiry{}
		m.expiry = m.expiry[1:]
		if l := m.locks[id]; l != nil && id != lockID {
			if l.expire(now); l.empty(now) {
				delete(m.locks, id)
			}
		}
	}
	l := m.locks[lockID]
	if l == nil {
		l = &memList{epoch: randomEpoch(), recs: map[string]*memRecord{}, runs: map[string]*memRecord{}}
		m.locks[lockID] = l
	}
	l.expire(now)
	return l
}

// expire drops l's finished records past retention.
func (l *memList) expire(now time.Time) {
	for len(l.finished) > 0 {
		f := l.finished[0]
		r := f.r
		if r.state == Finished && r.finished.Equal(f.at) && l.recs[r.w.Key] == r {
			if now.Sub(f.at) <= FinishedRetention {
				break
			}
			delete(l.recs, r.w.Key)
		}
		l.finished[0] = memFinished{}
		l.finished = l.finished[1:]
	}
}

// empty reports whether l keeps nothing at now: no record, no claim, no
// pending wake that is not stale.
func (l *memList) empty(now time.Time) bool {
	for _, p := range l.pending {
		if !p.IsZero() && now.Sub(p.Due) < StaleWake {
			return false
		}
	}
	return len(l.recs) == 0 && len(l.runs) == 0
}

// finish marks r Finished at now. m.mu must be held.
func (l *memList) finish(r *memRecord, now time.Time) {
	r.state, r.runner, r.finished = Finished, "", now
	r.w.Body = nil
	l.finished = append(l.finished, memFinished{r: r, at: now})
}

func (l *memList) head() *memRecord {
	for len(l.waiting) > 0 {
		r := l.waiting[0]
		if r.state == Waiting && l.recs[r.w.Key] == r {
			return r
		}
		heap.Pop(&l.waiting)
	}
	return nil
}

// arm is the one arming rule of every WaitList method.
func (l *memList) arm(now time.Time, kind WakeKind, due time.Time) Wake {
	if l.head() == nil {
		return Wake{}
	}
	if p := l.pending[kind]; !p.IsZero() && !Supersedes(kind, p.Due, due, now) {
		return Wake{}
	}
	l.gen++
	w := Wake{Kind: kind, Epoch: l.epoch, Gen: l.gen, Due: due, Job: l.head().w.Job}
	l.pending[kind] = w
	return w
}

func cloneWaiter(w Waiter) Waiter {
	w.Body = slices.Clone(w.Body)
	return w
}

// Park implements WaitList.
func (m *MemoryWaitList) Park(_ context.Context, lockID string, w Waiter, safetyDue time.Time) (WaiterState, bool, Wake, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.list(lockID)
	st, created := Waiting, false
	if r := l.recs[w.Key]; r != nil {
		st = r.state
	} else {
		l.seq++
		r := &memRecord{w: cloneWaiter(w), seq: l.seq, state: Waiting}
		l.recs[w.Key] = r
		heap.Push(&l.waiting, r)
		created = true
	}
	wake := l.arm(m.clock(), Safety, safetyDue)
	if wake.IsZero() && !created {
		// A retry or duplicate of a park: the pending Safety may never have
		// been created (its creator died, or its Disarm failed); creating it
		// again under its name is idempotent.
		wake = l.pending[Safety]
	}
	return st, created, wake, nil
}

// Peek implements WaitList.
func (m *MemoryWaitList) Peek(_ context.Context, lockID, key string) (Waiter, bool, WaiterState, string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.list(lockID)
	st, runner := Absent, ""
	if r := l.recs[key]; r != nil && key != "" {
		st, runner = r.state, r.runner
	}
	h := l.head()
	if h == nil {
		return Waiter{}, false, st, runner, nil
	}
	w := h.w
	w.Body = nil
	return w, true, st, runner, nil
}

// Arm implements WaitList.
func (m *MemoryWaitList) Arm(_ context.Context, lockID string, kind WakeKind, due time.Time) (Wake, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.list(lockID).arm(m.clock(), kind, due), nil
}

// Disarm implements WaitList.
func (m *MemoryWaitList) Disarm(_ context.Context, lockID string, w Wake) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.list(lockID)
	if p := l.pending[w.Kind]; !p.IsZero() && p.Epoch == w.Epoch && p.Gen == w.Gen {
		l.pending[w.Kind] = Wake{}
	}
	return nil
}

// Take implements WaitList.
func (m *MemoryWaitList) Take(_ context.Context, lockID string, kind WakeKind, gen uint64, safetyDue time.Time) (bool, Wake, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.list(lockID)
	ok := false
	if p := l.pending[kind]; !p.IsZero() && p.Gen == gen {
		l.pending[kind] = Wake{}
		ok = true
	}
	var w Wake
	if !safetyDue.IsZero() {
		w = l.arm(m.clock(), Safety, safetyDue)
	}
	return ok, w, nil
}

// Claim implements WaitList.
func (m *MemoryWaitList) Claim(_ context.Context, lockID, key, runner string) (Waiter, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.list(lockID)
	if r := l.runs[runner]; r != nil && r.w.Key == key {
		return cloneWaiter(r.w), true, nil
	}
	return l.claim(key, runner)
}

// claim claims key's record for runner. m.mu must be held.
func (l *memList) claim(key, runner string) (Waiter, bool, error) {
	r := l.recs[key]
	if r == nil || r.state != Waiting {
		return Waiter{}, false, nil
	}
	run := &memRecord{w: r.w, seq: r.seq, state: Running, runner: runner}
	if r.w.Coalesce {
		delete(l.recs, key)
	} else {
		r.state, r.runner = Running, runner
		r.w.Body = nil
	}
	l.runs[runner] = run
	return cloneWaiter(run.w), true, nil
}

// TakeClaim implements WaitList.
func (m *MemoryWaitList) TakeClaim(_ context.Context, lockID string, kind WakeKind, gen uint64, key, runner string) (Waiter, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.list(lockID)
	if p := l.pending[kind]; !p.IsZero() && p.Gen == gen {
		l.pending[kind] = Wake{}
	}
	if r := l.runs[runner]; r != nil {
		return cloneWaiter(r.w), true, nil
	}
	if key == "" {
		return Waiter{}, false, nil
	}
	return l.claim(key, runner)
}

// Running implements WaitList.
func (m *MemoryWaitList) Running(_ context.Context, lockID, runner string) (Waiter, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.list(lockID).runs[runner]
	if r == nil {
		return Waiter{}, false, nil
	}
	return cloneWaiter(r.w), true, nil
}

// FinishClaim implements WaitList.
func (m *MemoryWaitList) FinishClaim(_ context.Context, lockID, done, runner string) (Waiter, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.list(lockID)
	if r := l.runs[runner]; r != nil && r.w.Key != done || r == nil && done != "" {
		return Waiter{}, false, fmt.Errorf("tasks: FinishClaim: %q is not runner %q's claim", done, runner)
	}
	if done != "" {
		m.finish(l, lockID, done, runner)
	}
	h := l.head()
	if h == nil {
		return Waiter{}, false, nil
	}
	return l.claim(h.w.Key, runner)
}

// Finish implements WaitList.
func (m *MemoryWaitList) Finish(_ context.Context, lockID, key, runner string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.finish(m.list(lockID), lockID, key, runner)
	return nil
}

// finish is Finish on lockID's list l. m.mu must be held.
func (m *MemoryWaitList) finish(l *memList, lockID, key, runner string) {
	if runner != "" {
		if r := l.runs[runner]; r != nil && r.w.Key == key {
			delete(l.runs, runner)
			if r.w.Coalesce {
				return
			}
		}
	}
	r := l.recs[key]
	if r == nil {
		r = &memRecord{w: Waiter{Key: key}}
		l.recs[key] = r
	}
	now := m.clock()
	l.finish(r, now)
	m.expiry = append(m.expiry, memExpiry{lockID: lockID, at: now})
}
