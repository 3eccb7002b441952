package app

import (
	"context"
	"fmt"
	"sync"

	"cloud.google.com/go/datastore"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/dswait"
)

// memoryWaits holds one in-memory wait list per in-memory lock store, so
// that every App of a process whose locks share a store shares its waiters.
var memoryWaits struct {
	sync.Mutex
	lists map[locking.Backend]*tasks.MemoryWaitList
}

// memoryWaitList returns the wait list of the in-memory lock store b.
func memoryWaitList(b locking.Backend) *tasks.MemoryWaitList {
	memoryWaits.Lock()
	defer memoryWaits.Unlock()
	if memoryWaits.lists == nil {
		memoryWaits.lists = make(map[locking.Backend]*tasks.MemoryWaitList)
	}
	l := memoryWaits.lists[b]
	if l == nil {
		l = &tasks.MemoryWaitList{}
		memoryWaits.lists[b] = l
	}
	return l
}

// parkOptions chooses the Worker's busy mode (see New), sets a.busy, and
// returns the Worker's options for it: park mode's, or, in 429 mode, run
// records in the wait list New would park in, where there is one.
func (a *App) parkOptions(ctx context.Context, cfg Config, given tasks.WaitList) ([]tasks.WorkerOption, error) {
	a.busy = Busy429
	list, why, err := a.waitList(ctx, cfg, given)
	if err != nil {
		return nil, err
	}
	if why == "" && a.enqueue == nil {
		why = "no queue configured: parking creates continuation tasks (set " + EnvQueue + ", " + EnvWorkerURL + " and " + EnvTaskServiceAccount + ")"
	}
	records := func() []tasks.WorkerOption {
		if list == nil {
			return nil
		}
		return []tasks.WorkerOption{tasks.WithRunRecords(list)}
	}
	if cfg.Busy == Busy429 {
		return records(), nil
	}
	if why != "" {
		if cfg.Busy == BusyPark {
			return nil, fmt.Errorf("%w: %s=%s: %s", ErrConfig, EnvBusy, BusyPark, why)
		}
		a.log.WarnContext(ctx, "taskguard: a busy lock is answered 429 (Cloud Tasks retries, slowly, and throttles the queue): "+why, "busy", Busy429)
		return records(), nil
	}
	lease := cfg.Lease
	if lease <= 0 {
		lease = a.locks.Lease()
	}
	a.busy = BusyPark
	// Bursts on one lock id park at enqueue (the Enqueue function's), so
	// that they do not take the queue's rate from other lock ids, when the
	// Strong locks can be probed (Datastore's and this process's can; a
	// store of its own, with a wait list given, may not: then every task
	// goes through the queue).
	if a.locks.CanProbe(locking.Strong) {
		if err := a.enqueue.ParkAtEnqueue(list, a.locks); err != nil {
			return nil, err
		}
	} else {
		a.log.InfoContext(ctx, "taskguard: the Enqueue function does not park bursts at enqueue: the Strong lock store cannot probe a lock",
			"strong", fmt.Sprintf("%T", a.locks.Backend(locking.Strong)))
	}
	return []tasks.WorkerOption{tasks.WithParking(a.enqueue, list), tasks.WithParkingLease(lease)}, nil
}

// waitList returns the wait list shared by every instance (for parking, or
// for 429 mode's run records), or why there is none.
func (a *App) waitList(ctx context.Context, cfg Config, given tasks.WaitList) (tasks.WaitList, string, error) {
	if given != nil {
		return given, "", nil
	}
	b := a.locks.Backend(locking.Strong)
	if a.locks.InProcess(locking.Strong) {
		// Locks in this process's memory: so are its waiters.
		return memoryWaitList(b), "", nil
	}
	switch b := b.(type) {
	case *dslock.Backend:
		if cfg.DatastoreProject == "" {
			return nil, "Strong locks are on Datastore but no project is configured for the wait list (set " + EnvDatastoreProject + " or " + EnvProject + ")", nil
		}
		c, err := datastore.NewClientWithDatabase(ctx, cfg.DatastoreProject, cfg.DatastoreDatabase)
		if err != nil {
			return nil, "", fmt.Errorf("app: the wait list's Datastore client: %w", err)
		}
		l, err := dswait.New(c, dswait.Options{Namespace: cfg.DatastoreNamespace})
		if err != nil {
			_ = c.Close()
			return nil, "", err
		}
		a.waitDS = c
		return l, "", nil
	default:
		return nil, fmt.Sprintf("Strong locks are on %T, where no wait list shared by every instance is kept (only Datastore's and in-process memory's are)", b), nil
	}
}
