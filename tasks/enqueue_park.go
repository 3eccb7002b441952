package tasks

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"sync"
	"time"

	"github.com/taskguard/taskguard/locking"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
)

// BurstWindow is how long after a Client in park mode created a Cloud Task
// on a lock id (or found the lock id held when it parked a task) it parks
// the next tasks on that lock id at enqueue: see ParkAtEnqueue.
const BurstWindow = time.Second

// enqueueParkTries bounds the attempts to create a parked task's safety
// wake before Enqueue gives up.
const enqueueParkTries = 3

// enqueueParking is a Client's park mode at enqueue (ParkAtEnqueue).
type enqueueParking struct {
	h     *handoff
	locks *locking.Client // whose lease is the safety wake's distance

	mu     sync.Mutex
	recent map[string]time.Time // lock id -> when it was last seen busy; guarded by mu
	swept  time.Time            // guarded by mu
}

// ParkAtEnqueue makes Enqueue park bursts on one lock id straight into
// list, park mode's wait list (the one the Worker's WithParking is given),
// instead of sending every task of the burst through the queue:
//
//   - A task with no Delay or ScheduleTime, on a lock id this Client began
//     to create a Cloud Task for less than BurstWindow ago (also while that
//     CreateTask is under way: concurrent Enqueues of a burst park), or
//     found held when it last parked one, is recorded as a waiter in list (ordered by
//     when it was enqueued), and a wake runs it: the holder's release hands
//     off (HandOff, registered by every Worker in park mode), and when the
//     lock is free (locks.Probe, one read) Enqueue arms and creates a
//     Handoff wake itself. A Safety wake due a lease after (locks.Lease(),
//     plus DefaultSafetyMargin) runs it should the holder die. The queue
//     then carries one task per burst, plus one wake per hand-off, instead
//     of one per task, so a burst on one id no longer holds up tasks on
//     other ids behind the queue's rate limit.
//   - Any other task is created in the queue as without it.
//
// Enqueue's answers keep their meaning, but for one. A parked task's name
// (returned) is the full task name it would have had, but names no task in
// the queue (Cloud Tasks' GetTask and DeleteTask do not find it; it is in
// the wait list, where its wake runs it). A task of the same Name that
// ran, runs, waits or was created in the queue is a duplicate either way:
// the Worker dedups the queue's deliveries against the wait list's records,
// and it runs once. Enqueue returns ErrDuplicate when the wait list has its
// record already (within FinishedRetention) or, through the queue, when
// Cloud Tasks has the name; but a task parked while a task of its Name is
// in the queue and has not reached a Worker (or the reverse, a task sent
// through the queue while one of its Name waits in the wait list) is
// accepted, Enqueue returns nil, and the Worker runs the first of the two
// to get the lock (so a Name held by a task scheduled for later, Delay or
// ScheduleTime, runs now when enqueued again undelayed). A task of a job
// that coalesces (listed in coalescing, or registered with Coalesce on a
// Worker in park mode given this Client) is absorbed into its job's
// waiting run on the lock id, as the Worker absorbs one (Enqueue returns a
// name that names no task, and nil); such a task with a Name always goes
// through the queue, since its waiter is keyed by its job and only the
// queue dedups its Name.
//
// Once a task is parked its wakes are made even when ctx ends (for up to
// 10 s more): a caller that went away cannot retry. When its Safety wake
// could not be created (Cloud Tasks failing after enqueueParkTries tries),
// Enqueue returns an error: a task without a Name is withdrawn first, so
// that retrying it runs it once; a task with a Name stays parked, and
// retrying it with that Name (a duplicate) makes its wake.
//
// locks is the lock client the Workers take these locks with (its Strong
// backend must implement locking.Prober: in-memory or Datastore). Tasks
// whose jobs take Weak locks are parked all the same; their Handoff wakes
// are then made whatever the lock's state, and find it busy at worst.
// Package app's functions call it in park mode; call it once, before the
// first Enqueue, on a Client of a program that enqueues. A Worker in park
// mode given c (WithParking) tells c which of its jobs coalesce. It fails
// with ErrInvalidConfig for a nil list or lock client, or a lock client
// that cannot probe its Strong locks (locking.Client.CanProbe; the error
// wraps errors.ErrUnsupported too). It does no I/O.
func (c *Client) ParkAtEnqueue(list WaitList, locks *locking.Client, coalescing ...string) error {
	if err := checkParkAtEnqueue(list, locks); err != nil {
		return err
	}
	p := &enqueueParking{h: &handoff{client: c, list: list}, locks: locks, recent: map[string]time.Time{}}
	for _, j := range coalescing {
		c.coalesces(j)
	}
	c.parkMu.Lock()
	defer c.parkMu.Unlock()
	c.park = p
	return nil
}

