package taskstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/genproto/googleapis/rpc/code"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Names of the headers Cloud Tasks adds to every dispatch.
const (
	HeaderQueueName        = "X-CloudTasks-QueueName"
	HeaderTaskName         = "X-CloudTasks-TaskName"
	HeaderRetryCount       = "X-CloudTasks-TaskRetryCount"
	HeaderExecutionCount   = "X-CloudTasks-TaskExecutionCount"
	HeaderETA              = "X-CloudTasks-TaskETA"
	HeaderPreviousResponse = "X-CloudTasks-TaskPreviousResponse"
	HeaderRetryReason      = "X-CloudTasks-TaskRetryReason"
)

// userAgent is the User-Agent of every dispatch.
const userAgent = "Google-Cloud-Tasks"

// attemptInput is what an attempt needs, copied under Server.mu.
type attemptInput struct {
	q        *queue
	t        *task
	queue    string // q.pb.Name, read under Server.mu
	req      *http.Request
	deadline time.Duration
	number   int
	due      time.Time
}

// startAttemptLocked marks t running and dispatches it on a new goroutine.
// s.mu must be held.
func (s *Server) startAttemptLocked(q *queue, t *task, now time.Time) {
	t.running = true
	t.dispatches++
	if t.first.IsZero() {
		t.first = now
	}
	q.running++
	disp := timestamppb.New(now)
	if t.pb.FirstAttempt == nil {
		t.pb.FirstAttempt = &cloudtaskspb.Attempt{DispatchTime: disp}
	}
	t.pb.DispatchCount = int32(t.dispatches)
	in := attemptInput{q: q, t: t, queue: q.pb.Name, deadline: t.deadline, number: t.dispatches, due: t.due}
	in.req = s.buildRequest(q, t)
	s.wg.Add(1)
	go s.attempt(in, now)
}

// buildRequest makes the HTTP request of t's next attempt. s.mu must be held.
func (s *Server) buildRequest(q *queue, t *task) *http.Request {
	hr := t.pb.GetHttpRequest()
	method := methodOf(hr.GetHttpMethod())
	req, err := http.NewRequest(method, hr.GetUrl(), bytes.NewReader(hr.GetBody()))
	if err != nil {
		// CreateTask validated the URL; a failure here is a bug.
		panic(fmt.Sprintf("taskstest: request for validated task: %v", err))
	}
	for k, v := range hr.GetHeaders() {
		if reservedHeader(k) {
			continue
		}
		req.Header.Set(k, v)
	}
	req.Header.Set("User-Agent", userAgent)
	req.Header.Set(HeaderQueueName, q.shortID)
	req.Header.Set(HeaderTaskName, t.id)
	req.Header.Set(HeaderRetryCount, strconv.Itoa(t.dispatches-1))
	req.Header.Set(HeaderExecutionCount, strconv.Itoa(t.executions))
	req.Header.Set(HeaderETA, formatETA(t.due))
	if t.dispatches > 1 {
		if t.prevStatus != 0 {
			req.Header.Set(HeaderPreviousResponse, strconv.Itoa(t.prevStatus))
		}
		req.Header.Set(HeaderRetryReason, t.prevReason)
	}
	if tok := hr.GetOidcToken(); tok != nil {
		aud := tok.GetAudience()
		if aud == "" {
			aud = hr.GetUrl()
		}
		req.Header.Set("Authorization", "Bearer "+fakeToken(tok.GetServiceAccountEmail(), aud, time.Now()))
	}
	if tok := hr.GetOauthToken(); tok != nil {
		scope := tok.GetScope()
		if scope == "" {
			scope = DefaultOAuthScope
		}
		req.Header.Set("Authorization", "Bearer "+fakeAccessToken(tok.GetServiceAccountEmail(), scope, time.Now()))
	}
	return req
}

// reservedHeader reports whether the service ignores or replaces a header a
// task sets.
func reservedHeader(k string) bool {
	k = strings.ToLower(k)
	switch k {
	case "host", "content-length", "user-agent":
		return true
	}
	return strings.HasPrefix(k, "x-google-") || strings.HasPrefix(k, "x-appengine-") || strings.HasPrefix(k, "x-cloudtasks-")
}

func methodOf(m cloudtaskspb.HttpMethod) string {
	switch m {
	case cloudtaskspb.HttpMethod_GET:
		return http.MethodGet
	case cloudtaskspb.HttpMethod_HEAD:
		return http.MethodHead
	case cloudtaskspb.HttpMethod_PUT:
		return http.MethodPut
	case cloudtaskspb.HttpMethod_DELETE:
		return http.MethodDelete
	case cloudtaskspb.HttpMethod_PATCH:
		return http.MethodPatch
	case cloudtaskspb.HttpMethod_OPTIONS:
		return http.MethodOptions
	default:
		return http.MethodPost
	}
}

// formatETA writes t as seconds since the Unix epoch with microseconds, the
// form of X-CloudTasks-TaskETA.
func formatETA(t time.Time) string {
	us := t.UnixMicro()
	return fmt.Sprintf("%d.%06d", us/1e6, us%1e6)
}

// jitter returns a uniformly drawn duration in [0, d), 0 when d <= 0.
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(d)))
}

