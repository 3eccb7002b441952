package tasks

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/internal/ident"
	"github.com/taskguard/taskguard/locking"
)

// StatusParked is the answer, in park mode, to a delivery whose lock is busy
// and that is now recorded as a waiter with a pending wake: Cloud Tasks
// deletes the task, and a wake will run the job.
const StatusParked = http.StatusAccepted

// DefaultSafetyMargin is added to a holder's remaining lease to schedule a
// lock id's safety wake: time for the lock's expiry to be judged and the
// wake to be dispatched. A safety wake that comes too early finds the lock
// held and arms the next one.
const DefaultSafetyMargin = time.Second

// handoffTimeout bounds a hand-off made outside a request (OnRelease runs
// within the release's own budget).
const handoffTimeout = 10 * time.Second

// maxSetAside bounds the waiters one wake sets aside (they cannot run:
// their job is not registered, or their record does not decode) before it
// runs one or gives up its turn.
const maxSetAside = 16

// parking is a Worker's park mode.
type parking struct {
	h       *handoff
	list    WaitList
	margin  time.Duration
	lease   time.Duration // the longest lease of the jobs' locks
	metrics *parkMetrics
}

// WithParking turns on park and hand-off (see the package documentation):
// a delivery whose lock is busy is parked in list and answered StatusParked
// instead of 429, and every release of a lock by the worker's lock client
// hands the lock to the oldest waiter through a wake task that c creates (c
// must enqueue to the queue and URL this worker serves; the worker's
// service account then needs to create tasks on the queue and act as c's
// ServiceAccount). NewWorker registers the hand-off on the worker's lock
// client (HandOff), so releases by the rest of the program through that
// client (locking.With, lockhttp.Guard, Lock.Release) hand off too.
// Without it the worker runs in 429 mode.
func WithParking(c *Client, list WaitList) WorkerOption {
	return func(w *Worker) error {
		if c == nil || list == nil {
			return fmt.Errorf("%w: WithParking needs a Client and a WaitList", ErrInvalidConfig)
		}
		m, err := newParkMetrics(nil)
		if err != nil {
			return err
		}
		lease := locking.DefaultLease
		if w.park != nil {
			lease = w.park.lease
		}
		w.park = &parking{h: &handoff{client: c, list: list}, list: list, margin: DefaultSafetyMargin, lease: lease, metrics: m}
		return nil
	}
}

// WithParkingLease tells a worker in park mode the longest lease its jobs'
// locks use (locking.DefaultLease when not given): a lock id's safety wake
// is due that long (plus DefaultSafetyMargin) after a waiter parked behind a
// holding of this worker, when a holder that died would have lost the lock.
// A delivery parked behind a busy lock uses the holder's remaining lease
// instead. It may be given before or after WithParking.
func WithParkingLease(d time.Duration) WorkerOption {
	return func(w *Worker) error {
		if d <= 0 || d > locking.MaxLease {
			return fmt.Errorf("%w: parking lease %v is not in (0, %v]", ErrInvalidConfig, d, locking.MaxLease)
		}
		if w.park == nil {
			w.park = &parking{lease: d}
			return nil
		}
		w.park.lease = d
		return nil
	}
}

// DefaultRunNext is a wake's run-next budget when WithRunNext is not
// given: see WithRunNext.
const DefaultRunNext = 30 * time.Second

// WithRunNext sets how long a wake, in park mode, goes on running a lock
// id's parked tasks one after another: a wake that ran a parked task
// successfully, still holding the lock, claims the next oldest one (and
// finishes the one it ran) in one wait-list step (WaitList.FinishClaim)
// and runs it in the same request, as long as less than d has passed since
// its delivery came; then it releases, and the release hands off as
// usual. A hand-off within a wake costs that step (on Datastore 4 RPCs in
// 3 round trips) instead of a release, an arming, a CreateTask, a dispatch,
// an acquire and a claim. Jobs run this way in one holding share its
// fencing token (fences accept a token equal to the highest they saw). A
// job that fails ends the wake's run of tasks: its delivery is answered as
// for that job (a retry of the wake runs the failed task again first).
//
// d = 0 turns it off: one parked task per wake. The default is
// DefaultRunNext. With a job deadline (WithJobDeadline; package app sets
// one) the budget is cut so that a job started within it ends before the
// wake's dispatch deadline: to the dispatch deadline minus the job
// deadline minus 1 s. Without one, jobs are not bounded by the Worker at
// all, and the budget is cut to a tenth of the dispatch deadline. The dispatch
// deadline is that of the Client given to WithParking, or the wake's own
// when shorter (a wake created by HandOff through another Client). A step
// to the next task that ends after the job deadline's cut (a slow store)
// does not start it: the wake is answered 500 and its retry runs it.
// Meanwhile other callers waiting for the lock id (lockhttp.Guard,
// locking.With) wait too: parked tasks came first. d must be within [0,
// MaxDispatchDeadline]; it may be given before or after WithParking.
func WithRunNext(d time.Duration) WorkerOption {
	return func(w *Worker) error {
		if d < 0 || d > MaxDispatchDeadline {
			return fmt.Errorf("%w: run-next budget %v is not in [0, %v]", ErrInvalidConfig, d, MaxDispatchDeadline)
		}
		w.runNext = &d
		return nil
	}
}

