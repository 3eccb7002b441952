package taskstest

import (
	"math"
	"regexp"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Defaults the service picks for settings a queue leaves unset.
const (
	defaultMaxAttempts      = 100
	defaultMinBackoff       = 100 * time.Millisecond
	defaultMaxBackoff       = time.Hour
	defaultMaxDoublings     = 16
	defaultDispatchesPerSec = 500
	defaultMaxConcurrent    = 1000
	maxDispatchesPerSec     = 500
	maxConcurrentLimit      = 5000
	// maxDefaultBurst caps the max_burst_size the emulator picks: a default
	// queue (500 dispatches/s) reports 100, as the service's sample does.
	maxDefaultBurst = 100
)

// The model of system throttling; see the package documentation.
const (
	// throttleFloor is the lowest rate, in dispatches per second, that
	// throttling brings a queue to (or the queue's own rate, if lower).
	throttleFloor = 1.0
	// throttleRecovery is how long a queue must go without a 429 or 503
	// answer for its rate to double again.
	throttleRecovery = time.Second
)

var (
	locationRE = regexp.MustCompile(`^projects/[A-Za-z0-9\-:.]+/locations/[A-Za-z0-9\-]+$`)
	queueRE    = regexp.MustCompile(`^(projects/[A-Za-z0-9\-:.]+/locations/[A-Za-z0-9\-]+)/queues/([A-Za-z0-9\-]{1,100})$`)
	taskRE     = regexp.MustCompile(`^(projects/[A-Za-z0-9\-:.]+/locations/[A-Za-z0-9\-]+/queues/[A-Za-z0-9\-]{1,100})/tasks/([A-Za-z0-9_\-]+)$`)
)

// retryPolicy is a queue's or task's RetryConfig with defaults applied.
type retryPolicy struct {
	maxAttempts      int // -1: unlimited
	maxRetryDuration time.Duration
	minBackoff       time.Duration
	maxBackoff       time.Duration
	maxDoublings     int
}

// queue is one queue's state. Every field is guarded by Server.mu.
type queue struct {
	pb      *cloudtaskspb.Queue // with defaults filled in
	shortID string
	retry   retryPolicy
	tasks   map[string]*task     // by task id; live tasks only
	tombs   map[string]time.Time // task id -> end of its dedup window
	seq     uint64

	running int       // attempts in flight
	tokens  float64   // token bucket for max dispatches per second
	refill  time.Time // when tokens was last refilled

	throttles bool      // system throttling is modelled
	throttle  int       // throttling level at lastBusy: the rate is halved per level
	lastBusy  time.Time // when the last 429 or 503 answer came

	wake chan struct{} // buffered(1): the scheduler should look again
	quit chan struct{} // closed when the queue is deleted or the server closes
}

// task is one live task. Every field is guarded by Server.mu.
type task struct {
	pb       *cloudtaskspb.Task
	id       string
	seq      uint64
	due      time.Time // next attempt's schedule time
	running  bool
	deleted  bool
	deadline time.Duration
	retry    retryPolicy

	dispatches int // attempts started
	responses  int // attempts that got an answer
	executions int // attempts that got an answer below 500
	first      time.Time
	prevStatus int
	prevReason string
}

func (q *queue) stop() {
	select {
	case <-q.quit:
	default:
		close(q.quit)
	}
}

func (q *queue) poke() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// newQueue validates pb and fills in the service's defaults.
func newQueue(pb *cloudtaskspb.Queue) (*queue, error) {
	m := queueRE.FindStringSubmatch(pb.GetName())
	if m == nil {
		return nil, status.Errorf(codes.InvalidArgument, "invalid queue name %q", pb.GetName())
	}
	pb = proto.Clone(pb).(*cloudtaskspb.Queue)
	if err := applyQueueDefaults(pb); err != nil {
		return nil, err
	}
	q := &queue{
		pb:      pb,
		shortID: m[2],
		tasks:   map[string]*task{},
		tombs:   map[string]time.Time{},
		wake:    make(chan struct{}, 1),
		quit:    make(chan struct{}),
	}
	q.retry = policyOf(pb.RetryConfig)
	q.tokens = float64(pb.RateLimits.MaxBurstSize)
	return q, nil
}

func applyQueueDefaults(pb *cloudtaskspb.Queue) error {
	if pb.RateLimits == nil {
		pb.RateLimits = &cloudtaskspb.RateLimits{}
	}
	rl := pb.RateLimits
	if rl.MaxDispatchesPerSecond == 0 {
		rl.MaxDispatchesPerSecond = defaultDispatchesPerSec
	}
	if rl.MaxDispatchesPerSecond < 0 || rl.MaxDispatchesPerSecond > maxDispatchesPerSec {
		return status.Errorf(codes.InvalidArgument, "max_dispatches_per_second must be in (0, %d]", maxDispatchesPerSec)
	}
	if rl.MaxConcurrentDispatches == 0 {
		rl.MaxConcurrentDispatches = defaultMaxConcurrent
	}
	if rl.MaxConcurrentDispatches < 0 || rl.MaxConcurrentDispatches > maxConcurrentLimit {
		return status.Errorf(codes.InvalidArgument, "max_concurrent_dispatches must be in (0, %d]", maxConcurrentLimit)
	}
	// max_burst_size is output only, picked from the rate: one second's
	// worth, at most 100.
	rl.MaxBurstSize = int32(min(maxDefaultBurst, max(1, math.Ceil(rl.MaxDispatchesPerSecond))))

	if pb.RetryConfig == nil {
		pb.RetryConfig = &cloudtaskspb.RetryConfig{}
	}
	if err := applyRetryDefaults(pb.RetryConfig); err != nil {
		return err
	}
	if pb.State == cloudtaskspb.Queue_STATE_UNSPECIFIED {
		pb.State = cloudtaskspb.Queue_RUNNING
	}
	return nil
}

func applyRetryDefaults(rc *cloudtaskspb.RetryConfig) error {
	if rc.MaxAttempts == 0 {
		rc.MaxAttempts = defaultMaxAttempts
	}
	if rc.MaxAttempts < -1 {
		return status.Error(codes.InvalidArgument, "max_attempts must be >= -1")
	}
	if rc.MinBackoff == nil {
		rc.MinBackoff = durationpb.New(defaultMinBackoff)
	}
	if rc.MaxBackoff == nil {
		rc.MaxBackoff = durationpb.New(defaultMaxBackoff)
	}
	if rc.MaxDoublings == 0 {
		rc.MaxDoublings = defaultMaxDoublings
	}
	if rc.MaxRetryDuration == nil {
		rc.MaxRetryDuration = durationpb.New(0)
	}
	switch {
	case rc.MinBackoff.AsDuration() < 0, rc.MaxBackoff.AsDuration() < 0, rc.MaxRetryDuration.AsDuration() < 0:
		return status.Error(codes.InvalidArgument, "negative duration in retry_config")
	case rc.MinBackoff.AsDuration() > rc.MaxBackoff.AsDuration():
		return status.Error(codes.InvalidArgument, "min_backoff must not exceed max_backoff")
	case rc.MaxDoublings < 0:
		return status.Error(codes.InvalidArgument, "max_doublings must be >= 0")
	}
	return nil
}

func policyOf(rc *cloudtaskspb.RetryConfig) retryPolicy {
	return retryPolicy{
		maxAttempts:      int(rc.GetMaxAttempts()),
		maxRetryDuration: rc.GetMaxRetryDuration().AsDuration(),
		minBackoff:       rc.GetMinBackoff().AsDuration(),
		maxBackoff:       rc.GetMaxBackoff().AsDuration(),
		maxDoublings:     int(rc.GetMaxDoublings()),
	}
}

// backoff is the delay before the next attempt after failures failed
// attempts (failures >= 1): minBackoff doubled maxDoublings times, then
// growing by the last doubled interval per retry, capped at maxBackoff. With
// min 10 s, max 300 s and 3 doublings: 10, 20, 40, 80, 160, 240, 300, 300 s.
func (p retryPolicy) backoff(failures int) time.Duration {
	k := failures - 1
	if k < 0 {
		k = 0
	}
	var d time.Duration
	if k <= p.maxDoublings {
		d = p.minBackoff
		for range k {
			d *= 2
			if d >= p.maxBackoff || d <= 0 {
				return p.maxBackoff
			}
		}
	} else {
		step := p.minBackoff
		for range p.maxDoublings {
			step *= 2
			if step >= p.maxBackoff || step <= 0 {
				return p.maxBackoff
			}
		}
		mult := time.Duration(k - p.maxDoublings + 1)
		if step > p.maxBackoff/mult {
			return p.maxBackoff
		}
		d = step * mult
	}
	return min(d, p.maxBackoff)
}

// exhausted reports whether a task that made attempts attempts, the first at
// first, may not be retried at now. The service stops only when both the
// attempt limit and the retry duration are used up; an unlimited setting
// (-1 attempts, 0 duration) counts as used up only when the other is set.
func (p retryPolicy) exhausted(attempts int, first, now time.Time) bool {
	attemptsSet := p.maxAttempts >= 0
	durationSet := p.maxRetryDuration > 0
	if !attemptsSet && !durationSet {
		return false
	}
	attemptsDone := !attemptsSet || attempts >= p.maxAttempts
	durationDone := !durationSet || now.Sub(first) >= p.maxRetryDuration
	return attemptsDone && durationDone
}

// truncateRetry truncates the durations of rc to whole seconds, as the
// service does.
func truncateRetry(rc *cloudtaskspb.RetryConfig) {
	for _, d := range []**durationpb.Duration{&rc.MinBackoff, &rc.MaxBackoff, &rc.MaxRetryDuration} {
		if *d != nil {
			*d = &durationpb.Duration{Seconds: (*d).GetSeconds()}
		}
	}
}

// throttleLevel is the queue's throttling level at now: the level reached
// at the last 429 or 503 answer, less one per throttleRecovery since.
func (q *queue) throttleLevel(now time.Time) int {
	if q.throttle == 0 {
		return 0
	}
	return max(0, q.throttle-int(now.Sub(q.lastBusy)/throttleRecovery))
}

// limits are the dispatch rate and burst the queue allows at now: its rate
// limits, the rate halved per throttling level (down to throttleFloor) and
// no burst while throttled.
func (q *queue) limits(now time.Time) (rate, burst float64) {
	rate = q.pb.RateLimits.MaxDispatchesPerSecond
	burst = float64(q.pb.RateLimits.MaxBurstSize)
	if k := q.throttleLevel(now); k > 0 {
		rate = max(min(rate, throttleFloor), math.Ldexp(rate, -k))
		burst = 1
	}
	return rate, burst
}

// busy records a 429 or 503 answer at now: one more throttling level,
// unless the rate is already at the floor.
func (q *queue) busy(now time.Time) {
	if !q.throttles {
		return
	}
	k := q.throttleLevel(now)
	if rate, _ := q.limits(now); rate > throttleFloor {
		k++
	}
	q.throttle, q.lastBusy = k, now
}

// takeToken takes one dispatch token at now, or reports how long until one
// is available.
func (q *queue) takeToken(now time.Time) (bool, time.Duration) {
	rate, burst := q.limits(now)
	if !q.refill.IsZero() {
		q.tokens += now.Sub(q.refill).Seconds() * rate
	}
	q.tokens = min(burst, q.tokens)
	q.refill = now
	if q.tokens >= 1 {
		q.tokens--
		return true, 0
	}
	wait := time.Duration((1 - q.tokens) / rate * float64(time.Second))
	return false, max(wait, time.Millisecond)
}

// runQueue is the scheduler of one queue: it starts an attempt for every due
// task as far as the concurrency limit and the rate allow, and sleeps until
// the next task is due or something changes.
func (s *Server) runQueue(q *queue) {
	defer s.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := s.schedule(q)
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(next)
		select {
		case <-q.quit:
			return
		case <-s.ctx.Done():
			return
		case <-q.wake:
		case <-timer.C:
		}
	}
}

// schedule starts every attempt that may start now and returns how long to
// sleep before looking again.
func (s *Server) schedule(q *queue) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	sleep := time.Hour
	now := time.Now()
	for id, until := range q.tombs {
		if !now.Before(until) {
			delete(q.tombs, id)
		}
	}
	if q.pb.State != cloudtaskspb.Queue_RUNNING || s.closed {
		return sleep
	}
	for q.running < int(q.pb.RateLimits.MaxConcurrentDispatches) {
		t := q.nextDue()
		if t == nil {
			break
		}
		if wait := t.due.Sub(now); wait > 0 {
			sleep = min(sleep, wait)
			break
		}
		ok, wait := q.takeToken(now)
		if !ok {
			sleep = min(sleep, wait)
			break
		}
		s.startAttemptLocked(q, t, now)
	}
	return sleep
}

// nextDue is the task that is not running with the earliest schedule time,
// ties broken by creation order.
func (q *queue) nextDue() *task {
	var best *task
	for _, t := range q.tasks {
		if t.running {
			continue
		}
		if best == nil || t.due.Before(best.due) || (t.due.Equal(best.due) && t.seq < best.seq) {
			best = t
		}
	}
	return best
}
