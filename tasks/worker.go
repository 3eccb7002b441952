package tasks

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/taskguard/taskguard/internal/ident"
	"github.com/taskguard/taskguard/internal/reqbody"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockhttp"
)

// Headers Cloud Tasks sets on every delivery. For an HTTP target nothing
// strips them from requests that do not come from Cloud Tasks: they are no
// authentication.
const (
	headerQueueName        = "X-CloudTasks-QueueName"
	headerTaskName         = "X-CloudTasks-TaskName"
	headerRetryCount       = "X-CloudTasks-TaskRetryCount"
	headerExecutionCount   = "X-CloudTasks-TaskExecutionCount"
	headerETA              = "X-CloudTasks-TaskETA"
	headerPreviousResponse = "X-CloudTasks-TaskPreviousResponse"
	headerRetryReason      = "X-CloudTasks-TaskRetryReason"
)

// Status codes of the Worker's answers. See Worker.
const (
	StatusDone     = http.StatusNoContent       // the job succeeded
	StatusDropped  = http.StatusOK              // not retried: permanent error, malformed, unknown job
	StatusBusy     = http.StatusTooManyRequests // lock held: retry after Retry-After
	StatusFailed   = http.StatusInternalServerError
	StatusRetry    = http.StatusServiceUnavailable // lock lost, lock store failed, newer envelope
	StatusRejected = http.StatusForbidden          // not a Cloud Tasks request, or wrong queue
)

// Defaults of the worker options.
const (
	// DefaultMaxRetryAfter caps the Retry-After of a 429.
	DefaultMaxRetryAfter = lockhttp.DefaultMaxRetryAfter
	// DefaultMaxBodyBytes bounds a task body: the task size limit.
	DefaultMaxBodyBytes = MaxTaskSize
	// maxJobWait caps the MaxWait a job may opt into.
	maxJobWait = 30 * time.Second
)

// JobFunc runs one delivery of a task while the worker holds the task's
// lock. Its ctx is cancelled when the request ends or the lock is lost
// (context.Cause is then locking.ErrLockLost); it should stop promptly then.
// Return nil for success, an error to have Cloud Tasks retry the task, or
// Permanent(err) to drop it. The same task may be delivered more than once
// (Cloud Tasks delivers at least once), never twice at the same time.
type JobFunc func(ctx context.Context, d *Delivery) error