// startByLimit is how long after a wake with dispatch deadline dispatch
// came its job must start to end, at the job deadline jobDeadline, before
// the dispatch deadline (a step to the next waiter that began within the
// run-next budget may end later); 0: no bound (no job deadline).
func startByLimit(dispatch, jobDeadline time.Duration) time.Duration {
	if jobDeadline <= 0 {
		return 0
	}
	return max(dispatch-jobDeadline-time.Second, 0)
}

// runNextBudget is the run-next budget of a worker in park mode whose
// wakes have dispatch deadline dispatch: d (DefaultRunNext when nil), cut
// by the deadlines (see WithRunNext).
func runNextBudget(d *time.Duration, dispatch, jobDeadline time.Duration) time.Duration {
	budget := DefaultRunNext
	if d != nil {
		budget = *d
	}
	limit := dispatch / 10
	if jobDeadline > 0 {
		limit = startByLimit(dispatch, jobDeadline)
	}
	return max(min(budget, limit), 0)
}

// Coalesce makes a job coalescing in park mode: while a run of it on a lock
// id is waiting, further deliveries of it on that lock id are absorbed
// (answered 204 and logged) instead of parked, because the waiting run will
// see the latest state. The waiting run gets the payload of the delivery
// that parked it; the absorbed deliveries' payloads are dropped, so
// coalesce only jobs whose runs read the state they act on rather than
// their payload. A delivery that comes while the run runs parks a new one,
// so every delivery is followed by a run that starts after it. A failed
// coalesced run is retried by Cloud Tasks like any other. In 429 mode the
// option does nothing.
func Coalesce() JobOption {
	return func(j *job) { j.coalesce = true }
}

// HandOff registers on locker (locking.Client.OnRelease) the hand-off of
// park mode: after every release of a lock by locker, when tasks wait in
// list for that lock id and no hand-off is pending, it creates a wake task
// through c that runs the oldest waiter within one dispatch. A Worker built
// with WithParking registers it on its own lock client; call HandOff in a
// program that shares lock ids with parked tasks but runs no such Worker
// (for example an HTTP function guarded by lockhttp on the same ids), with
// that program's lock client and the same queue and wait list. Without it
// a task parked behind such a program's lock waits for its safety wake,
// about a lease after the lock was taken.
//
// A hand-off costs one wait-list read per release (see the WaitList
// implementation) and, when it arms a wake, one more write and one
// CreateTask. Failures are logged at ERROR; the safety wake then runs the
// waiter.
func HandOff(locker *locking.Client, c *Client, list WaitList, log *slog.Logger) error {
	if locker == nil || c == nil || list == nil {
		return fmt.Errorf("%w: HandOff needs a lock client, a Client and a WaitList", ErrInvalidConfig)
	}
	if log == nil {
		log = slog.Default()
	}
	h := &handoff{client: c, list: list}
	h.register(locker, log, nil)
	return nil
}

// handoff creates the wakes of park mode.
type handoff struct {
	client *Client
	list   WaitList

	once sync.Once
}

// register installs h on locker once.
func (h *handoff) register(locker *locking.Client, log *slog.Logger, m *parkMetrics) {
	h.once.Do(func() {
		locker.OnRelease(func(ctx context.Context, _ locking.LockKind, id string) {
			ctx, cancel := context.WithTimeout(ctx, handoffTimeout)
			defer cancel()
			h.handOff(ctx, log, m, id)
		})
	})
}

// handOff arms and creates a Handoff wake for lockID, when tasks wait and
// none is pending.
func (h *handoff) handOff(ctx context.Context, log *slog.Logger, m *parkMetrics, lockID string) {
	wake, err := h.list.Arm(ctx, lockID, Handoff, time.Now())
	if err == nil {
		err = h.create(ctx, lockID, wake)
	}
	if err != nil {
		log.ErrorContext(ctx, "tasks: handing the lock off failed; the lock id's safety wake will run its oldest waiter",
			"lock_id", lockID, "error", err)
		return
	}
	if !wake.IsZero() && m != nil {
		m.countHandoff(ctx)
	}
}

// wakeName is the task name of a wake: unique for every wake a lock id ever
// has (Epoch is new whenever a list header is made), so that creating it
// twice creates one task, and never meets the name of a deleted task.
func wakeName(lockID string, w Wake) string {
	return fmt.Sprintf("taskguard-wake\x00%s\x00%d\x00%d", lockID, w.Epoch, w.Gen)
}

