package app

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"google.golang.org/api/option"

	"github.com/taskguard/taskguard/cloudlog"
	"github.com/taskguard/taskguard/internal/ident"
	"github.com/taskguard/taskguard/internal/reqbody"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/tasks"
)

// maxEnqueueBody bounds the Enqueue function's request body: a task's 1 MB
// plus room for the request's own fields.
const maxEnqueueBody = tasks.MaxTaskSize + 64<<10

// An App holds what the three functions share: the lock client, the task
// worker with its jobs, and the Cloud Tasks client. It does not own the lock
// client: the program's other code shares it.
type App struct {
	cfg     Config
	log     *slog.Logger
	locks   *locking.Client
	worker  *tasks.Worker
	enqueue *tasks.Client // nil when Enqueue is not configured
	cleaner cleaner       // nil when Strong locks are not on Datastore
	busy    string        // the Worker's mode: BusyPark or Busy429
	waitDS  io.Closer     // the wait list's Datastore client, when the App made one
}

// An Option configures New, Register and Handler.
type Option func(*options)

type options struct {
	locks *locking.Client
	jobs  []jobReg
	log   *slog.Logger
	cfg   *Config
	waits tasks.WaitList
	drain time.Duration // DrainOnSIGTERM's wait; 0: none
}

type jobReg struct {
	name string
	fn   tasks.JobFunc
	opts []tasks.JobOption
}

func optionsOf(opts []Option) options {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// WithLocks makes the App take its locks from c, the client the rest of
// the program uses, instead of locking.Default(). A nil c is ignored.
func WithLocks(c *locking.Client) Option {
	return func(o *options) {
		if c != nil {
			o.locks = c
		}
	}
}

// WithJob registers a job with the App's Worker, as tasks.Worker.Handle
// does; jobs belong to the App they are given to, not to the process. Like
// Handle it panics, at once (in the init function that calls Register),
// when name is empty or not valid UTF-8 (the panic quotes it) or fn is nil;
// building the App panics when two jobs have one name.
func WithJob(name string, fn tasks.JobFunc, opts ...tasks.JobOption) Option {
	if name == "" || fn == nil {
		panic("app: WithJob with an empty name or a nil function")
	}
	if err := ident.Check("job", name); err != nil {
		panic("app: WithJob: " + err.Error())
	}
	return func(o *options) { o.jobs = append(o.jobs, jobReg{name, fn, opts}) }
}

// WithConfig makes Register and Handler build their App from cfg instead
// of the environment (ConfigFromEnv): for a program that has its
// configuration already, such as a local runner. New takes its Config as an
// argument.
func WithConfig(cfg Config) Option {
	return func(o *options) { o.cfg = &cfg }
}

// WithWaitList gives the Worker's park mode its wait list, for a program
// whose lock client (WithLocks) keeps its Strong locks where New cannot
// place a wait list from the Config (a Datastore backend of another
// project, database or namespace than the Config's; a store of its own).
// The list must be shared by every instance that serves the Worker. A nil
// list is ignored.
func WithWaitList(l tasks.WaitList) Option {
	return func(o *options) {
		if l != nil {
			o.waits = l
		}
	}
}

// WithLogger sets the logger of the App that Register and Handler build
// (LoggerFromEnv() otherwise). New takes its logger as an argument.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.log = l
		}
	}
}