// A Worker is the http.Handler that Cloud Tasks delivers tasks to. Register
// jobs with Handle before serving; then it is safe for concurrent use.
//
// For each request it checks the Cloud Tasks headers, reads the envelope
// written by Client.Enqueue, finds the job, and runs it under the task's lock
// with a context carrying the Delivery (FromContext) and the held lock
// (locking.FromContext). Its answers (those about the lock are
// lockhttp.Policy's, the same as package lockhttp's HTTP guard gives):
//
//   - 204 No Content: the job succeeded; Cloud Tasks deletes the task. This
//     holds when only the release of the lock failed afterwards (logged at
//     WARN): the lock then expires with its lease.
//   - 429 Too Many Requests with Retry-After: the lock is held by another
//     holder. The job was not run and the handler did not wait: Retry-After
//     is the holder's remaining lease, rounded up to whole seconds, at least
//     1 s and at most the WithMaxRetryAfter cap, and Cloud Tasks retries
//     then or after its own backoff, whichever is later. Holders renew their
//     lease every third of it, so the remaining lease is usually most of a
//     lease and the cap decides; give the job a shorter lease
//     (LockOptions(locking.Lease(d))) for prompter retries. A job registered
//     with MaxWait waits that long first. Every 429 counts as an attempt, so
//     give the queue enough max attempts or max retry duration. A job that
//     returns a *locking.NotAcquiredError (a lock it took itself was busy)
//     gets the same answer, with that lock's remaining lease.
//   - 500 Internal Server Error: the job failed or panicked, or the lock
//     client cannot work as configured (locking.ErrInvalid, ErrNoBackend,
//     ErrNoStrongBackend, ErrReentrant); retried.
//   - 503 Service Unavailable: the lock was lost while the job ran (the job's
//     context was cancelled), the lock store failed, the body could not be
//     read whole (the client stalled until the request's context ended, or
//     went away), or the envelope has a newer version than this worker reads
//     (a deploy in progress); retried. No lock is taken before the body is
//     read.
//   - 200 OK with an ERROR log: the task can never succeed, so it is
//     dropped rather than retried until the queue gives up: the job
//     returned Permanent(err), the body is not a valid envelope (among
//     others: its job or lock id would not decode byte for byte, being
//     invalid UTF-8 or an unpaired surrogate escape), is larger than the body
//     limit, or names a job that is not registered and was enqueued more
//     than UnknownJobGrace ago (or has no enqueue time). No lock is taken.
//   - 503 for a task whose job is not registered and that was enqueued
//     within UnknownJobGrace: a deploy that adds the job may be rolling
//     out, and a retry may reach an instance that has it.
//   - With WithRunRecords: 204 without running the job when its task ran to
//     an end already (a retry or duplicate; see WithRunRecords), and 503
//     when the run records cannot be read.
//   - 503 also when the steps before the job (taking the lock, the run
//     records) took longer than the step budget (WithStepBudget).
//   - 403 Forbidden: the request has no X-CloudTasks-TaskName or
//     X-CloudTasks-QueueName header, or names another queue than the one set
//     with WithQueue.
//
// Security: for an HTTP target (a Cloud Run function) nothing strips
// X-CloudTasks-* headers from requests that do not come from Cloud Tasks, so
// the 403 check turns away stray traffic but is not authentication. The real
// gate is the platform's OIDC check: deploy the worker with
// --no-allow-unauthenticated (and internal ingress) and grant
// roles/run.invoker only to the service account in Config.ServiceAccount.
//
// Busy mode: a Worker is in 429 mode unless given WithParking; the deployed
// functions (package app) park by default. In 429 mode without
// WithRunRecords a retry or duplicate of a task whose run ended is run
// again (Cloud Tasks delivers at least once, and retries an attempt at its
// dispatch deadline while its job still runs); with it, and in park mode,
// it is answered 204 and not run. On Cloud Run (K_SERVICE set) a
// Worker built without WithParking logs at WARN once, at NewWorker, what
// 429 mode costs there.
type Worker struct {
	locker        *locking.Client
	log           *slog.Logger
	queue         string // short queue id to require; "" accepts any
	maxBody       int64
	maxRetryAfter time.Duration
	lockOpts      []locking.Option // every job's, before its own
	park          *parking         // park mode (park.go); nil: 429 mode
	jobDeadline   time.Duration    // 0: none but the request's
	stepBudget    time.Duration    // for the steps before a job runs
	runs          WaitList         // 429 mode's run records; nil: none
	runNext       *time.Duration   // WithRunNext; nil: the default

	mu   sync.RWMutex
	jobs map[string]*job // guarded by mu
}

type job struct {
	fn       JobFunc
	maxWait  time.Duration
	lockOpts []locking.Option
	coalesce bool // park mode only; see Coalesce
}

var queueIDRE = regexp.MustCompile(`^[A-Za-z0-9\-]{1,100}$`)

// A WorkerOption configures NewWorker.
type WorkerOption func(*Worker) error

// WithLogger sets the logger; slog.Default() otherwise.
func WithLogger(l *slog.Logger) WorkerOption {
	return func(w *Worker) error {
		if l == nil {
			return fmt.Errorf("%w: nil logger", ErrInvalidConfig)
		}
		w.log = l
		return nil
	}
}

// WithQueue makes the worker accept only deliveries from this queue, given
// as its id ("jobs") or full name ("projects/P/locations/L/queues/jobs").
func WithQueue(queue string) WorkerOption {
	return func(w *Worker) error {
		id := queue[strings.LastIndex(queue, "/")+1:]
		if !queueIDRE.MatchString(id) || (strings.Contains(queue, "/") && !queueRE.MatchString(queue)) {
			return fmt.Errorf("%w: queue %q", ErrInvalidConfig, queue)
		}
		w.queue = id
		return nil
	}
}