// create creates the task of wake w (nothing when w is zero). When it
// fails, w is disarmed, so that the next arming makes a new one.
func (h *handoff) create(ctx context.Context, lockID string, w Wake) error {
	if w.IsZero() {
		return nil
	}
	env := envelope{V: wakeVersion, Job: ident.String(w.Job), LockID: ident.String(lockID), EnqueuedAt: time.Now().UTC(),
		Wake: &wakeRef{Kind: w.Kind.String(), Epoch: w.Epoch, Gen: w.Gen, At: time.Now().UTC(), DeadlineMS: h.client.deadline.Milliseconds()}}
	body, err := json.Marshal(env)
	if err == nil {
		req, rerr := h.client.request(Task{Job: w.Job, LockID: lockID, ScheduleTime: w.Due, Name: wakeName(lockID, w)})
		if err = rerr; err == nil {
			req.Task.GetHttpRequest().Body = body
			_, err = h.client.tasks.CreateTask(ctx, req)
			if alreadyExists(err) {
				err = nil
			}
		}
	}
	if err != nil {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), handoffTimeout)
		defer cancel()
		if derr := h.list.Disarm(dctx, lockID, w); derr != nil {
			err = errors.Join(err, fmt.Errorf("disarming: %w", derr))
		}
		return fmt.Errorf("tasks: creating the %v wake of %q: %w", w.Kind, lockID, err)
	}
	return nil
}

// outcome is what one delivery in park mode did.
type outcome struct {
	ran      bool  // a job ran
	jobErr   error // its result
	parked   bool  // the delivery's record waits (it was parked now or before)
	created  bool  // this delivery created its waiter record
	merged   bool  // a coalescing delivery absorbed by its job's waiting run
	finished bool  // the delivery's task ran already
	running  bool  // the delivery's task runs or ran by another runner
	retry    bool  // the delivery's own failed run is to be retried, and the lock is busy
	passed   bool  // a wake found the lock held: the turn passed to the holder
	// parkLater: older waiters wait; the delivery parks after the release
	parkLater bool
	wakeErr   error // a wake (safety net) could not be made: answer 503
	// unknownJob is a claimed waiter whose job this instance does not have,
	// parked within UnknownJobGrace: answer 503, its wake's retry runs it.
	unknownJob Waiter
	listErr    error // the wait list failed
	busy       *locking.NotAcquiredError

	beforeJob func() error // a Safety wake's arming of the next one, before its job runs
	after     func()       // waits for work that went with the release
}

// joinAfter waits for the work that went on beside the release.
func (o *outcome) joinAfter() {
	if o.after != nil {
		o.after()
	}
}

// serveParked runs a delivery in park mode and answers.
func (w *Worker) serveParked(rw http.ResponseWriter, r *http.Request, log *slog.Logger, j *job, d *Delivery, env envelope) {
	ctx := r.Context()
	var (
		o   outcome
		err error
	)
	if env.Wake != nil {
		log = log.With("wake", env.Wake.Kind, "wake_gen", env.Wake.Gen)
		o, err = w.serveWake(ctx, log, j, d, env)
	} else {
		o, err = w.serveFresh(ctx, log, j, d, env)
	}
	w.answerParked(rw, r, log, d, o, err)
}

