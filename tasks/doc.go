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
// envelope, unknown job, oversized body) 200 with an ERROR log so that it is
// not retried until the queue gives up. See Worker for the full table.
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
//     that lock id in a WaitList (durably; ordered by when it first arrived;
//     keyed by queue and task name, so a duplicate delivery finds its record)
//     and creates a safety-net continuation task due when the holder's lease
//     could end (its remaining lease plus a margin). Only when both exist
//     does it answer 202 Accepted; if either fails, 503 and nothing is lost.
//     It then tries the lock once more, so that a release between its first
//     try and its record (which would see no waiter) cannot strand it.
//   - Hand off. Whoever holds a lock id checks its wait list before running
//     anything: if an older waiter exists, a fresh delivery parks behind it
//     and lets go (FIFO: a newcomer never overtakes). After a job, the holder
//     releases the lock and at once creates a continuation for the oldest
//     waiter. Continuations are ordinary tasks of the same queue carrying the
//     original job, lock id and payload plus the waiter's key (envelope
//     version 2; a worker that reads only version 1 answers 503 and Cloud
//     Tasks retries it after the deploy).
//   - Claim. A continuation runs the job only if, holding the lock, it can
//     claim its waiter record (waiting -> running, one winner), so a hand-off
//     and a safety net, or two hand-offs, never both run it. When the job
//     ends the record is marked done (kept for the dedup window, so that a
//     late duplicate of the original delivery does not run it again).
//   - Names. Continuation ids are derived, not random: a hand-off's from the
//     waiter's key and the fencing token of the holding that handed off, a
//     safety net's from the key and its generation. A duplicate delivery
//     therefore creates no duplicate continuation (ALREADY_EXISTS is
//     success), and each holding hands off at most once per waiter.
//   - Crashes. If the holder dies, its lock expires with its lease and the
//     parked waiters' safety nets, due by then, take the lock and resume the
//     hand-off chain. A safety net that finds the lock still held schedules
//     the next one (generation + 1) while its waiter is still waiting.
//   - Coalescing (opt-in per job: Coalesce). A coalescing job has one
//     waiter per lock id: while it waits, further deliveries are absorbed
//     (204, logged with coalesced=true); its run gets the payload of the
//     delivery that parked it, and absorbed payloads are dropped. Its
//     record is removed when claimed, so a delivery that comes during the
//     run parks a new one.
//   - Failures. A continuation whose job fails answers 500 and keeps its
//     record running under its own task name: Cloud Tasks retries that
//     continuation under the queue's backoff, and its retry may claim the
//     record again. If the lock is busy then, that retry is answered as in
//     429 mode: only failing jobs pay the 429 costs.
//
// The cost of a task that waits: Cloud Tasks operations, 1 CreateTask for
// its safety net (more only if a holding outlives a lease) and 1 for its
// hand-off (plus one per fresh delivery that overtook the lock while the
// hand-off was in flight), and the dispatches of those continuations.
// WaitList operations, 1 Park, then per hand-off 1 Oldest, and 1 Claim and
// 1 Done for the run; see the WaitList implementation for the RPCs each
// costs. No delivery waits in the handler, and none is answered 429 or 503
// for a busy lock.
//
// The WaitList is separate from the lock backends: package locking does not
// change, and a lock backend that cannot keep an ordered wait list
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
