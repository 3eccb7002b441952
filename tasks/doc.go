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
// other); Handle registers jobs by name, on that Worker only. A
// delivery whose lock is held is answered 429 with Retry-After at once, so
// that the queue, not a billed instance, does the waiting. Outcomes map to
// Cloud Tasks semantics: success 204, job error 500 (retried), lock lost 503
// (retried; the lock answers are lockhttp.Policy's, as for HTTP functions
// guarded by package lockhttp), and a task that can never succeed (Permanent error, malformed
// envelope, unknown job, oversized body) 200 with an ERROR log so that it is
// not retried until the queue gives up. See Worker for the full table.
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