// answerParked writes the answer for outcome o of a delivery in park mode;
// err is the lock's (With's) error.
func (w *Worker) answerParked(rw http.ResponseWriter, r *http.Request, log *slog.Logger, d *Delivery, o outcome, err error) {
	ctx := r.Context()
	p := w.park
	if o.created {
		// A record parked by this delivery (which may have run it itself,
		// finding the lock free once more with its record the oldest).
		p.metrics.countParked(ctx)
	}
	var inner *locking.NotAcquiredError
	switch {
	case o.listErr != nil:
		log.ErrorContext(ctx, "tasks: parking: the wait list failed; retrying", "error", o.listErr)
		http.Error(rw, "parking failed", StatusRetry)
	case o.wakeErr != nil:
		log.ErrorContext(ctx, "tasks: parking: creating the wake failed; retrying", "error", o.wakeErr)
		http.Error(rw, "parking failed", StatusRetry)
	case o.unknownJob.Key != "":
		log.WarnContext(ctx, "tasks: the parked task's job is not registered on this instance (a deploy adding it in progress?); retrying the wake, which keeps it claimed",
			"waiter", o.unknownJob.Key, "waiter_job", o.unknownJob.Job, "arrived", o.unknownJob.Arrived, "set_aside_after", o.unknownJob.Arrived.Add(UnknownJobGrace))
		http.Error(rw, "job not registered here", StatusRetry)
	case !o.ran && o.retry:
		// This delivery's own run failed and is retried: as in 429 mode.
		rw.Header().Set("Retry-After", strconv.Itoa(w.retryAfter(o.busy.Remaining)))
		http.Error(rw, "lock held", StatusBusy)
	case !o.ran && o.merged:
		p.metrics.countCoalesced(ctx)
		log.InfoContext(ctx, "tasks: coalesced into the job's waiting run", "coalesced", true)
		rw.WriteHeader(StatusDone)
	case !o.ran && o.parked:
		log.DebugContext(ctx, "tasks: parked")
		rw.WriteHeader(StatusParked)
	case !o.ran && o.passed:
		log.DebugContext(ctx, "tasks: lock held; its holder's release hands off")
		rw.WriteHeader(StatusDone)
	case !o.ran && o.finished:
		log.InfoContext(ctx, "tasks: not run: the task ran already (a duplicate delivery)")
		rw.WriteHeader(StatusDone)
	case !o.ran && (o.running || errors.Is(err, errNotRun) || err == nil):
		log.DebugContext(ctx, "tasks: nothing to run: the waiter ran or runs elsewhere")
		rw.WriteHeader(StatusDone)
	case !o.ran:
		if a, ok := w.policy().Answer(err); ok && a.Status == http.StatusInternalServerError {
			// A lock error that retrying cannot mend (a misconfigured lock
			// client): answered as in 429 mode.
			log.ErrorContext(ctx, "tasks: could not take the lock", "error", err)
			w.answer(rw, w.policy(), err)
			return
		}
		log.ErrorContext(ctx, "tasks: could not take the lock; retrying", "error", err)
		http.Error(rw, "lock unavailable", StatusRetry)
	case errors.Is(err, locking.ErrLockLost):
		log.ErrorContext(ctx, "tasks: lock lost while the job ran; retrying", "error", err)
		http.Error(rw, "lock lost", StatusRetry)
	case errors.As(o.jobErr, &inner):
		rw.Header().Set("Retry-After", strconv.Itoa(w.retryAfter(inner.Remaining)))
		http.Error(rw, "lock held", StatusBusy)
	case o.jobErr == nil:
		if err != nil {
			log.WarnContext(ctx, "tasks: job done, but releasing its lock failed", "error", err)
		}
		rw.WriteHeader(StatusDone)
	case errors.Is(o.jobErr, ErrPermanent):
		w.drop(rw, r, log, o.jobErr)
	default:
		log.ErrorContext(ctx, "tasks: job failed; Cloud Tasks will retry", "error", o.jobErr)
		http.Error(rw, "job failed", StatusFailed)
	}
}

// errNotRun ends a holding without running a job.
var errNotRun = errors.New("tasks: not run")

// isBusy reports a lock that was not acquired because it is held.
func isBusy(err error) (*locking.NotAcquiredError, bool) {
	var busy *locking.NotAcquiredError
	if errors.As(err, &busy) && !errors.Is(err, errNotRun) {
		return busy, true
	}
	return nil, false
}

// safetyDue is when a lock id's safety wake is due behind a holding with
// remaining lease left.
func (p *parking) safetyDue(remaining time.Duration) time.Time {
	return time.Now().Add(max(remaining, time.Second) + p.margin)
}

// inLineSince is when a delivery's task joined its lock id's line, which
// orders the wait list: for a first attempt, when it was due (its ETA: when
// it was created or scheduled for), so that tasks wait in the order they
// were enqueued, also behind tasks parked at enqueue (ParkAtEnqueue); for a
// retry, or without an ETA, now.
func (d *Delivery) inLineSince(now time.Time) time.Time {
	if d.RetryCount == 0 && !d.ETA.IsZero() && d.ETA.Before(now) {
		return d.ETA
	}
	return now
}

// serveFresh handles a delivery of an enqueued task (not a wake).
func (w *Worker) serveFresh(ctx context.Context, log *slog.Logger, j *job, d *Delivery, env envelope) (outcome, error) {
	p := w.park
	self := d.recordKey()
	me := Waiter{Key: self, Arrived: d.inLineSince(time.Now()), Job: d.Job, Coalesce: j.coalesce}
	if j.coalesce {
		// One waiter per job and lock id (the wait list is per lock id).
		me.Key = coalesceKey(d.QueueName, d.Job)
	}
	base := env
	base.V, base.Wake = envelopeVersion, nil
	body, err := json.Marshal(base)
	if err != nil {
		return outcome{listErr: fmt.Errorf("re-encoding the envelope: %w", err)}, nil
	}
	me.Body = body

	createdRecord := false
	for try := 0; ; try++ {
		var o outcome
		err := w.locker.With(ctx, d.LockID, func(lctx context.Context) error {
			return w.holdFresh(lctx, log, j, d, me, self, &o)
		}, w.lockOptions(j)...)
		o.created = o.created || createdRecord
		remaining := p.lease
		var busy *locking.NotAcquiredError
		if o.parkLater {
			// Older waiters go first: park behind them, after the release.
			if try > 0 {
				return outcome{parked: true, created: createdRecord}, nil
			}
		} else {
			b, isBusy := isBusy(err)
			if !isBusy || o.ran {
				return o, err
			}
			if try > 0 {
				// Parked, and the lock is still held: its release hands off.
				return outcome{parked: true, created: createdRecord}, nil
			}
			// The lock is busy: park behind it.
			busy, remaining = b, b.Remaining
		}
		st, created, wake, perr := p.list.Park(ctx, d.LockID, me, p.safetyDue(remaining))
		if perr != nil {
			return outcome{listErr: perr}, nil
		}
		if err := p.h.create(ctx, d.LockID, wake); err != nil {
			return outcome{wakeErr: err}, nil
		}
		switch {
		case st == Waiting && me.Coalesce && !created:
			return outcome{merged: true}, nil
		case st == Waiting:
			// A release that came before this record existed saw no
			// waiter: when this record is the oldest, try the lock once
			// more. Behind an older waiter it is not needed: that waiter's
			// run releases after this record exists, and hands off.
			createdRecord = created
			head, any, _, _, err := p.list.Peek(ctx, d.LockID, "")
			if err != nil {
				return outcome{listErr: err, created: createdRecord}, nil
			}
			if any && head.Key != me.Key {
				return outcome{parked: true, created: createdRecord}, nil
			}
			continue
		case st == Finished:
			return outcome{finished: true}, nil
		case st == Running:
			_, _, _, runner, err := p.list.Peek(ctx, d.LockID, me.Key)
			if err != nil {
				return outcome{listErr: err}, nil
			}
			if runner == self && busy != nil {
				return outcome{retry: true, busy: busy}, nil
			}
			if runner == self {
				return outcome{listErr: fmt.Errorf("the run of %q by this task began meanwhile", me.Key)}, nil
			}
			return outcome{running: true}, nil
		default:
			return outcome{listErr: fmt.Errorf("park of %q answered %v", me.Key, st)}, nil
		}
	}
}

