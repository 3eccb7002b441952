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
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking"
)

// StatusParked is the answer, in park mode, to a delivery whose lock is busy
// and that is now recorded as a waiter with a safety net: Cloud Tasks
// deletes the task, and a continuation will run the job.
const StatusParked = http.StatusAccepted

// DefaultSafetyMargin is added to a holder's remaining lease to schedule a
// parked delivery's safety net: time for the lock's expiry to be judged and
// the continuation to be dispatched. A safety net that comes too early
// finds the lock held and schedules the next one.
const DefaultSafetyMargin = time.Second

// handoffTimeout bounds the hand-off after a job, which runs on a context
// detached from the request so that it happens even when the request ends.
const handoffTimeout = 30 * time.Second

// parking is a Worker's park mode.
type parking struct {
	client  *Client
	list    WaitList
	margin  time.Duration
	lease   time.Duration // the longest lease of the jobs' locks
	metrics *parkMetrics
}

// WithParking turns on park and hand-off (see the package documentation):
// a delivery whose lock is busy is parked in list and answered StatusParked
// instead of 429, and a holder hands the lock to the oldest waiter through
// a continuation task that c creates (c must enqueue to the queue and URL
// this worker serves; the worker's service account then needs to create
// tasks on the queue and act as c's ServiceAccount). Without it the worker
// runs in 429 mode.
func WithParking(c *Client, list WaitList) WorkerOption {
	return func(w *Worker) error {
		if c == nil || list == nil {
			return fmt.Errorf("%w: WithParking needs a Client and a WaitList", ErrInvalidConfig)
		}
		m, err := newParkMetrics(nil)
		if err != nil {
			return err
		}
		w.park = &parking{client: c, list: list, margin: DefaultSafetyMargin, lease: locking.DefaultLease, metrics: m}
		return nil
	}
}