// WithMaxBodyBytes bounds the request body; DefaultMaxBodyBytes otherwise.
func WithMaxBodyBytes(n int64) WorkerOption {
	return func(w *Worker) error {
		if n <= 0 {
			return fmt.Errorf("%w: max body bytes %d", ErrInvalidConfig, n)
		}
		w.maxBody = n
		return nil
	}
}

// WithMaxRetryAfter caps the Retry-After of a 429; DefaultMaxRetryAfter
// otherwise. It must be at least one second.
func WithMaxRetryAfter(d time.Duration) WorkerOption {
	return func(w *Worker) error {
		if d < time.Second {
			return fmt.Errorf("%w: max Retry-After %v is below 1s", ErrInvalidConfig, d)
		}
		w.maxRetryAfter = d
		return nil
	}
}

// WithLockOptions adds locking options (Lease, Kind, StealAfter) to every
// job's lock, before the job's own LockOptions (which win where both set the
// same thing). Wait and MaxWait are set by the worker and should not be
// given here.
func WithLockOptions(opts ...locking.Option) WorkerOption {
	return func(w *Worker) error {
		w.lockOpts = append(w.lockOpts, opts...)
		return nil
	}
}

// WithRunRecords makes a Worker in 429 mode keep a record of every task
// whose job ran to an end (it succeeded or failed permanently) in list, for
// FinishedRetention (Cloud Tasks' dedup window), and answer a later delivery
// of that task 204 without running it. Cloud Tasks retries an attempt at its
// dispatch deadline even while the job still runs, and delivers a task at
// least once: without run records, such a retry or duplicate that finds the
// lock free again (the first run ended) runs the job a second time. With
// them it costs, per delivery, one Peek before the job (a Datastore list:
// one query and one lookup, together) and one Finish after it (one
// transaction); a failed Peek is answered 503 and retried, without running
// the job. Park mode (WithParking) keeps these records in its wait list
// already, so the two options do not go together. The record's key is the
// queue id and task name: a task enqueued without a Name gets a new name
// for every Enqueue, so only its retries and duplicates are recognised.
func WithRunRecords(list WaitList) WorkerOption {
	return func(w *Worker) error {
		if list == nil {
			return fmt.Errorf("%w: WithRunRecords needs a WaitList", ErrInvalidConfig)
		}
		w.runs = list
		return nil
	}
}

// ErrJobDeadline is the cause (context.Cause) of a job's context ended by
// the Worker's job deadline (WithJobDeadline).
var ErrJobDeadline = errors.New("tasks: the job's deadline passed (it must finish within its task's dispatch deadline)")

// WithJobDeadline bounds every job's run to d (at least 1 s, at most
// MaxDispatchDeadline): its context ends then, with context.Cause
// ErrJobDeadline, and the Worker answers as for any job error (500,
// retried). Give d a margin below the tasks' dispatch deadline (package
// app gives the deadline minus a tenth, at least 5 s), so that the job
// stops, and the Worker answers, before Cloud Tasks cancels the attempt and
// retries it while the job still runs. A job longer than the dispatch
// deadline does not belong in a task: split it into tasks that each finish
// within it (each enqueueing the next, with its progress in the payload or
// in a store), or run it as a Cloud Run job or a Workflows step.
func WithJobDeadline(d time.Duration) WorkerOption {
	return func(w *Worker) error {
		if d < time.Second || d > MaxDispatchDeadline {
			return fmt.Errorf("%w: job deadline %v is not in [1s, %v]", ErrInvalidConfig, d, MaxDispatchDeadline)
		}
		w.jobDeadline = d
		return nil
	}
}

// DefaultStepBudget bounds the steps of a delivery before its job runs
// (taking the lock, and in park mode the wait list's steps); see
// WithStepBudget.
const DefaultStepBudget = 10 * time.Second

// ErrStepBudget is the cause of a delivery's context ended because its
// steps before the job (taking the lock, the wait list) took longer than
// the Worker's step budget: a store that is down or contended. The Worker
// answers 503, and Cloud Tasks retries later.
var ErrStepBudget = errors.New("tasks: the lock and wait-list steps took longer than the step budget")