// holdFresh decides, holding the lock, what a fresh delivery does: run now
// (nobody waits, or it is the oldest waiter), park behind older waiters,
// or nothing (it ran already, or runs elsewhere).
func (w *Worker) holdFresh(ctx context.Context, log *slog.Logger, j *job, d *Delivery, me Waiter, self string, o *outcome) error {
	p := w.park
	head, any, st, runner, err := p.list.Peek(ctx, d.LockID, me.Key)
	if err != nil {
		o.listErr = err
		return errNotRun
	}
	claimed := false
	switch {
	case st == Finished:
		o.finished = true
		return errNotRun
	case st == Running && runner == self:
		// A retry of this delivery's own run.
		claimed = true
	case st == Running:
		o.running = true
		return errNotRun
	case st == Waiting && any && head.Key == me.Key:
		_, ok, err := p.list.Claim(ctx, d.LockID, me.Key, self)
		if err != nil {
			o.listErr = err
			return errNotRun
		}
		if !ok {
			o.running = true
			return errNotRun
		}
		claimed = true
	case st == Waiting && me.Coalesce:
		o.merged = true
		return errNotRun
	case st == Absent && (!any || before(me, head)):
		// Nobody waits, or only tasks that joined the line after this one
		// (parked at enqueue while the queue delivered this one, the first
		// of their burst): run now, with no record.
	default:
		// Older waiters go first: park behind them (again, for a duplicate;
		// Park is idempotent and makes sure a wake is pending), after the
		// release, so that the lock is held only for this Peek.
		o.parkLater = true
		return errNotRun
	}
	o.ran = true
	o.jobErr = w.callJob(ctx, log, j, d)
	if o.jobErr != nil && !errors.Is(o.jobErr, ErrPermanent) {
		return o.jobErr
	}
	switch {
	case claimed:
		finishRun(ctx, log, p.list, d.LockID, me.Key, self)
	case !me.Coalesce:
		// A retry or duplicate of this delivery may have parked while it
		// ran (a run longer than the dispatch deadline is retried while it
		// runs): it must not run again.
		finishRun(ctx, log, p.list, d.LockID, me.Key, "")
	}
	return o.jobErr
}

// serveWake handles a wake: it takes the lock and runs the lock id's oldest
// waiter, what the wait list recorded for it, or, when the lock is busy,
// leaves the turn to the holder's release (and a safety wake).
func (w *Worker) serveWake(ctx context.Context, log *slog.Logger, j *job, d *Delivery, env envelope) (outcome, error) {
	p := w.park
	self := d.recordKey()
	kind, gen := env.Wake.kind(), env.Wake.Gen
	dispatch := p.h.client.deadline
	if dl := time.Duration(env.Wake.DeadlineMS) * time.Millisecond; dl > 0 && dl < dispatch {
		// Created through another Client (HandOff's) with a shorter
		// dispatch deadline: its budget is cut by that deadline.
		dispatch = dl
	}
	d.runNext, d.startBy = runNextBudget(w.runNext, dispatch, w.jobDeadline), startByLimit(dispatch, w.jobDeadline)
	o, err := w.wakeTurn(ctx, log, j, d, self, kind, gen, env.Wake.At)
	if kind == Safety {
		p.metrics.countSafetyNet(ctx, o.ran)
	}
	return o, err
}