// WithParkingLease tells a worker in park mode the longest lease its jobs'
// locks use (locking.DefaultLease when not given): the safety net of a
// delivery parked behind a waiter that is about to run is due that long
// (plus DefaultSafetyMargin) later, when a holder that died would have lost
// the lock. A delivery parked behind a busy lock uses the holder's remaining
// lease instead. Give it after WithParking.
func WithParkingLease(d time.Duration) WorkerOption {
	return func(w *Worker) error {
		if d <= 0 {
			return fmt.Errorf("%w: parking lease %v", ErrInvalidConfig, d)
		}
		if w.park == nil {
			return fmt.Errorf("%w: WithParkingLease without WithParking", ErrInvalidConfig)
		}
		w.park.lease = d
		return nil
	}
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

// errNotRun ends a holding without running the job: not this delivery's
// turn, or nothing (left) to run.
var errNotRun = errors.New("tasks: not run")

// parkedRun is what one holding of the lock did, in park mode.
type parkedRun struct {
	ran     bool  // the job ran
	jobErr  error // its result
	claimed bool  // the delivery's waiter record was claimed for the run
	parked  bool  // the holding parked the delivery (a new Waiting record)
	yielded bool  // an older waiter goes first; the delivery stays parked
	merged  bool  // a coalescing delivery absorbed by its job's waiting run
}

// serveParked runs a delivery in park mode and answers.
func (w *Worker) serveParked(rw http.ResponseWriter, r *http.Request, log *slog.Logger, j *job, d *Delivery, env envelope) {
	ctx := r.Context()
	p := w.park
	self := d.QueueName + "/" + d.TaskName
	me := Waiter{Key: self, Arrived: time.Now()}
	if j.coalesce {
		// One waiter per job and lock id (the wait list is per lock id).
		me.Key, me.Coalesce = "coalesce/"+d.QueueName+"/"+d.Job, true
	}
	if env.Cont != nil {
		me.Key, me.Arrived, me.Coalesce = env.Cont.Key, env.Cont.Arrived, env.Cont.Coalesce
		log = log.With("waiter", me.Key, "continuation", env.Cont.Kind)
	}
	base := env
	base.V, base.Cont = envelopeVersion, nil
	body, err := json.Marshal(base)
	if err != nil {
		w.drop(rw, r, log, fmt.Errorf("%w: re-encoding the envelope: %w", errMalformed, err))
		return
	}
	me.Body = body
	ranJob := false // the job ran in this delivery
	if env.Cont != nil && env.Cont.Kind == contSafety {
		defer func() { p.metrics.countSafetyNet(ctx, ranJob) }()
	}

	for try := 0; ; try++ {
		run, err := w.holdParked(ctx, log, j, d, me, self, env.Cont)
		ranJob = ranJob || run.ran
		var busy *locking.NotAcquiredError
		switch {
		case !run.ran && errors.As(err, &busy) && !errors.Is(err, errNotRun):
			if try > 0 {
				// Parked, and the lock is still held: its holder hands off.
				rw.WriteHeader(StatusParked)
				return
			}
			again := w.parkBusy(ctx, rw, log, d, me, self, env.Cont, busy)
			if !again {
				return
			}
			// Parked: try once more, in case the holder released before the
			// record existed and saw no waiter.
			continue
		case errors.Is(err, errNotRun) && !run.ran:
			if run.parked {
				if err := p.continuation(ctx, d.LockID, me, contSafety, 1, time.Now().Add(p.margin+p.lease)); err != nil {
					log.ErrorContext(ctx, "tasks: parking: creating the safety net failed; retrying", "error", err)
					http.Error(rw, "parking failed", StatusRetry)
					w.handoff(ctx, log, d.LockID, d.Token)
					return
				}
			}
			if run.yielded && env.Cont != nil && env.Cont.Kind == contSafety {
				// Keep this waiter's safety net alive past this holding.
				if err := p.continuation(ctx, d.LockID, me, contSafety, env.Cont.N+1, time.Now().Add(p.margin+p.lease)); err != nil {
					log.ErrorContext(ctx, "tasks: parking: renewing the safety net failed; retrying", "error", err)
					http.Error(rw, "parking failed", StatusRetry)
					w.handoff(ctx, log, d.LockID, d.Token)
					return
				}
			}
			w.handoff(ctx, log, d.LockID, d.Token)
			if run.merged && try == 0 {
				p.metrics.countCoalesced(ctx)
				log.InfoContext(ctx, "tasks: coalesced into the job's waiting run", "coalesced", true)
				rw.WriteHeader(StatusDone)
				return
			}
			if run.yielded || run.parked || run.merged {
				log.DebugContext(ctx, "tasks: parked behind an older waiter")
				rw.WriteHeader(StatusParked)
			} else {
				log.InfoContext(ctx, "tasks: nothing to run: the waiter ran or runs elsewhere")
				rw.WriteHeader(StatusDone)
			}
			return
		case !run.ran:
			if a, ok := w.policy().Answer(err); ok && a.Status == http.StatusInternalServerError {
				// A lock error that retrying cannot mend (a misconfigured
				// lock client): answered as in 429 mode.
				log.ErrorContext(ctx, "tasks: could not take the lock", "error", err)
				w.answer(rw, w.policy(), err)
				return
			}
			log.ErrorContext(ctx, "tasks: could not take the lock or read the wait list; retrying", "error", err)
			http.Error(rw, "lock unavailable", StatusRetry)
			return
		}
		// The job ran.
		log = log.With("token", d.Token)
		lost := errors.Is(err, locking.ErrLockLost)
		if !lost {
			w.handoff(ctx, log, d.LockID, d.Token)
		}
		var inner *locking.NotAcquiredError
		switch {
		case lost:
			log.ErrorContext(ctx, "tasks: lock lost while the job ran; retrying", "error", err)
			http.Error(rw, "lock lost", StatusRetry)
		case errors.As(run.jobErr, &inner):
			rw.Header().Set("Retry-After", strconv.Itoa(w.retryAfter(inner.Remaining)))
			http.Error(rw, "lock held", StatusBusy)
		case run.jobErr == nil:
			if err != nil {
				log.WarnContext(ctx, "tasks: job done, but releasing its lock failed", "error", err)
			}
			rw.WriteHeader(StatusDone)
		case errors.Is(run.jobErr, ErrPermanent):
			w.drop(rw, r, log, run.jobErr)
		default:
			log.ErrorContext(ctx, "tasks: job failed; Cloud Tasks will retry", "error", run.jobErr)
			http.Error(rw, "job failed", StatusFailed)
		}
		return
	}
}

// holdParked takes the lock without waiting and, holding it, decides from
// the wait list whether this delivery runs now, and runs it.
func (w *Worker) holdParked(ctx context.Context, log *slog.Logger, j *job, d *Delivery, me Waiter, self string, cont *continuation) (parkedRun, error) {
	p := w.park
	var run parkedRun
	opts := w.lockOptions(j)
	err := w.locker.With(ctx, d.LockID, func(lctx context.Context) error {
		d.Lock = locking.FromContext(lctx)
		d.Token = d.Lock.Token()
		// Even a hand-off checks: a waiter that arrived earlier may have parked
		// since the hand-off was made.
		oldest, any, err := p.list.Oldest(lctx, d.LockID)
		if err != nil {
			return fmt.Errorf("tasks: wait list: %w", err)
		}
		switch {
		case any && oldest.Key == me.Key:
			ok, err := p.list.Claim(lctx, d.LockID, me.Key, self)
			if err != nil {
				return fmt.Errorf("tasks: wait list: %w", err)
			}
			if !ok {
				return errNotRun
			}
			run.claimed = true
		case !any && cont == nil && d.RetryCount == 0:
			// Nobody waits, and a first delivery has no record: run it.
		default:
			st, runner, err := p.list.State(lctx, d.LockID, me.Key)
			if err != nil {
				return fmt.Errorf("tasks: wait list: %w", err)
			}
			switch {
			case st == Running && runner == self:
				run.claimed = true // a retry of this delivery's own run
			case st == Waiting && me.Coalesce && cont == nil:
				run.merged = true
				return errNotRun
			case st == Waiting:
				run.yielded = true
				return errNotRun
			case st == Absent && me.Coalesce && cont != nil && d.RetryCount > 0:
				// A retry of a failed coalesced run (its record went with
				// the claim).
			case st == Absent && !any && cont == nil:
				// A retried first delivery that never parked.
			case st == Absent && cont == nil:
				// Someone older waits: queue up behind them.
				st, err := p.list.Park(lctx, d.LockID, me)
				if err != nil {
					return fmt.Errorf("tasks: wait list: %w", err)
				}
				run.parked = st == Waiting
				if run.parked {
					p.metrics.countParked(ctx)
				}
				return errNotRun
			default:
				return errNotRun
			}
		}
		run.ran = true
		if cont != nil && cont.Kind == contHandoff {
			p.metrics.observeHandoff(ctx, cont.At)
		}
		run.jobErr = w.callJob(lctx, log, j, d)
		if run.claimed && !me.Coalesce && (run.jobErr == nil || errors.Is(run.jobErr, ErrPermanent)) {
			if err := p.list.Finish(lctx, d.LockID, me.Key); err != nil {
				log.WarnContext(ctx, "tasks: job done, but marking its waiter finished failed", "error", err)
			}
		}
		return run.jobErr
	}, opts...)
	return run, err
}

// parkBusy handles a delivery whose lock is busy: it parks a first delivery
// (record and safety net) or leaves a continuation's waiter parked, and
// answers unless it reports that the caller should try the lock again.
func (w *Worker) parkBusy(ctx context.Context, rw http.ResponseWriter, log *slog.Logger, d *Delivery, me Waiter, self string, cont *continuation, busy *locking.NotAcquiredError) (again bool) {
	p := w.park
	due := time.Now().Add(max(busy.Remaining, time.Second) + p.margin)
	var (
		st     WaiterState
		runner string
		err    error
	)
	switch {
	case cont != nil:
		st, runner, err = p.list.State(ctx, d.LockID, me.Key)
	case me.Coalesce:
		st, _, err = p.list.State(ctx, d.LockID, me.Key)
		if err == nil && st == Waiting {
			p.metrics.countCoalesced(ctx)
			log.InfoContext(ctx, "tasks: coalesced into the job's waiting run", "coalesced", true)
			rw.WriteHeader(StatusDone)
			return false
		}
		if err == nil {
			st, err = p.list.Park(ctx, d.LockID, me)
		}
	default:
		st, err = p.list.Park(ctx, d.LockID, me)
		if err == nil && st == Running {
			_, runner, err = p.list.State(ctx, d.LockID, me.Key)
		}
	}
	if err != nil {
		log.ErrorContext(ctx, "tasks: parking: wait list failed; retrying", "error", err)
		http.Error(rw, "parking failed", StatusRetry)
		return false
	}
	switch {
	case st == Running && runner == self:
		// This delivery's own run failed and is retried: as in 429 mode.
		rw.Header().Set("Retry-After", strconv.Itoa(w.retryAfter(busy.Remaining)))
		http.Error(rw, "lock held", StatusBusy)
		return false
	case st != Waiting:
		log.InfoContext(ctx, "tasks: nothing to run: the waiter ran or runs elsewhere", "state", st)
		rw.WriteHeader(StatusDone)
		return false
	case cont == nil:
		if err := p.continuation(ctx, d.LockID, me, contSafety, 1, due); err != nil {
			log.ErrorContext(ctx, "tasks: parking: creating the safety net failed; retrying", "error", err)
			http.Error(rw, "parking failed", StatusRetry)
			return false
		}
		p.metrics.countParked(ctx)
		log.DebugContext(ctx, "tasks: lock held; parked", "remaining", busy.Remaining)
		return true
	case cont.Kind == contSafety:
		if err := p.continuation(ctx, d.LockID, me, contSafety, cont.N+1, due); err != nil {
			log.ErrorContext(ctx, "tasks: parking: renewing the safety net failed; retrying", "error", err)
			http.Error(rw, "parking failed", StatusRetry)
			return false
		}
	}
	rw.WriteHeader(StatusParked)
	return false
}

// handoff creates a continuation for the oldest waiter of lockID, named by
// the fencing token of the holding that just ended. Failures are logged:
// the waiter's safety net runs it later.
func (w *Worker) handoff(ctx context.Context, log *slog.Logger, lockID string, token uint64) {
	p := w.park
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), handoffTimeout)
	defer cancel()
	oldest, ok, err := p.list.Oldest(ctx, lockID)
	if err == nil && ok {
		err = p.continuation(ctx, lockID, oldest, contHandoff, token, time.Time{})
	}
	if err != nil {
		log.ErrorContext(ctx, "tasks: handing the lock off failed; the waiter's safety net will run it", "error", err)
		return
	}
	if ok {
		p.metrics.countHandoff(ctx)
		log.DebugContext(ctx, "tasks: handed the lock off", "to", oldest.Key, "waited", time.Since(oldest.Arrived))
	}
}