// checkParkAtEnqueue checks ParkAtEnqueue's arguments.
func checkParkAtEnqueue(list WaitList, locks *locking.Client) error {
	if list == nil || locks == nil {
		return fmt.Errorf("%w: ParkAtEnqueue needs a WaitList and a lock client", ErrInvalidConfig)
	}
	if !locks.CanProbe(locking.Strong) {
		return fmt.Errorf("%w: ParkAtEnqueue: the lock client's Strong backend (%T) cannot probe a lock: %w",
			ErrInvalidConfig, locks.Backend(locking.Strong), errors.ErrUnsupported)
	}
	return nil
}

// coalesces marks job as coalescing for ParkAtEnqueue (Worker.Handle does,
// for a job registered with Coalesce on a Worker in park mode given c).
func (c *Client) coalesces(job string) {
	c.parkMu.Lock()
	defer c.parkMu.Unlock()
	if c.coalescing == nil {
		c.coalescing = map[string]bool{}
	}
	c.coalescing[job] = true
}

func (c *Client) isCoalescing(job string) bool {
	c.parkMu.Lock()
	defer c.parkMu.Unlock()
	return c.coalescing[job]
}

// mayPark reports whether t may be parked at enqueue: not a named task of a
// coalescing job, whose waiter is keyed by its job, so that only the
// queue's dedup of its Name keeps it from running again within the dedup
// window.
func (c *Client) mayPark(t Task) bool {
	return t.Name == "" || !c.isCoalescing(t.Job)
}

// parking returns c's park mode at enqueue, or nil.
func (c *Client) parking() *enqueueParking {
	c.parkMu.Lock()
	defer c.parkMu.Unlock()
	return c.park
}

// direct reports whether a task on lockID, due now, goes through the
// queue: when lockID was not seen busy less than BurstWindow ago. It then
// marks lockID busy at once, so that the Enqueues of the same burst made
// meanwhile (concurrently, while this one's CreateTask is under way) park.
func (p *enqueueParking) direct(lockID string, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if at, ok := p.recent[lockID]; ok && now.Sub(at) < BurstWindow && !at.After(now) {
		return false
	}
	p.busyLocked(lockID, now)
	return true
}

// busy records lockID as seen busy at now.
func (p *enqueueParking) busy(lockID string, now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.busyLocked(lockID, now)
}

// busyLocked is busy with p.mu held. Now and then it forgets lock ids not
// seen for BurstWindow, so that the table stays as small as the lock ids
// in bursts.
func (p *enqueueParking) busyLocked(lockID string, now time.Time) {
	p.recent[lockID] = now
	if now.Sub(p.swept) < BurstWindow {
		return
	}
	p.swept = now
	for id, at := range p.recent {
		if now.Sub(at) >= BurstWindow {
			delete(p.recent, id)
		}
	}
}