// wakeTurn is serveWake's work.
func (w *Worker) wakeTurn(ctx context.Context, log *slog.Logger, j *job, d *Delivery, self string, kind WakeKind, gen uint64, at time.Time) (outcome, error) {
	p := w.park
	var turn *wakeTake
	for try := 0; ; try++ {
		var o outcome
		if try == 0 {
			turn = &wakeTake{kind: kind, gen: gen}
			if kind == Safety {
				// While waiters wait, a Safety wake stays pending (this
				// holding's release may fail or never come): taking the
				// Safety arms the next one, before a job runs.
				o.beforeJob = sync.OnceValue(func() error {
					wake, err := p.list.Arm(ctx, d.LockID, Safety, p.safetyDue(p.lease))
					if err == nil {
						err = p.h.create(ctx, d.LockID, wake)
					}
					return err
				})
			}
		}
		err := w.locker.With(ctx, d.LockID, func(lctx context.Context) error {
			// The wake is taken with the first claim (or, when nobody
			// waits, alone) before a job runs: the release must see it
			// taken to hand off again. A retry of a wake whose run failed,
			// or whose process died, gets that run back from the claim and
			// runs it again first.
			err := w.runOldest(lctx, log, d, self, at, turn, &o)
			if o.beforeJob != nil && !o.ran && turn.taken && o.listErr == nil {
				if berr := o.beforeJob(); berr != nil {
					o.listErr = berr
					return errNotRun
				}
			}
			return err
		}, w.lockOptions(j)...)
		o.joinAfter()
		busy, isBusy := isBusy(err)
		if !isBusy || o.ran {
			return o, err
		}
		if try > 0 || turn.taken {
			// Still held: the holder's release hands off.
			return outcome{passed: true}, nil
		}
		// Busy. A retry of this wake whose run failed (and is not
		// finished) is retried as in 429 mode.
		if _, ok, err := p.list.Running(ctx, d.LockID, self); err != nil {
			return outcome{listErr: err}, nil
		} else if ok {
			return outcome{retry: true, busy: busy}, nil
		}
		// The turn passes to the holder, whose release hands off (it reads
		// the wait list after this Take), and to a safety wake due when its
		// lease could end.
		ok, wake, err := p.list.Take(ctx, d.LockID, kind, gen, p.safetyDue(busy.Remaining))
		if err != nil {
			return outcome{listErr: err}, nil
		}
		turn.taken = true
		if err := p.h.create(ctx, d.LockID, wake); err != nil {
			return outcome{wakeErr: err}, nil
		}
		if !ok {
			// Not the pending wake: a newer one has the turn.
			return outcome{running: true}, nil
		}
		// Once more, in case the holder released before the Take.
	}
}

// wakeTake is the take of a wake: its kind and generation, and whether it
// was taken yet.
type wakeTake struct {
	kind  WakeKind
	gen   uint64
	taken bool
}

// claim claims key for runner self, taking the wake of turn in the same
// step until it is taken (see WaitList.TakeClaim); key may be empty only
// then.
func (p *parking) claim(ctx context.Context, lockID, key, self string, turn *wakeTake) (Waiter, bool, error) {
	if turn == nil || turn.taken {
		if key == "" {
			return Waiter{}, false, nil
		}
		return p.list.Claim(ctx, lockID, key, self)
	}
	wt, ok, err := p.list.TakeClaim(ctx, lockID, turn.kind, turn.gen, key, self)
	if err == nil {
		turn.taken = true
	}
	return wt, ok, err
}

// runOldest runs, holding the lock, the oldest waiter of the lock id, as
// the wait list recorded it (or, for a wake's retry, the waiter this wake
// claimed before), taking the wake of turn (nil: taken already) with its
// claim. Waiters whose job is not registered (a deploy removed or renamed
// it) are set aside: marked finished, with an ERROR log naming them — once
// they were parked UnknownJobGrace ago; before that (a deploy adding the
// job may be rolling out) the wake is answered 503 and keeps its claim, so
// that its retry runs the waiter.
func (w *Worker) runOldest(ctx context.Context, log *slog.Logger, d *Delivery, self string, since time.Time, turn *wakeTake, o *outcome) error {
	p := w.park
	for range maxSetAside {
		head, any, _, _, err := p.list.Peek(ctx, d.LockID, "")
		if err != nil {
			o.listErr = err
			return errNotRun
		}
		if !any && (turn == nil || turn.taken) {
			return errNotRun
		}
		key := ""
		if any {
			key = head.Key
		}
		wt, ok, err := p.claim(ctx, d.LockID, key, self, turn)
		if err != nil {
			o.listErr = err
			return errNotRun
		}
		if !ok {
			if !any {
				return errNotRun
			}
			continue // finished or claimed since the Peek
		}
		first := since
		if wt.Key != key {
			first = time.Time{} // this wake's own claim, run again
		}
		err = w.runWaiter(ctx, log, d, wt, self, first, o)
		if errors.Is(err, errNotRun) && !o.ran && o.listErr == nil && o.unknownJob.Key == "" {
			continue // set aside: the next one
		}
		return err
	}
	return errNotRun
}