// continuation creates the continuation task of kind for waiter wt, due at
// when (now when zero). Its id is derived from the lock id, the waiter, the
// kind and n, so that a repeated call creates nothing new.
func (p *parking) continuation(ctx context.Context, lockID string, wt Waiter, kind string, n uint64, when time.Time) error {
	env, err := decodeEnvelope(wt.Body)
	if err != nil {
		return fmt.Errorf("tasks: waiter %q: %w", wt.Key, err)
	}
	env.V = contVersion
	env.Cont = &continuation{Key: wt.Key, Kind: kind, N: n, Arrived: wt.Arrived, Coalesce: wt.Coalesce, At: time.Now().UTC()}
	body, err := json.Marshal(env)
	if err != nil {
		return fmt.Errorf("tasks: continuation of %q: %w", wt.Key, err)
	}
	name := fmt.Sprintf("taskguard-continuation\x00%s\x00%s\x00%s\x00%d", lockID, wt.Key, kind, n)
	req, err := p.client.request(Task{Job: string(env.Job), LockID: lockID, ScheduleTime: when, Name: name})
	if err != nil {
		return err
	}
	req.Task.GetHttpRequest().Body = body
	_, err = p.client.tasks.CreateTask(ctx, req)
	if err != nil && !alreadyExists(err) {
		return fmt.Errorf("tasks: create continuation of %q: %w", wt.Key, err)
	}
	return nil
}

// callJob runs the job, turning a panic into an error.
func (w *Worker) callJob(ctx context.Context, log *slog.Logger, j *job, d *Delivery) (err error) {
	defer func() {
		if p := recover(); p != nil {
			log.ErrorContext(ctx, "tasks: job panicked", "token", d.Token, "panic", p, "stack", string(debug.Stack()))
			err = fmt.Errorf("%w: %v", errPanic, p)
		}
	}()
	return j.fn(context.WithValue(ctx, deliveryKey{}, d), d)
}

func alreadyExists(err error) bool { return status.Code(err) == codes.AlreadyExists }
