// Package tasks runs Cloud Tasks under locks: a Client enqueues HTTP-target
// tasks that carry a job name, a lock id and a payload, and a Worker (an
// http.Handler served by a Cloud Run function) runs each delivery under that
// lock, so that tasks with the same lock id never run at the same time on
// any instance.
//
// # Enqueue side
//
// NewClient is given the queue, the worker's URL and the service account
// whose OIDC token Cloud Tasks presents to the worker. Client.Enqueue checks
// the task before any RPC (job, lock id, 1 MB size, 30-day schedule limit)
// and creates a POST task whose body is a versioned JSON envelope
// {"v":1,"job","lockId","payload" or "data","enqueuedAt"}. A Task.Name
// de-duplicates: it is hashed into the task id, and a second Enqueue within
// Cloud Tasks' window fails with ErrDuplicate. NewClient connects to the
// emulator CLOUD_TASKS_EMULATOR_HOST names, when set. Code that enqueues
// can take an Enqueuer, the one-method interface *Client implements, and be
// tested with a fake; taskstest.NewRequest turns a Task into the request
// Cloud Tasks delivers to the Worker.
//
// # Identities
//
// A job name or a lock id either arrives at the job byte for byte, or is
// refused where it enters: the envelope is JSON, which carries only UTF-8,
// so Enqueue refuses a job or lock id that is not valid UTF-8 (ErrInvalidTask,
// quoting it), Handle panics on such a job name, and the Worker drops (200)
// a hand-made body whose job or lock id would decode to other bytes (invalid
// UTF-8, an unpaired surrogate escape such as "\ud800") before taking any
// lock. The lock the Worker takes is the lock of exactly Task.LockID.
//
// # Worker side
//
// NewWorker takes a *locking.Client (nil: locking.Default(), the client the
// rest of the process shares, so its locks and the worker's exclude each
// other); Handle registers jobs by name, on that Worker only. By default a
// delivery whose lock is held is answered 429 with Retry-After at once, so
// that the queue, not a billed instance, does the waiting (429 mode; see
// Park and hand-off for its production cost and the alternative). Outcomes map to
// Cloud Tasks semantics: success 204, job error 500 (retried), lock lost 503
// (retried; the lock answers are lockhttp.Policy's, as for HTTP functions
// guarded by package lockhttp), and a task that can never succeed (Permanent error, malformed
// envelope, a job unknown for longer than UnknownJobGrace, oversized body)
// 200 with an ERROR log so that it is not retried until the queue gives up;
// a job unknown to a task enqueued within UnknownJobGrace is retried (503),
// since a deploy adding it may be rolling out. See Worker for the full table.
//
// # Park and hand-off (opt-in: WithParking)
//
// A Worker built by package app, the deployed functions, parks by default
// (TASKGUARD_BUSY); a Worker of your own parks when given WithParking.
//
// In the default 429 mode Cloud Tasks does the waiting, and in production
// that is slow and spreads: a busy task is retried after the queue's backoff
// (truncated to whole seconds; with deploy's queue about 5, 15, 35, 75, 155,
// 315 s after its first try), each 429 spends an attempt, and 429 and 503
// answers trigger system throttling that slows every task of the queue, not
// only the busy lock id's. With WithParking a Worker waits in the lock store
// instead and hands the lock on itself:
//
//   - Park. A delivery that finds its lock busy records itself as a waiter of
//     that lock id in a WaitList (durably; ordered by when it joined the
//     line, see Park at enqueue; keyed by queue and task name, so a
//     duplicate delivery finds its record) and makes sure the lock id's safety wake is pending: a wake task due
//     when the holder's lease could end. Only when both exist does it answer
//     202 Accepted; if either fails, 503 and nothing is lost: its retry parks
//     again, idempotently, and creates the pending safety wake again by its
//     name (a wake armed whose creation failed, or whose creator died, is
//     created then; ALREADY_EXISTS is success). When its record is then
//     the oldest, it tries the lock once more, so that a release between its
//     first try and its record (which would see no waiter) cannot strand it;
//     behind an older waiter it need not: that waiter's run releases after
//     the record exists, and hands off.
//   - Park at enqueue (Client.ParkAtEnqueue; package app's Enqueue function
//     does). A burst on one lock id need not pass through the queue at all:
//     a Client that sent a task of a lock id through the queue less than
//     BurstWindow ago, or found the lock held when it last parked one,
//     records the next task of that lock id straight into the wait list (as
//     the Worker would, keyed by queue and task name, ordered by when it was
//     enqueued) and arms the safety wake; when the lock is free
//     (locking.Client.Probe, one read, after the park) it arms a hand-off
//     wake too, otherwise the holder's release hands off. The queue then
//     carries the burst's first task and its wakes, not one task each, and
//     tasks on other lock ids are not held up behind the burst by the
//     queue's rate limit. Deliveries join the line by their ETA (when they
//     were enqueued, or scheduled for) on a first attempt, so that the queue's
//     first task of a burst still runs before the tasks parked behind it
//     (should the queue deliver it after their wake, it runs next).
//   - Wakes. A wake is a task of the same queue that carries the lock id, a
//     job name (whose lock options it takes the lock with) and its own
//     identity, and no payload: holding the lock, it claims the lock id's
//     oldest waiter and runs what the wait list recorded for it (a forged or
//     replayed request runs nothing of its own). Per lock id at most one
//     hand-off wake and one safety wake are pending, whatever the burst; each
//     wake's name is unique (random), so no name ever meets Cloud Tasks'
//     dedup window. A pending wake stops being pending when its delivery
//     takes it, when its creation fails (disarmed) or StaleWake after it was
//     due.
//   - Hand off. Every release of a lock by a lock client on which the
//     hand-off is registered (HandOff; NewWorker registers it on the
//     Worker's client, which the deployed functions share with lockhttp and
//     locking.With) arms a hand-off wake when someone waits and none is
//     pending, and creates it before the release returns (for a lock
//     released because its context ended, after the request: a lease
//     later on a throttled Cloud Run instance). Whoever holds a
//     lock id checks its wait list before running anything: a fresh delivery
//     behind an older waiter lets go and parks (FIFO: a newcomer never
//     overtakes; it holds the lock only for that check), and its release
//     finds the hand-off already pending.
//   - A wake that finds the lock held takes itself (no longer pending),
//     arms the safety wake for that holder's lease, and tries the lock once
//     more: the holder's release, which reads the wait list after the take,
//     hands off again. A holder without the hand-off, or one that dies,
//     leaves its waiters to the safety wake: while waiters wait a safety
//     wake stays pending, since taking one arms the next.
//   - Claim. A waiter runs only if, holding the lock, a runner claims its
//     record (waiting -> running, one winner), so two wakes, or a wake and a
//     duplicate delivery, never both run it. When the job ends for good the
//     record is marked finished (kept for FinishedRetention, Cloud Tasks'
//     dedup window, so that a late duplicate of the task does not run it
//     again; after it, a task re-enqueued under the same name parks anew).
//     A delivery that ran at once, with nobody waiting, marks its record
//     finished after the run, before its release: a duplicate of it (also a
//     retry of a run longer than its dispatch deadline, parked meanwhile)
//     does not run again.
//   - Run next (WithRunNext). A wake whose job succeeded goes on, holding
//     the lock, with the next oldest waiter: one wait-list step finishes the
//     one it ran and claims the next (WaitList.FinishClaim), and the next
//     runs in the same request, up to DefaultRunNext (30 s) after the wake
//     came, cut so that a job started then ends, at the job deadline, before
//     the wake's dispatch deadline. A burst on one lock id then costs a wake
//     per 30 s of work instead of one per task, and the hand-off between two
//     runs is that step (on Datastore 4 RPCs in 3 round trips) instead of
//     a release, a CreateTask, a dispatch, an acquire and a claim. Its runs
//     are one holding: they share its fencing token. A job that fails ends
//     the wake's run of tasks (see Failures).
//   - Unknown and removed jobs. A waiter whose job the instance a wake
//     reached does not have is claimed by that wake. Parked within
//     UnknownJobGrace (15 min), it may be of a job a rolling deploy is
//     adding: the wake is answered 503 and keeps the claim, and its retry,
//     on an instance that may have the job, runs it (the waiters behind it
//     are handed the lock meanwhile, so it may run after them). Parked
//     longer ago, its job was removed or renamed: it is set aside, finished
//     with an ERROR log naming it (a coalescing waiter just leaves its key).
//     Either way it never blocks its lock id.
//   - Coalescing (opt-in per job: Coalesce). A coalescing job has one
//     waiter per lock id: while it waits, further deliveries are absorbed
//     (204, logged with coalesced=true); its run gets the payload of the
//     delivery that parked it (or of a later delivery that found the lock
//     free with that waiter oldest, and ran it), and absorbed payloads are
//     dropped. Its record leaves its key when claimed, so a delivery that
//     comes during the run parks a new one.
//   - Failures. A wake whose job fails answers 500 and keeps the record
//     running under its own task name: Cloud Tasks retries that wake under
//     the queue's backoff, and every delivery of that wake runs its own
//     unfinished claim before anything else (the release
//     after the failure has handed off to the next waiter meanwhile). If the
//     lock is busy then, that retry is answered as in 429 mode: only failing
//     jobs pay the 429 costs.
//
// The cost of a task that waits, measured by BenchmarkParkBurst (bursts of
// 10 to 1,000 tasks on one lock id, enqueued by a Client parking at
// enqueue): parked at enqueue, it passes through the queue not at all; the
// burst's first task and a share of the wakes do — one wake per
// DefaultRunNext (30 s) of work on a lock id, and the safety wakes (about
// one per lease per lock id): 0.009 to 0.4 CreateTask and as many
// dispatches per task, at most 3 and 3. Parked by the Worker instead (a
// Client without ParkAtEnqueue), a task costs its own delivery besides:
// 1.008 to 1.3 dispatches. WaitList operations per task: 1 Park (at
// enqueue, with a lock probe after it; by the Worker, with a Peek after
// it) and 1 FinishClaim; per wake: the releasing holder's Arm, the wake's
// Peek and TakeClaim (its take and its claim in one step), and its last
// run's Finish; see the WaitList implementation for the RPCs each costs.
// No delivery waits in the
// handler, and none is answered 429 or 503 for a busy lock.
//
// The WaitList is separate from the lock backends: package locking only
// calls the hand-off on release (locking.Client.OnRelease), and a lock backend that cannot keep an ordered wait list
// (memcached) still works, with the wait list kept elsewhere (tasks/dswait
// keeps it in Datastore) or with the 429 mode. MemoryWaitList serves tests
// and a single process.
//
// # Guarantees
//
// Cloud Tasks delivers at least once, so a job may run more than once, but
// never twice at the same time for one lock id as long as the lock backend
// holds its guarantee (a Strong lock on Datastore in production): the job's
// context is cancelled when the lock is lost, and Delivery.Token is a fencing
// token for the resource the job writes to. The Cloud Tasks header check is
// not authentication; deploy the worker with --no-allow-unauthenticated so
// that the platform checks the OIDC token.
//
// # Queue settings
//
// Each 429 is an attempt. Give the queue a max attempts (or -1 with a max
// retry duration) that covers the longest queue of tasks on one lock id, and
// a max backoff no shorter than the worker's Retry-After cap.
package tasks