// WithStepBudget bounds the steps of a delivery before its job runs: taking
// the lock (plus the job's MaxWait, in 429 mode) and, in park mode, the
// wait list's steps; DefaultStepBudget otherwise. When they take longer (a
// lock store that is down or contended), the delivery is answered 503 and
// retried by Cloud Tasks, instead of holding a dispatch slot and a billed
// instance until the request ends. The job itself is bounded by
// WithJobDeadline, not by this. d must be within [100ms, 5m].
func WithStepBudget(d time.Duration) WorkerOption {
	return func(w *Worker) error {
		if d < 100*time.Millisecond || d > 5*time.Minute {
			return fmt.Errorf("%w: step budget %v is not in [100ms, 5m]", ErrInvalidConfig, d)
		}
		w.stepBudget = d
		return nil
	}
}

// stepBudget ends a delivery's context when its steps before the job take
// longer than d, unless the job started first.
type stepBudget struct {
	state atomic.Int32 // 0 running the steps, 1 job started, 2 budget spent
	timer *time.Timer
}

type stepBudgetKey struct{}

// budgeted returns ctx bounded by budget d until jobStarted is called on it.
func budgeted(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	b := &stepBudget{}
	b.timer = time.AfterFunc(d, func() {
		if b.state.CompareAndSwap(0, 2) {
			cancel(ErrStepBudget)
		}
	})
	return context.WithValue(ctx, stepBudgetKey{}, b), func() { b.timer.Stop(); cancel(nil) }
}

// jobStarted stops ctx's step budget and reports false when it was spent
// already: the job must not start.
func jobStarted(ctx context.Context) bool {
	b, _ := ctx.Value(stepBudgetKey{}).(*stepBudget)
	if b == nil {
		return true
	}
	if b.state.CompareAndSwap(0, 1) {
		b.timer.Stop()
		return true
	}
	return b.state.Load() == 1
}

// jobContext bounds a job's context by the job deadline.
func (w *Worker) jobContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if w.jobDeadline <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeoutCause(ctx, w.jobDeadline, ErrJobDeadline)
}

// NewWorker returns a worker that takes its locks from locker, or from the
// process's locking.Default() client when locker is nil: share one client
// with the rest of the program, so that its locks and the worker's exclude
// each other. It fails with an error wrapping ErrInvalidConfig for a bad
// option, and with the default client's error (locking.Client.Err, for
// example locking.ErrNoStrongBackend) when locker is nil and that client
// cannot take locks.
func NewWorker(locker *locking.Client, opts ...WorkerOption) (*Worker, error) {
	if locker == nil {
		locker = locking.Default()
		if err := locker.Err(); err != nil {
			return nil, fmt.Errorf("tasks: the default lock client: %w", err)
		}
	}
	w := &Worker{
		locker:        locker,
		log:           slog.Default(),
		maxBody:       DefaultMaxBodyBytes,
		maxRetryAfter: DefaultMaxRetryAfter,
		stepBudget:    DefaultStepBudget,
		jobs:          map[string]*job{},
	}
	for _, o := range opts {
		if err := o(w); err != nil {
			return nil, err
		}
	}
	if w.park != nil && w.park.h == nil {
		return nil, fmt.Errorf("%w: WithParkingLease without WithParking", ErrInvalidConfig)
	}
	if w.park != nil && w.runs != nil {
		return nil, fmt.Errorf("%w: WithRunRecords with WithParking (park mode keeps run records in its wait list)", ErrInvalidConfig)
	}
	if w.park != nil {
		w.park.h.register(locker, w.log, w.park.metrics)
	} else if os.Getenv("K_SERVICE") != "" {
		w.log.Warn("tasks: this Worker answers a busy lock 429 (no WithParking): on Cloud Tasks that means the queue's backoff (5, 15, 35 ... s), an attempt spent per 429, and system throttling of the whole queue; give it WithParking to park busy tasks instead")
	}
	return w, nil
}

// A JobOption configures one job registered with Worker.Handle.
type JobOption func(*job)

// MaxWait makes the job wait up to d (at most 30 s) for its lock inside the
// handler before answering 429, instead of answering at once. Use it only
// for locks held briefly: the wait is billed time. In park mode
// (WithParking, the deployed functions' default) it does nothing: a busy
// lock parks the delivery at once, and its holder hands the lock on.
func MaxWait(d time.Duration) JobOption {
	return func(j *job) { j.maxWait = min(max(d, 0), maxJobWait) }
}

