package tasks

import (
	"context"
	"slices"
	"sync"
	"time"
)

// WaiterState is the state of a waiter record in a WaitList.
type WaiterState int

// States of a waiter record.
const (
	// Absent: no record (never parked, or finished longer ago than the list
	// keeps finished records).
	Absent WaiterState = iota
	// Waiting: parked behind the lock, in the list.
	Waiting
	// Running: claimed by a runner (a continuation task) that runs or ran
	// the job and has not finished it; out of the list.
	Running
	// Finished: the job ran to an end (success or permanent failure); out of
	// the list, kept so that a late duplicate of the delivery is not run.
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
	// Key identifies the delivery's task: the queue id and task name.
	Key string
	// Arrived is when the delivery first found the lock busy; the list is
	// ordered by it, then by Key.
	Arrived time.Time
	// Body is the task's envelope, from which its continuations are made.
	Body []byte
	// Coalesce marks the record of a coalescing job (Coalesce): Claim
	// removes it (its state becomes Absent) instead of marking it Running,
	// so that a delivery that comes while the run runs parks a new record.
	Coalesce bool
}

// A WaitList keeps, per lock id, the deliveries parked behind that lock, for
// a Worker in park mode (WithParking). Implementations must be safe for
// concurrent use by many processes, each method atomic per record, and
// strongly consistent: Oldest sees every Park that returned before it was
// called.
//
// It is deliberately apart from locking.Backend: the lock core does not
// change, and a lock store that cannot keep an ordered list still locks.
type WaitList interface {
	// Park records w as waiting for lockID, unless a record of w.Key exists
	// (in any state); it returns the state of w.Key's record afterwards:
	// Waiting when it created it, else the existing record's state (an
	// existing Waiting record keeps its first Arrived).
	Park(ctx context.Context, lockID string, w Waiter) (WaiterState, error)
	// Oldest returns the Waiting record of lockID with the earliest Arrived
	// (then the smallest Key), and false when none is waiting.
	Oldest(ctx context.Context, lockID string) (Waiter, bool, error)
	// State returns the state of key's record, and its runner when Running.
	State(ctx context.Context, lockID, key string) (WaiterState, string, error)
	// Claim moves key's record from Waiting to Running by runner and reports
	// true; it also reports true when the record is Running by runner
	// already. Otherwise (absent, finished, running by another runner) it
	// reports false. Of concurrent Claims by different runners at most one
	// reports true. A Coalesce record is removed instead of marked Running.
	Claim(ctx context.Context, lockID, key, runner string) (bool, error)
	// Finish marks key's record Finished. A Finished record is kept for at
	// least FinishedRetention, so that Park of the same key reports Finished.
	Finish(ctx context.Context, lockID, key string) error
}

// FinishedRetention is how long a WaitList keeps a Finished record: Cloud
// Tasks' dedup window, after which a task name may come back as new.
const FinishedRetention = time.Hour

// MemoryWaitList is a WaitList in this process's memory, for tests and for a
// single process (the local runner). The zero value is ready to use.
type MemoryWaitList struct {
	mu    sync.Mutex
	locks map[string]map[string]*memWaiter // lock id -> key -> record; guarded by mu
	now   func() time.Time
}

type memWaiter struct {
	w        Waiter
	state    WaiterState
	runner   string
	finished time.Time
}

func (m *MemoryWaitList) clock() time.Time {
	if m.now != nil {
		return m.now()
	}
	return time.Now()
}

// records returns lockID's records, dropping finished ones past retention.
// m.mu must be held.
func (m *MemoryWaitList) records(lockID string) map[string]*memWaiter {
	if m.locks == nil {
		m.locks = map[string]map[string]*memWaiter{}
	}
	recs := m.locks[lockID]
	if recs == nil {
		recs = map[string]*memWaiter{}
		m.locks[lockID] = recs
	}
	now := m.clock()
	for k, r := range recs {
		if r.state == Finished && now.Sub(r.finished) > FinishedRetention {
			delete(recs, k)
		}
	}
	return recs
}

// Park implements WaitList.
func (m *MemoryWaitList) Park(_ context.Context, lockID string, w Waiter) (WaiterState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	recs := m.records(lockID)
	if r := recs[w.Key]; r != nil {
		return r.state, nil
	}
	w.Body = slices.Clone(w.Body)
	recs[w.Key] = &memWaiter{w: w, state: Waiting}
	return Waiting, nil
}

// Oldest implements WaitList.
func (m *MemoryWaitList) Oldest(_ context.Context, lockID string) (Waiter, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var best *memWaiter
	for _, r := range m.records(lockID) {
		if r.state != Waiting {
			continue
		}
		if best == nil || r.w.Arrived.Before(best.w.Arrived) || (r.w.Arrived.Equal(best.w.Arrived) && r.w.Key < best.w.Key) {
			best = r
		}
	}
	if best == nil {
		return Waiter{}, false, nil
	}
	w := best.w
	w.Body = slices.Clone(w.Body)
	return w, true, nil
}

// State implements WaitList.
func (m *MemoryWaitList) State(_ context.Context, lockID, key string) (WaiterState, string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.records(lockID)[key]
	if r == nil {
		return Absent, "", nil
	}
	return r.state, r.runner, nil
}

// Claim implements WaitList.
func (m *MemoryWaitList) Claim(_ context.Context, lockID, key, runner string) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.records(lockID)[key]
	switch {
	case r == nil:
		return false, nil
	case r.state == Waiting && r.w.Coalesce:
		delete(m.records(lockID), key)
		return true, nil
	case r.state == Waiting:
		r.state, r.runner = Running, runner
		return true, nil
	default:
		return r.state == Running && r.runner == runner, nil
	}
}

// Finish implements WaitList.
func (m *MemoryWaitList) Finish(_ context.Context, lockID, key string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	recs := m.records(lockID)
	r := recs[key]
	if r == nil {
		r = &memWaiter{w: Waiter{Key: key}}
		recs[key] = r
	}
	r.state, r.runner, r.finished = Finished, "", m.clock()
	r.w.Body = nil
	return nil
}