// park records t, whose request is req, as a waiter of its lock id (see
// ParkAtEnqueue) and returns its task name.
func (c *Client) parkTask(ctx context.Context, p *enqueueParking, t Task, req *cloudtaskspb.CreateTaskRequest, now time.Time) (string, error) {
	queueID := path.Base(c.cfg.Queue)
	id := ""
	if t.Name != "" {
		id = path.Base(req.Task.GetName())
	} else {
		var b [16]byte
		_, _ = rand.Read(b[:])
		id = "p" + hex.EncodeToString(b[:])
	}
	name := c.cfg.Queue + "/tasks/" + id
	w := Waiter{Key: taskKey(queueID, id), Arrived: now, Job: t.Job, Body: req.Task.GetHttpRequest().GetBody()}
	if c.isCoalescing(t.Job) {
		w.Key, w.Coalesce = coalesceKey(queueID, t.Job), true
	}
	safetyDue := now.Add(p.locks.Lease() + DefaultSafetyMargin)
	st, created, wake, err := p.h.list.Park(ctx, t.LockID, w, safetyDue)
	if err != nil {
		return "", fmt.Errorf("tasks: parking a task of job %q at enqueue: %w", t.Job, err)
	}
	// Parked: its wakes are made even when the caller has gone (its
	// context ended), which nobody may retry; bounded as a hand-off is.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), handoffTimeout)
	defer cancel()
	// The wake is made also for a record that existed (a retry of an
	// Enqueue whose wake could not be made): creating it again by name is
	// idempotent.
	if err := p.safetyWake(ctx, t.LockID, wake, safetyDue); err != nil {
		if created && t.Name == "" && !w.Coalesce {
			ran, werr := p.withdraw(ctx, t.LockID, w.Key)
			if ran {
				// A runner claimed it meanwhile: it runs.
				return name, nil
			}
			err = errors.Join(err, werr)
		}
		return "", fmt.Errorf("tasks: a task of job %q was parked at enqueue, but its safety wake could not be made: %w", t.Job, err)
	}
	var dup error
	if !created && !(w.Coalesce && st == Waiting) {
		dup = fmt.Errorf("%w: %s (%v in the wait list)", ErrDuplicate, name, st)
		if st != Waiting {
			return name, dup
		}
		// It waits (a retry of an Enqueue that failed after its park): it
		// may wait on a free lock, which nobody releases. Hand it off as a
		// new one.
	}
	// Parked, or absorbed into its job's waiting run (a coalescing job).
	if held, _, err := p.locks.Probe(ctx, locking.Strong, t.LockID); err == nil && held {
		// The holder's release hands off.
		p.busy(t.LockID, now)
		return name, dup
	}
	// Free (or unknown): nobody may release it; hand it off as a release
	// does (one Handoff wake armed per lock id at a time; a failure is
	// logged, and the safety wake runs it).
	p.h.handOff(ctx, slog.Default(), nil, t.LockID)
	return name, dup
}

// safetyWake creates wake (Park's), arming and creating it again should
// that fail, up to enqueueParkTries times in all.
func (p *enqueueParking) safetyWake(ctx context.Context, lockID string, wake Wake, due time.Time) error {
	err := p.h.create(ctx, lockID, wake)
	for try := 1; err != nil && try < enqueueParkTries && ctx.Err() == nil; try++ {
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(try) * 100 * time.Millisecond):
		}
		var w Wake
		if w, err = p.h.list.Arm(ctx, lockID, Safety, due); err == nil {
			err = p.h.create(ctx, lockID, w)
		}
	}
	return err
}

// withdraw takes key, a record this Enqueue parked, out of the list: it
// claims it for a runner of its own and finishes it. When another runner
// claimed it first, it runs there: ran is true, and nothing is withdrawn.
func (p *enqueueParking) withdraw(ctx context.Context, lockID, key string) (ran bool, err error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), handoffTimeout)
	defer cancel()
	runner := "enqueue/" + key
	_, ok, err := p.h.list.Claim(ctx, lockID, key, runner)
	switch {
	case err != nil:
		return false, fmt.Errorf("withdrawing the parked task: %w", err)
	case !ok:
		return true, nil
	}
	if err := p.h.list.Finish(ctx, lockID, key, runner); err != nil {
		return false, fmt.Errorf("withdrawing the parked task: %w", err)
	}
	return false, nil
}