// LockOptions adds locking options (Lease, Kind, StealAfter) to the job's
// lock. Wait and MaxWait are set by the worker and should not be given here.
func LockOptions(opts ...locking.Option) JobOption {
	return func(j *job) { j.lockOpts = append(j.lockOpts, opts...) }
}

// Handle registers fn as the job called name. Like http.ServeMux.Handle it
// panics when name is empty or not valid UTF-8 (no task could name it byte
// for byte; the panic quotes it), fn is nil or name is already registered,
// since those are programming errors.
func (w *Worker) Handle(name string, fn JobFunc, opts ...JobOption) {
	if name == "" || fn == nil {
		panic("tasks: Handle with an empty name or a nil function")
	}
	if err := ident.Check("job", name); err != nil {
		panic("tasks: Handle: " + err.Error())
	}
	j := &job{fn: fn}
	for _, o := range opts {
		o(j)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.jobs[name] != nil {
		panic(fmt.Sprintf("tasks: job %q registered twice", name))
	}
	w.jobs[name] = j
	if j.coalesce && w.park != nil {
		// Its Client, parking at enqueue, absorbs the job's tasks as this
		// Worker does.
		w.park.h.client.coalesces(name)
	}
}

// Has reports whether a job called name is registered, so that an enqueuer
// in the same binary can refuse a task no worker would run.
func (w *Worker) Has(name string) bool { return w.job(name) != nil }

func (w *Worker) job(name string) *job {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.jobs[name]
}

// Delivery is one delivery of a task to its job.
type Delivery struct {
	// Job and LockID are the task's, as enqueued.
	Job, LockID string
	// Token is the fencing token of the lock held for this delivery: strictly
	// greater than that of every earlier holding of LockID. Hand it to the
	// resource the job writes to. Parked tasks that one wake runs one after
	// another (WithRunNext) are one holding and share its token.
	Token uint64
	// Lock is the held lock. The worker releases it; the job must not.
	Lock *locking.Lock
	// Payload is the task's payload: the bytes given to Enqueue as []byte,
	// otherwise its JSON. Nil when there is none.
	Payload []byte
	// EnqueuedAt is when Enqueue built the task, on the enqueuer's clock.
	EnqueuedAt time.Time
	// TaskName and QueueName are the task and queue ids (the last element of
	// their full names).
	TaskName, QueueName string
	// RetryCount is the number of earlier attempts of this task, 429s
	// included; ExecutionCount the number of earlier attempts answered with a
	// status below 500.
	RetryCount, ExecutionCount int
	// ETA is the time this attempt was scheduled for.
	ETA time.Time
	// PreviousResponse is the HTTP status of the previous attempt (0 when
	// none) and RetryReason Cloud Tasks' reason for this retry.
	PreviousResponse int
	RetryReason      string

	began time.Time // when the delivery came
	// A wake's run-next budget (runNextBudget) and start-by limit
	// (startByLimit), for its dispatch deadline.
	runNext, startBy time.Duration
}

// recordKey is the key of the delivery's task in a WaitList (its waiter
// record, its run record, and its runner name): the queue id and the task
// name (taskKey).
func (d *Delivery) recordKey() string { return taskKey(d.QueueName, d.TaskName) }

// taskKey is the WaitList key of the task taskID of the queue queueID (ids:
// the last elements of their full names), wherever it was recorded: by a
// Worker for a delivery, or by Enqueue parking it, so that the two dedup
// each other.
func taskKey(queueID, taskID string) string { return queueID + "/" + taskID }

// coalesceKey is the WaitList key of the one waiter of coalescing job on a
// lock id, for tasks of the queue queueID.
func coalesceKey(queueID, job string) string { return "coalesce/" + queueID + "/" + job }

// Decode unmarshals the JSON payload into v.
func (d *Delivery) Decode(v any) error {
	if d.Payload == nil {
		return errors.New("tasks: the task has no payload")
	}
	return json.Unmarshal(d.Payload, v)
}

type deliveryKey struct{}

// FromContext returns the Delivery of the job running with ctx, or nil.
func FromContext(ctx context.Context) *Delivery {
	d, _ := ctx.Value(deliveryKey{}).(*Delivery)
	return d
}

// ErrPermanent is matched (errors.Is) by every error made by Permanent.
var ErrPermanent = errors.New("tasks: permanent failure")

// Permanent marks err as a failure that retrying cannot fix: the worker
// answers 200 and logs it at ERROR, and Cloud Tasks drops the task.
// errors.Is(Permanent(err), ErrPermanent) and errors.Is(Permanent(err), err)
// are true. Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanentError{err}
}