// New builds the functions from cfg. Their locks come from the client
// given with WithLocks, or else from the process's locking.Default() client
// (whose backends the environment chooses), so that the program's own locks
// and the functions' exclude each other: an App never builds a lock store of
// its own. Its Worker runs the jobs given with WithJob. cfg.Lease is the
// lease of the Worker's task locks.
//
// A busy lock parks the delivery (cfg.Busy BusyPark or empty) when the
// deployment can park: the queue is configured (the Worker creates its
// continuation tasks with the Enqueue function's client) and a wait list is
// shared by every instance — WithWaitList's, or one New places by the lock
// client's Strong backend: in Datastore (package tasks/dswait, in
// cfg.DatastoreProject, Database and Namespace) when Strong locks are on
// Datastore, in memory when they are in this process's memory (correct
// only within one process, as those locks are). Any other Strong backend,
// or no queue, gives 429 mode: with an empty cfg.Busy New logs why at
// WARN; with BusyPark it fails with ErrConfig. In park mode the Enqueue
// function parks bursts on one lock id at enqueue (tasks.Client's
// ParkAtEnqueue) when the Strong store can probe a lock (Datastore's and
// memory's can); otherwise its tasks all go through the queue. The safety nets of parked
// tasks are sized by cfg.Lease (locking.DefaultLease when zero): a job
// given a longer lease by its LockOptions has safety nets that fire before
// its holder's lease ends, find the lock held and are scheduled again.
//
// New fails with the default client's
// error (locking.Client.Err; for example locking.ErrNoStrongBackend on Cloud
// Run without Datastore), wrapped in ErrConfig. It does no network I/O:
// connections are made on first use.
func New(ctx context.Context, cfg Config, log *slog.Logger, opts ...Option) (*App, error) {
	o := optionsOf(opts)
	locks := o.locks
	if locks == nil {
		locks = locking.Default()
	}
	if err := locks.Err(); err != nil {
		return nil, fmt.Errorf("%w: the lock client: %w", ErrConfig, err)
	}
	a := &App{cfg: cfg, log: log, locks: locks}
	if b, ok := locks.Backend(locking.Strong).(*dslock.Backend); ok {
		a.cleaner = b
	}

	var err error
	if cfg.EnqueueEnabled() {
		var copts []option.ClientOption
		if cfg.TasksEmulator != "" {
			copts = tasks.EmulatorOptions(cfg.TasksEmulator)
		}
		a.enqueue, err = tasks.NewClient(ctx, tasks.Config{
			Queue:            cfg.Queue,
			WorkerURL:        cfg.WorkerURL,
			ServiceAccount:   cfg.TaskServiceAccount,
			DispatchDeadline: cmp.Or(cfg.TaskDeadline, tasks.DefaultEnvTaskDeadline),
		}, copts...)
		if err != nil {
			return nil, err
		}
	}

	// The Worker comes after the tasks client: in park mode it creates the
	// continuations with it.
	wopts := []tasks.WorkerOption{tasks.WithLogger(log)}
	if cfg.Lease > 0 {
		wopts = append(wopts, tasks.WithLockOptions(locking.Lease(cfg.Lease)))
	}
	if cfg.Queue != "" {
		wopts = append(wopts, tasks.WithQueue(cfg.Queue))
	}
	wopts = append(wopts, tasks.WithJobDeadline(JobDeadline(cmp.Or(cfg.TaskDeadline, tasks.DefaultEnvTaskDeadline))))
	popts, err := a.parkOptions(ctx, cfg, o.waits)
	if err != nil {
		_ = a.Close()
		return nil, err
	}
	wopts = append(wopts, popts...)
	if a.worker, err = tasks.NewWorker(locks, wopts...); err != nil {
		_ = a.Close()
		return nil, err
	}
	for _, j := range o.jobs {
		a.worker.Handle(j.name, j.fn, j.opts...)
	}
	return a, nil
}

// JobDeadline is the deadline the Worker gives every job of tasks whose
// dispatch deadline is dispatch: a tenth less, and at least 5 s less, so
// that the job is told to stop and the Worker answers before Cloud Tasks
// cancels the attempt (at least 1 s).
func JobDeadline(dispatch time.Duration) time.Duration {
	return max(dispatch-max(dispatch/10, 5*time.Second), time.Second)
}

// cleaner is what CleanupLocks needs of a *dslock.Backend.
type cleaner interface {
	Cleanup(context.Context, dslock.CleanupOptions) (dslock.Report, error)
}

// Close releases the App's own connections: to Cloud Tasks, and to
// Datastore for the wait list when New made one. The lock client is not
// the App's, and stays open.
func (a *App) Close() error {
	var errs []error
	if a.enqueue != nil {
		errs = append(errs, a.enqueue.Close())
	}
	if a.waitDS != nil {
		errs = append(errs, a.waitDS.Close())
	}
	return errors.Join(errs...)
}

// Busy returns what the App's Worker does with a delivery whose lock is
// busy: BusyPark or Busy429.
func (a *App) Busy() string { return a.busy }

// Locks returns the App's lock client.
func (a *App) Locks() *locking.Client { return a.locks }

// Worker is the Cloud Tasks target: it runs each task's job under the task's
// lock (see tasks.Worker for its answers).
func (a *App) Worker() http.Handler { return cloudlog.Middleware(a.worker) }