// runWaiter runs waiter wt, claimed by runner self, holding the lock, and
// marks it finished when its job ends for good. While the worker's
// run-next budget lasts (WithRunNext) and the job succeeded, it goes on
// with the lock id's next waiter: one step finishes wt and claims the
// oldest waiter (FinishClaim), which runs the same way, in the same
// holding. since is when the wake that runs wt was made (zero: not a first
// hand-off).
func (w *Worker) runWaiter(ctx context.Context, log *slog.Logger, d *Delivery, wt Waiter, self string, since time.Time, o *outcome) error {
	p := w.park
	for chained := false; ; chained = true {
		err := w.runClaimed(ctx, log, d, wt, self, since, o)
		setAside := errors.Is(err, errNotRun) && o.listErr == nil && o.unknownJob.Key == ""
		if err != nil && (!chained || !setAside) {
			// The job failed, not for good (the record stays Running by
			// self: this wake's retry runs it), or the wait list failed,
			// or the first waiter was set aside (runOldest goes on).
			return err
		}
		done := wt
		if setAside {
			done = Waiter{} // finished by runClaimed
		}
		if o.jobErr != nil || !w.runNextOpen(ctx, d) {
			if done.Key == "" {
				return o.jobErr
			}
			break
		}
		ended := time.Now()
		next, ok := w.nextWaiter(ctx, log, d, done, self, o)
		if !ok {
			return o.jobErr // done finished by nextWaiter (or o.listErr set)
		}
		if d.startBy > 0 && time.Since(d.began) >= d.startBy {
			// The step ended too late for the job to end, at the job
			// deadline, before the dispatch deadline: it does not start
			// here. The record stays Running by self: this wake's retry
			// runs it.
			o.jobErr = fmt.Errorf("%w: the step to parked task %q ended %v after the wake came, too late to run it before the dispatch deadline; the wake's retry runs it",
				errNotStarted, next.Key, time.Since(d.began).Round(time.Millisecond))
			return o.jobErr
		}
		wt, since = next, ended
	}
	// The record is out of the list (Running): marking it finished can go
	// with the release and its hand-off; the answer waits for both.
	done := make(chan struct{})
	key := wt.Key
	go func() {
		defer close(done)
		finishRun(ctx, log, p.list, d.LockID, key, self)
	}()
	o.after = func() { <-done }
	return o.jobErr
}

// runClaimed runs waiter wt, claimed by runner self, holding the lock, as
// the wait list recorded it; a waiter that cannot run is set aside
// (finished, logged at ERROR) and errNotRun returned. It returns the job's
// error when the job failed but not for good (its record stays Running by
// self), nil otherwise (o.jobErr is the job's result).
func (w *Worker) runClaimed(ctx context.Context, log *slog.Logger, d *Delivery, wt Waiter, self string, since time.Time, o *outcome) error {
	p := w.park
	env, err := decodeEnvelope(wt.Body)
	if err == nil && env.Wake != nil {
		err = errors.New("a wake recorded as a waiter")
	}
	j := w.job(wt.Job)
	if err == nil && j == nil && newJobPossible(wt.Arrived) {
		// A deploy adding the job may be rolling out: the claim stays this
		// wake's, and the wake's retry (on an instance that may have the
		// job) gets it back and runs it.
		o.unknownJob = wt
		return errNotRun
	}
	if err == nil && j == nil {
		err = fmt.Errorf("unknown job %q (removed or renamed by a deploy?)", wt.Job)
	}
	log = log.With("waiter", wt.Key, "waited", time.Since(wt.Arrived))
	if err != nil {
		log.ErrorContext(ctx, "tasks: setting aside a parked task that cannot run; it will not run", "error", err, "waiter_job", wt.Job, "arrived", wt.Arrived)
		if err := p.list.Finish(ctx, d.LockID, wt.Key, self); err != nil {
			o.listErr = err
		}
		return errNotRun
	}
	rd := *d
	rd.Job, rd.EnqueuedAt, rd.Payload = string(env.Job), env.EnqueuedAt, env.Data
	if env.Payload != nil {
		rd.Payload = env.Payload
	}
	if q, name, ok := strings.Cut(wt.Key, "/"); ok && !wt.Coalesce {
		rd.QueueName, rd.TaskName = q, name
	}
	rd.Lock = locking.FromContext(ctx)
	rd.Token = rd.Lock.Token()
	d.Token = rd.Token
	p.metrics.observeHandoff(ctx, since)
	if o.beforeJob != nil {
		if err := o.beforeJob(); err != nil {
			// The next Safety wake could not be made: this wake's retry
			// (answered 503) runs the claimed waiter.
			o.listErr = err
			return errNotRun
		}
	}
	o.ran = true
	if ctx.Err() != nil {
		// The holding ended (the lock lost, the request cancelled) before
		// the job started, as can happen in a wake's step from one waiter
		// to the next: it does not start without the lock. The record
		// stays Running by self: this wake's retry runs it.
		o.jobErr = fmt.Errorf("%w: %w", errNotStarted, context.Cause(ctx))
		return o.jobErr
	}
	o.jobErr = w.callJob(ctx, log, j, &rd)
	if o.jobErr != nil && !errors.Is(o.jobErr, ErrPermanent) {
		return o.jobErr
	}
	return nil
}