type permanentError struct{ err error }

func (e *permanentError) Error() string        { return "tasks: permanent failure: " + e.err.Error() }
func (e *permanentError) Unwrap() error        { return e.err }
func (e *permanentError) Is(target error) bool { return target == ErrPermanent }

// UnknownJobGrace is how long after it was enqueued (or, in park mode,
// parked) a task whose job this Worker does not have is retried rather
// than dropped or set aside: during a rolling deploy that adds a job, the
// new revision's tasks reach instances of the old one, which must not lose
// them. After it the task is taken for one whose job was removed or
// renamed. A rollout that splits traffic between revisions for longer than
// the grace may still lose such tasks: finish it within the grace, or add a
// job in a deploy of its own before the code that enqueues it.
const UnknownJobGrace = 15 * time.Minute

// newJobPossible reports whether a task enqueued (or parked) at t whose job
// is not registered may be of a job a deploy is adding: t is known and
// within UnknownJobGrace, and not more than a minute ahead of this clock (a
// time far ahead is a wrong clock or a forged envelope, not a new task: it
// would be retried for as long as it is ahead).
func newJobPossible(t time.Time) bool {
	age := time.Since(t)
	return !t.IsZero() && age > -time.Minute && age < UnknownJobGrace
}

// errRunRecords marks a failed read of 429 mode's run records.
var errRunRecords = errors.New("tasks: run records")

// errPanic marks a job that panicked.
var errPanic = errors.New("tasks: job panicked")

// ServeHTTP handles one delivery; see Worker for its answers.
func (w *Worker) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	d := &Delivery{
		began:       time.Now(),
		TaskName:    r.Header.Get(headerTaskName),
		QueueName:   r.Header.Get(headerQueueName),
		RetryReason: r.Header.Get(headerRetryReason),
	}
	log := w.log.With("task", d.TaskName, "queue", d.QueueName)
	if d.TaskName == "" || d.QueueName == "" {
		log.WarnContext(r.Context(), "tasks: rejected a request without Cloud Tasks headers", "remote", r.RemoteAddr)
		http.Error(rw, "not a Cloud Tasks request", StatusRejected)
		return
	}
	if w.queue != "" && d.QueueName != w.queue {
		log.WarnContext(r.Context(), "tasks: rejected a delivery from another queue", "want_queue", w.queue)
		http.Error(rw, "wrong queue", StatusRejected)
		return
	}
	d.RetryCount = atoiOr0(r.Header.Get(headerRetryCount))
	d.ExecutionCount = atoiOr0(r.Header.Get(headerExecutionCount))
	d.PreviousResponse = atoiOr0(r.Header.Get(headerPreviousResponse))
	d.ETA = parseETA(r.Header.Get(headerETA))
	log = log.With("retry_count", d.RetryCount)

	if r.Method != http.MethodPost {
		w.drop(rw, r, log, fmt.Errorf("%w: method %s", errMalformed, r.Method))
		return
	}
	// Read before any lock is taken, and only while the request lasts.
	body, err := reqbody.ReadAll(rw, r, w.maxBody)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			w.drop(rw, r, log, fmt.Errorf("%w: body larger than %d bytes", errMalformed, w.maxBody))
			return
		}
		log.WarnContext(r.Context(), "tasks: reading the task body failed", "error", err)
		http.Error(rw, "reading body failed", StatusRetry)
		return
	}
	env, err := decodeEnvelope(body)
	if errors.Is(err, errVersion) {
		log.ErrorContext(r.Context(), "tasks: envelope of a newer version; retrying (is a deploy in progress?)", "error", err)
		http.Error(rw, "unsupported envelope version", StatusRetry)
		return
	}
	if err != nil {
		w.drop(rw, r, log, err)
		return
	}
	d.Job, d.LockID, d.EnqueuedAt = string(env.Job), string(env.LockID), env.EnqueuedAt
	d.Payload = env.Data
	if env.Payload != nil {
		d.Payload = env.Payload
	}
	log = log.With("job", d.Job, "lock_id", d.LockID)
	j := w.job(d.Job)
	budget := w.stepBudget
	if j != nil && w.park == nil {
		budget += j.maxWait
	}
	ctx, cancel := budgeted(r.Context(), budget)
	defer cancel()
	r = r.WithContext(ctx)
	if env.Wake != nil {
		if w.park == nil {
			// Tasks wait for it (this worker's deployment parked them, and
			// then went to 429 mode): retried, not dropped.
			log.ErrorContext(r.Context(), "tasks: a wake of park mode reached a worker in 429 mode; retrying (parked tasks wait for a worker with WithParking)")
			http.Error(rw, "this worker does not park", StatusRetry)
			return
		}
		if j == nil {
			j = &job{} // the wake runs its lock id's waiters, whatever their job
		}
		w.serveParked(rw, r, log, j, d, env)
		return
	}
	if j == nil {
		if newJobPossible(d.EnqueuedAt) {
			log.WarnContext(r.Context(), "tasks: the task's job is not registered on this instance (a deploy adding it in progress?); retrying",
				"enqueued_at", d.EnqueuedAt, "retried_until", d.EnqueuedAt.Add(UnknownJobGrace))
			http.Error(rw, "job not registered here", StatusRetry)
			return
		}
		w.drop(rw, r, log, fmt.Errorf("unknown job %q", d.Job))
		return
	}
	if w.park != nil {
		w.serveParked(rw, r, log, j, d, env)
		return
	}
	w.run(rw, r, log, j, d)
}