// attempt sends one request and records its outcome.
func (s *Server) attempt(in attemptInput, dispatched time.Time) {
	defer s.wg.Done()
	ctx, cancel := context.WithTimeout(s.ctx, in.deadline)
	defer cancel()
	if d := s.opts.DispatchDelay + jitter(s.opts.DispatchJitter); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
			dispatched = time.Now()
		case <-ctx.Done():
			t.Stop()
		}
	}
	rec := Attempt{
		Queue:      in.queue,
		Task:       in.t.id,
		Number:     in.number,
		Scheduled:  in.due,
		Dispatched: dispatched,
		Header:     in.req.Header.Clone(),
	}
	resp, err := s.http.Do(in.req.WithContext(ctx))
	if err == nil {
		drain(resp.Body)
		_ = resp.Body.Close()
		rec.Status = resp.StatusCode
		rec.RetryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	} else {
		rec.Err = err
		if ctx.Err() != nil && s.ctx.Err() == nil {
			rec.Err = fmt.Errorf("dispatch deadline %v exceeded: %w", in.deadline, context.DeadlineExceeded)
		}
	}
	rec.Responded = time.Now()
	s.finish(in, &rec)
	s.logf("taskstest: attempt", "queue", rec.Queue, "task", rec.Task, "attempt", rec.Number,
		"status", rec.Status, "err", rec.Err, "outcome", rec.Outcome)
	if s.opts.OnAttempt != nil {
		s.opts.OnAttempt(rec)
	}
}

// finish applies an attempt's outcome to its task: delete it on success or
// when its retries are used up, else schedule the next attempt.
func (s *Server) finish(in attemptInput, rec *Attempt) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q, t := in.q, in.t
	q.running--
	t.running = false
	now := rec.Responded

	if s.ctx.Err() != nil {
		// Closing: the attempt was cancelled by Close, not by the worker.
		rec.Outcome = "cancelled"
		s.attempts = append(s.attempts, *rec)
		return
	}
	last := &cloudtaskspb.Attempt{
		ScheduleTime:   timestamppb.New(rec.Scheduled),
		DispatchTime:   timestamppb.New(rec.Dispatched),
		ResponseTime:   timestamppb.New(now),
		ResponseStatus: responseStatus(rec),
	}
	t.pb.LastAttempt = last
	if rec.Status != 0 {
		t.responses++
		t.pb.ResponseCount = int32(t.responses)
		if rec.Status < 500 {
			t.executions++
		}
	}

	if rec.Status == http.StatusTooManyRequests || rec.Status == http.StatusServiceUnavailable {
		q.busy(now)
	}

	switch {
	case t.deleted:
		rec.Outcome = "deleted"
	case rec.Status >= 200 && rec.Status < 300:
		rec.Outcome = "done"
		s.removeLocked(q, t, now)
	case t.retry.exhausted(t.dispatches, t.first, now):
		rec.Outcome = "gave-up"
		s.removeLocked(q, t, now)
	default:
		rec.Outcome = "retry"
		delay := t.retry.backoff(t.dispatches)
		if rec.RetryAfter > 0 && (rec.Status == http.StatusTooManyRequests || rec.Status == http.StatusServiceUnavailable) {
			ra := rec.RetryAfter
			if s.opts.MaxRetryAfter > 0 {
				ra = min(ra, s.opts.MaxRetryAfter)
			}
			delay = max(delay, ra)
		}
		t.due = now.Add(delay)
		t.pb.ScheduleTime = timestamppb.New(t.due)
		t.prevStatus = rec.Status
		t.prevReason = retryReason(rec)
		rec.NextAttempt = t.due
	}
	s.attempts = append(s.attempts, *rec)
	q.poke()
	s.notifyLocked()
}

// removeLocked deletes a live task and reserves its name for the dedup
// window. s.mu must be held.
func (s *Server) removeLocked(q *queue, t *task, now time.Time) {
	delete(q.tasks, t.id)
	q.tombs[t.id] = now.Add(s.opts.DedupWindow)
	t.deleted = true
}

// retryReason describes why an attempt is retried, for
// X-CloudTasks-TaskRetryReason. The words are the emulator's own.
func retryReason(rec *Attempt) string {
	switch {
	case rec.Status != 0:
		return fmt.Sprintf("HTTP status %d", rec.Status)
	case errors.Is(rec.Err, context.DeadlineExceeded):
		return "dispatch deadline exceeded"
	default:
		return "connection error"
	}
}

// responseStatus maps an attempt's outcome to the google.rpc.Status the
// service reports in Attempt.response_status.
func responseStatus(rec *Attempt) *statuspb.Status {
	if rec.Status == 0 {
		c := code.Code_UNAVAILABLE
		if errors.Is(rec.Err, context.DeadlineExceeded) {
			c = code.Code_DEADLINE_EXCEEDED
		}
		return &statuspb.Status{Code: int32(c), Message: rec.Err.Error()}
	}
	c := code.Code_UNKNOWN
	switch {
	case rec.Status >= 200 && rec.Status < 300:
		c = code.Code_OK
	case rec.Status == 400:
		c = code.Code_INVALID_ARGUMENT
	case rec.Status == 401:
		c = code.Code_UNAUTHENTICATED
	case rec.Status == 403:
		c = code.Code_PERMISSION_DENIED
	case rec.Status == 404:
		c = code.Code_NOT_FOUND
	case rec.Status == 409:
		c = code.Code_ABORTED
	case rec.Status == 429:
		c = code.Code_RESOURCE_EXHAUSTED
	case rec.Status == 501:
		c = code.Code_UNIMPLEMENTED
	case rec.Status == 503:
		c = code.Code_UNAVAILABLE
	case rec.Status == 504:
		c = code.Code_DEADLINE_EXCEEDED
	case rec.Status >= 500:
		c = code.Code_INTERNAL
	}
	return &statuspb.Status{Code: int32(c), Message: fmt.Sprintf("HTTP status code %d", rec.Status)}
}

// parseRetryAfter reads a Retry-After value: delay seconds or an HTTP date.
// It returns 0 when v is empty or malformed.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n <= 0 {
			return 0
		}
		return time.Duration(min(n, int64(MaxScheduleAhead/time.Second))) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