// enqueueRequest is the Enqueue function's JSON body.
// Its strings decode only when they decode byte for byte (ident.String).
type enqueueRequest struct {
	Job          ident.String    `json:"job"`
	LockID       ident.String    `json:"lockId"`
	Payload      json.RawMessage `json:"payload,omitempty"`
	DelaySeconds float64         `json:"delaySeconds,omitempty"`
	Name         ident.String    `json:"name,omitempty"`
}

// Enqueue is an HTTP endpoint that enqueues one task: POST a JSON body
// {"job", "lockId", "payload" (any JSON), "delaySeconds", "name" (to
// de-duplicate)}. It answers 200 {"task": NAME} — with "duplicate": true when
// a task of that name exists or ran recently —, 400 for a bad request (among
// others a job, lock id or name that is not valid UTF-8 or has an unpaired
// surrogate escape, which would not arrive byte for byte; the error quotes
// it) or an unknown job, 405 for another method, 408 when the body has not
// arrived whole when the request's context ends (the read stops then), 413
// for a body over 1 MB, 503 when the function has no queue configured and
// 502 when Cloud Tasks (or, parking at enqueue, the wait list) fails. In
// park mode a burst on one lock id is parked at enqueue
// (tasks.Client.ParkAtEnqueue): the tasks that follow the first within
// tasks.BurstWindow, or while the lock is held, go into the wait list, not
// the queue, and their "task" names no task in the queue. Deploy it
// with --no-allow-unauthenticated: only callers granted run.invoker may
// enqueue.
func (a *App) Enqueue() http.Handler {
	return cloudlog.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "use POST"})
			return
		}
		if a.enqueue == nil {
			a.log.ErrorContext(ctx, "Enqueue called but no queue is configured", "missing", EnvQueue)
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "no queue configured: set " + EnvQueue + ", " + EnvWorkerURL + " and " + EnvTaskServiceAccount})
			return
		}
		body, err := reqbody.ReadAll(w, r, maxEnqueueBody)
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			writeJSON(w, http.StatusRequestEntityTooLarge, map[string]string{"error": "body over 1 MB"})
			return
		case err != nil && ctx.Err() != nil:
			writeJSON(w, http.StatusRequestTimeout, map[string]string{"error": "the body did not arrive before the request's deadline"})
			return
		case err != nil:
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "reading the body: " + err.Error()})
			return
		}
		var req enqueueRequest
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body is not a JSON enqueue request: " + err.Error()})
			return
		}
		if dec.More() {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body has data after the JSON object"})
			return
		}
		if req.Job != "" && !a.worker.Has(string(req.Job)) {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("unknown job %q", req.Job)})
			return
		}
		if req.DelaySeconds < 0 || req.DelaySeconds > 30*24*3600 {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "delaySeconds must be between 0 and 30 days"})
			return
		}
		t := tasks.Task{Job: string(req.Job), LockID: string(req.LockID), Name: string(req.Name), Delay: time.Duration(req.DelaySeconds * float64(time.Second))}
		if len(req.Payload) > 0 {
			t.Payload = req.Payload
		}
		name, err := a.enqueue.Enqueue(ctx, t)
		switch {
		case errors.Is(err, tasks.ErrDuplicate):
			writeJSON(w, http.StatusOK, map[string]any{"task": name, "duplicate": true})
		case errors.Is(err, tasks.ErrInvalidTask):
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		case err != nil:
			a.log.ErrorContext(ctx, "enqueue failed", "job", req.Job, "lock_id", req.LockID, "error", err)
			writeJSON(w, http.StatusBadGateway, map[string]string{"error": err.Error()})
		default:
			a.log.InfoContext(ctx, "task enqueued", "job", req.Job, "lock_id", req.LockID, "task", name)
			writeJSON(w, http.StatusOK, map[string]any{"task": name})
		}
	}))
}

// CleanupReport is the CleanupLocks function's answer.
type CleanupReport struct {
	Backend   string  `json:"backend"`
	Scanned   int     `json:"scanned"`
	Expired   int     `json:"expired"`
	Deleted   int     `json:"deleted"`
	Skipped   int     `json:"skipped"`
	Errors    int     `json:"errors"`
	Unknown   int     `json:"unknown"`
	ElapsedMS float64 `json:"elapsedMs"`
	Finished  bool    `json:"finished"`
	DryRun    bool    `json:"dryRun"`
	Error     string  `json:"error,omitempty"`
}