// run runs the job under its lock and answers.
func (w *Worker) run(rw http.ResponseWriter, r *http.Request, log *slog.Logger, j *job, d *Delivery) {
	opts := w.lockOptions(j)
	if j.maxWait > 0 {
		opts = append(opts, locking.Wait(true), locking.MaxWait(j.maxWait))
	}
	ran, done := false, false
	var jobErr error
	key := d.recordKey()
	start := time.Now()
	err := w.locker.With(r.Context(), d.LockID, func(ctx context.Context) (err error) {
		if w.runs != nil {
			switch _, _, st, _, err := w.runs.Peek(ctx, d.LockID, key); {
			case err != nil:
				return fmt.Errorf("%w: reading the task's run record: %w", errRunRecords, err)
			case st == Finished:
				done = true
				return nil
			}
		}
		if !jobStarted(ctx) {
			return fmt.Errorf("%w: %w", errNotStarted, context.Cause(ctx))
		}
		ran = true
		d.Lock = locking.FromContext(ctx)
		d.Token = d.Lock.Token()
		defer func() {
			if w.runs != nil && (err == nil || errors.Is(err, ErrPermanent)) {
				// A retry of this run (Cloud Tasks retries at the dispatch
				// deadline while it runs) or a duplicate must not run again.
				finishRun(ctx, log, w.runs, d.LockID, key, "")
			}
		}()
		defer func() {
			if p := recover(); p != nil {
				log.ErrorContext(r.Context(), "tasks: job panicked", "token", d.Token, "panic", p, "stack", string(debug.Stack()))
				err = fmt.Errorf("%w: %v", errPanic, p)
			}
			jobErr = err
		}()
		jctx, cancel := w.jobContext(ctx)
		defer cancel()
		return j.fn(context.WithValue(jctx, deliveryKey{}, d), d)
	}, opts...)
	log = log.With("token", d.Token)
	if ran {
		log = log.With("duration", time.Since(start))
	}

	// The lock's answers (lost, busy, not taken) are lockhttp's, shared with
	// its HTTP guard; a job's own answers follow.
	policy := w.policy()
	var busy *locking.NotAcquiredError
	switch {
	case done:
		log.InfoContext(r.Context(), "tasks: the task ran to an end already (its run record says so); not running it again")
		rw.WriteHeader(StatusDone)
	case errors.Is(err, errNotStarted):
		log.ErrorContext(r.Context(), "tasks: the steps before the job took longer than the step budget; retrying", "error", err)
		http.Error(rw, "step budget spent", StatusRetry)
	case errors.Is(err, errRunRecords):
		log.ErrorContext(r.Context(), "tasks: could not read the task's run record; retrying", "error", err)
		http.Error(rw, "run records unavailable", StatusRetry)
	case errors.Is(err, locking.ErrLockLost):
		log.ErrorContext(r.Context(), "tasks: lock lost while the job ran; retrying", "error", err)
		w.answer(rw, policy, err)
	case !ran && errors.As(err, &busy), ran && errors.As(jobErr, &busy):
		// The task's own lock (not run), or a lock the job took itself.
		log.InfoContext(r.Context(), "tasks: lock held; asking Cloud Tasks to retry later", "busy_lock", busy.ID,
			"remaining", busy.Remaining, "retry_after_s", policy.RetryAfter(busy.Remaining), "job_ran", ran)
		w.answer(rw, policy, busy)
	case !ran:
		// Acquire failed: the lock store, the request's context, or the
		// lock client's configuration.
		log.ErrorContext(r.Context(), "tasks: could not take the lock; retrying", "error", err)
		w.answer(rw, policy, err)
	case jobErr == nil:
		if err != nil {
			// The job is done and the lock was not lost; only the release
			// failed, and the lock expires with its lease. Running the job
			// again would repeat finished work.
			log.WarnContext(r.Context(), "tasks: job done, but releasing its lock failed", "error", err)
		} else {
			log.DebugContext(r.Context(), "tasks: job done")
		}
		rw.WriteHeader(StatusDone)
	case errors.Is(jobErr, ErrPermanent):
		w.drop(rw, r, log, jobErr)
	default:
		log.ErrorContext(r.Context(), "tasks: job failed; Cloud Tasks will retry", "error", jobErr)
		http.Error(rw, "job failed", StatusFailed)
	}
}