// runNextOpen reports whether a wake delivered as d may start another
// waiter's job: its request goes on, and less than the run-next budget has
// passed since it came.
func (w *Worker) runNextOpen(ctx context.Context, d *Delivery) bool {
	return ctx.Err() == nil && d.runNext > 0 && time.Since(d.began) < d.runNext
}

// nextWaiter finishes done (zero: none), runner self's claim, and claims the lock id's
// oldest waiter for self, in one step bounded by the step budget
// (WithStepBudget) and by the time left to start a job (startBy). When
// none waits, done is finished alone, and ok is
// false: the release hands off.
//
// A step that failed may have been applied all the same (its reply was
// lost, or its deadline came while the store applied it): then self holds
// a claim of the next waiter, which nobody else runs. So the runner's claim
// is read back: when the step was applied, the waiter it claimed is
// returned, to run; when not, done is finished apart (a failure logged) and
// ok is false; when the claim cannot be read, o.listErr is set, so that the
// wake is answered 503 and its retry gets the claim back (TakeClaim).
func (w *Worker) nextWaiter(ctx context.Context, log *slog.Logger, d *Delivery, done Waiter, self string, o *outcome) (Waiter, bool) {
	p, lockID := w.park, d.LockID
	budget := w.stepBudget
	if d.startBy > 0 {
		budget = min(budget, d.startBy-time.Since(d.began))
	}
	sctx, cancel := context.WithTimeoutCause(ctx, budget, ErrStepBudget)
	defer cancel()
	wt, ok, err := p.list.FinishClaim(sctx, lockID, done.Key, self)
	if err == nil {
		return wt, ok
	}
	log.WarnContext(ctx, "tasks: the step to the next parked task failed; reading back the runner's claim", "error", err)
	rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), handoffTimeout)
	defer rcancel()
	wt, ok, rerr := p.list.Running(rctx, lockID, self)
	switch {
	case rerr != nil:
		o.listErr = fmt.Errorf("the step to the next parked task failed (%w), and reading back the runner's claim too: %w", err, rerr)
		return Waiter{}, false
	case ok && (wt.Key != done.Key || !wt.Arrived.Equal(done.Arrived)):
		// Applied: done is finished and wt claimed for self (a coalescing
		// waiter parked again while done ran has done's key, and arrived
		// later).
		return wt, true
	case ok:
		// Not applied: done is still self's claim.
		finishRun(ctx, log, p.list, lockID, done.Key, self)
	}
	return Waiter{}, false
}

// finishRun records key's run finished in list (Finish). It runs even when
// ctx has ended (the job finished after its request's end, when Cloud Tasks
// has retried it: the retry must find the record), bounded by
// handoffTimeout; a failure is logged.
//
// A run whose lock was lost is not recorded: it was not exclusive, its
// delivery is answered 503, and its retry must run it again.
func finishRun(ctx context.Context, log *slog.Logger, list WaitList, lockID, key, runner string) {
	if errors.Is(context.Cause(ctx), locking.ErrLockLost) {
		log.WarnContext(ctx, "tasks: the job returned after its lock was lost; its run is not recorded, so its retry runs it again", "key", key)
		return
	}
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), handoffTimeout)
	defer cancel()
	if err := list.Finish(fctx, lockID, key, runner); err != nil {
		log.WarnContext(fctx, "tasks: job done, but recording its run finished failed; a retry or duplicate of the task may run it again", "error", err, "key", key)
	}
}

// errNotStarted marks a job that did not start: the delivery's step budget
// was spent first.
var errNotStarted = errors.New("tasks: job not started")

// callJob runs the job, turning a panic into an error.
func (w *Worker) callJob(ctx context.Context, log *slog.Logger, j *job, d *Delivery) (err error) {
	if d.Lock == nil {
		d.Lock = locking.FromContext(ctx)
		if d.Lock != nil {
			d.Token = d.Lock.Token()
		}
	}
	if !jobStarted(ctx) {
		return fmt.Errorf("%w: %w", errNotStarted, context.Cause(ctx))
	}
	defer func() {
		if p := recover(); p != nil {
			log.ErrorContext(ctx, "tasks: job panicked", "token", d.Token, "panic", p, "stack", string(debug.Stack()))
			err = fmt.Errorf("%w: %v", errPanic, p)
		}
	}()
	jctx, cancel := w.jobContext(ctx)
	defer cancel()
	return j.fn(context.WithValue(jctx, deliveryKey{}, d), d)
}

func alreadyExists(err error) bool { return status.Code(err) == codes.AlreadyExists }