// CleanupLocks is the Cloud Scheduler target: it deletes Datastore lock
// entities whose lease ended more than the grace period ago (never a live
// one), stopping before the request's deadline, and answers a JSON
// CleanupReport (dslock.Report says what each count means). The one query
// parameter is dryRun, a boolean as strconv.ParseBool reads it (1, t, true,
// TRUE, True, 0, f, false, ...): when true the run only counts. Any other
// parameter, a repeated one or a value ParseBool refuses answers 400 before
// anything is read or deleted, so a mistyped safety flag never runs a
// deleting cleanup. A run cut short by its time budget alone answers 200
// with "finished": false and the next run goes on; any error (a page's, even
// when the budget also ran out) answers 500 with the error in the report, so
// that the scheduler retries. Other backends need no cleanup: their report
// is empty and finished.
func (a *App) CleanupLocks() http.Handler {
	return cloudlog.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		if r.Method != http.MethodPost && r.Method != http.MethodGet {
			w.Header().Set("Allow", "GET, POST")
			writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "use POST"})
			return
		}
		dry, err := parseCleanupQuery(r.URL.RawQuery)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
			return
		}
		if a.cleaner == nil {
			writeJSON(w, http.StatusOK, CleanupReport{Backend: "none (expired locks in memory, memcached and Valkey vanish by themselves)", Finished: true, DryRun: dry})
			return
		}
		// Stop early enough to answer before the platform's deadline.
		budget := 5 * time.Minute
		if dl, ok := ctx.Deadline(); ok {
			left := time.Until(dl)
			budget = left - max(left/10, 2*time.Second)
		}
		cctx, cancel := context.WithTimeout(ctx, max(budget, time.Second))
		defer cancel()
		rep, err := a.cleaner.Cleanup(cctx, dslock.CleanupOptions{Grace: a.cfg.CleanupGrace, DryRun: dry})
		out := CleanupReport{
			Backend: "datastore", Scanned: rep.Scanned, Expired: rep.Expired, Deleted: rep.Deleted,
			Skipped: rep.Skipped, Errors: rep.Errors, Unknown: rep.Unknown, ElapsedMS: float64(rep.Elapsed.Microseconds()) / 1000,
			Finished: rep.Finished, DryRun: rep.DryRun,
		}
		status := http.StatusOK
		level := slog.LevelInfo
		if err != nil && !(ctx.Err() == nil && onlyDeadline(err)) {
			out.Error, status, level = err.Error(), http.StatusInternalServerError, slog.LevelError
		}
		a.log.Log(ctx, level, "lock cleanup", "scanned", out.Scanned, "deleted", out.Deleted, "skipped", out.Skipped,
			"errors", out.Errors, "unknown", out.Unknown, "finished", out.Finished, "dry_run", out.DryRun, "elapsed_ms", out.ElapsedMS, "error", out.Error)
		writeJSON(w, status, out)
	}))
}

// parseCleanupQuery reads CleanupLocks' query: at most one dryRun, a
// strconv.ParseBool boolean, and nothing else.
func parseCleanupQuery(raw string) (dryRun bool, err error) {
	q, err := url.ParseQuery(raw)
	if err != nil {
		return false, fmt.Errorf("query %q does not parse: %v", raw, err)
	}
	for k, vs := range q {
		switch {
		case k != "dryRun":
			return false, fmt.Errorf("unknown query parameter %q: the only one is dryRun", k)
		case len(vs) != 1:
			return false, fmt.Errorf("dryRun given %d times", len(vs))
		}
		if dryRun, err = strconv.ParseBool(vs[0]); err != nil {
			return false, fmt.Errorf("dryRun=%q is not a boolean (true, false, 1, 0, ...)", vs[0])
		}
	}
	return dryRun, nil
}

// onlyDeadline reports whether err is a run's time budget running out and
// nothing else: every error it joins is a context.DeadlineExceeded.
func onlyDeadline(err error) bool {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			if !onlyDeadline(e) {
				return false
			}
		}
		return len(j.Unwrap()) > 0
	}
	return errors.Is(err, context.DeadlineExceeded)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