// policy is the Worker's mapping of lock errors to answers.
// lockOptions are the options of j's lock, in every mode: no waiting, then
// every job's (WithLockOptions), then j's own (LockOptions).
func (w *Worker) lockOptions(j *job) []locking.Option {
	return append(append([]locking.Option{locking.Wait(false)}, w.lockOpts...), j.lockOpts...)
}

func (w *Worker) policy() lockhttp.Policy {
	return lockhttp.Policy{BusyStatus: StatusBusy, MaxRetryAfter: w.maxRetryAfter}
}

// retryAfter is the Retry-After, in whole seconds, for a busy lock whose
// holder's lease has remaining left.
func (w *Worker) retryAfter(remaining time.Duration) int {
	return w.policy().RetryAfter(remaining)
}

// answer writes policy's answer for the lock error err.
func (w *Worker) answer(rw http.ResponseWriter, policy lockhttp.Policy, err error) {
	a, _ := policy.Answer(err)
	a.Write(rw)
}

// drop answers 200 for a task that can never succeed, and logs why at ERROR.
func (w *Worker) drop(rw http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	log.ErrorContext(r.Context(), "tasks: dropping a task that cannot succeed", "error", err)
	rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
	rw.WriteHeader(StatusDropped)
	_, _ = io.WriteString(rw, "dropped: not retried\n")
}

func atoiOr0(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0
	}
	return n
}

// parseETA reads X-CloudTasks-TaskETA, seconds since the Unix epoch with a
// fraction; the zero time when absent or malformed.
func parseETA(s string) time.Time {
	if s == "" {
		return time.Time{}
	}
	sec, frac, _ := strings.Cut(s, ".")
	whole, err := strconv.ParseInt(sec, 10, 64)
	if err != nil {
		return time.Time{}
	}
	var ns int64
	if frac != "" {
		frac = (frac + "000000000")[:9]
		if ns, err = strconv.ParseInt(frac, 10, 64); err != nil {
			return time.Time{}
		}
	}
	return time.Unix(whole, ns).UTC()
}
