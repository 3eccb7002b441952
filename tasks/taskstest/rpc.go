package taskstest

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

const (
	maxURLLength    = 2083
	maxHeadersBytes = 80 << 10
	maxPageSize     = 1000
)

// ---- queues ----

// CreateQueue creates a queue; ALREADY_EXISTS when it exists.
func (s *Server) CreateQueue(_ context.Context, req *cloudtaskspb.CreateQueueRequest) (*cloudtaskspb.Queue, error) {
	if !locationRE.MatchString(req.GetParent()) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid parent %q", req.GetParent())
	}
	if !strings.HasPrefix(req.GetQueue().GetName(), req.GetParent()+"/queues/") {
		return nil, status.Errorf(codes.InvalidArgument, "queue name %q is not in %q", req.GetQueue().GetName(), req.GetParent())
	}
	q, err := s.newQueue(req.GetQueue())
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.queues[q.pb.Name] != nil {
		return nil, status.Errorf(codes.AlreadyExists, "queue %q already exists", q.pb.Name)
	}
	if err := s.reusableLocked(q.pb.Name, time.Now()); err != nil {
		return nil, err
	}
	s.addQueueLocked(q)
	return proto.Clone(q.pb).(*cloudtaskspb.Queue), nil
}

// newQueue validates pb and fills in the service's defaults, with the
// durations of its retry config truncated to seconds unless
// Options.SubsecondBackoffs is set.
func (s *Server) newQueue(pb *cloudtaskspb.Queue) (*queue, error) {
	if !s.opts.SubsecondBackoffs && pb.GetRetryConfig() != nil {
		pb = proto.Clone(pb).(*cloudtaskspb.Queue)
		truncateRetry(pb.RetryConfig)
	}
	q, err := newQueue(pb)
	if err != nil {
		return nil, err
	}
	q.throttles = !s.opts.NoSystemThrottling
	return q, nil
}

// reusableLocked fails with FAILED_PRECONDITION while the name of a deleted
// queue is reserved. s.mu must be held.
func (s *Server) reusableLocked(name string, now time.Time) error {
	until, ok := s.tombs[name]
	if !ok {
		return nil
	}
	if now.Before(until) {
		return status.Errorf(codes.FailedPrecondition, "the queue %q cannot be used because a queue with this name existed too recently", name)
	}
	delete(s.tombs, name)
	return nil
}

// addQueueLocked registers q and starts its scheduler. s.mu must be held.
func (s *Server) addQueueLocked(q *queue) {
	s.queues[q.pb.Name] = q
	if s.closed {
		q.stop()
		return
	}
	s.wg.Add(1)
	go s.runQueue(q)
}

// GetQueue returns a queue; NOT_FOUND when it does not exist.
func (s *Server) GetQueue(_ context.Context, req *cloudtaskspb.GetQueueRequest) (*cloudtaskspb.Queue, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q, err := s.queueLocked(req.GetName())
	if err != nil {
		return nil, err
	}
	return proto.Clone(q.pb).(*cloudtaskspb.Queue), nil
}

// UpdateQueue creates the queue, or updates the rate limits and retry
// settings named by the update mask ("rate_limits", "retry_config" or their
// fields; all of them when the mask is empty). Only fields set in the request
// change.
func (s *Server) UpdateQueue(_ context.Context, req *cloudtaskspb.UpdateQueueRequest) (*cloudtaskspb.Queue, error) {
	in := req.GetQueue()
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.queues[in.GetName()]
	if old == nil {
		q, err := s.newQueue(in)
		if err != nil {
			return nil, err
		}
		if err := s.reusableLocked(q.pb.Name, time.Now()); err != nil {
			return nil, err
		}
		s.addQueueLocked(q)
		return proto.Clone(q.pb).(*cloudtaskspb.Queue), nil
	}
	merged := proto.Clone(old.pb).(*cloudtaskspb.Queue)
	paths := req.GetUpdateMask().GetPaths()
	has := func(field string) bool {
		return len(paths) == 0 || slices.ContainsFunc(paths, func(p string) bool {
			return p == field || strings.HasPrefix(p, field+".")
		})
	}
	if rl := in.GetRateLimits(); rl != nil && has("rate_limits") {
		if rl.MaxDispatchesPerSecond != 0 {
			merged.RateLimits.MaxDispatchesPerSecond = rl.MaxDispatchesPerSecond
		}
		if rl.MaxConcurrentDispatches != 0 {
			merged.RateLimits.MaxConcurrentDispatches = rl.MaxConcurrentDispatches
		}
	}
	if rc := in.GetRetryConfig(); rc != nil && has("retry_config") {
		if !s.opts.SubsecondBackoffs {
			rc = proto.Clone(rc).(*cloudtaskspb.RetryConfig)
			truncateRetry(rc)
		}
		m := merged.RetryConfig
		if rc.MaxAttempts != 0 {
			m.MaxAttempts = rc.MaxAttempts
		}
		if rc.MaxRetryDuration != nil {
			m.MaxRetryDuration = rc.MaxRetryDuration
		}
		if rc.MinBackoff != nil {
			m.MinBackoff = rc.MinBackoff
		}
		if rc.MaxBackoff != nil {
			m.MaxBackoff = rc.MaxBackoff
		}
		if rc.MaxDoublings != 0 {
			m.MaxDoublings = rc.MaxDoublings
		}
	}
	if err := applyQueueDefaults(merged); err != nil {
		return nil, err
	}
	old.pb = merged
	old.retry = policyOf(merged.RetryConfig)
	old.tokens = min(old.tokens, float64(merged.RateLimits.MaxBurstSize))
	old.poke()
	return proto.Clone(merged).(*cloudtaskspb.Queue), nil
}

// DeleteQueue deletes a queue and its tasks. Attempts in flight finish, but
// their outcome is discarded.
func (s *Server) DeleteQueue(_ context.Context, req *cloudtaskspb.DeleteQueueRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q, err := s.queueLocked(req.GetName())
	if err != nil {
		return nil, err
	}
	for _, t := range q.tasks {
		t.deleted = true
	}
	q.tasks = map[string]*task{}
	q.stop()
	delete(s.queues, q.pb.Name)
	s.tombs[q.pb.Name] = time.Now().Add(s.opts.QueueReuseDelay)
	s.notifyLocked()
	return &emptypb.Empty{}, nil
}

// ListQueues lists the queues of a location in name order.
func (s *Server) ListQueues(_ context.Context, req *cloudtaskspb.ListQueuesRequest) (*cloudtaskspb.ListQueuesResponse, error) {
	if !locationRE.MatchString(req.GetParent()) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid parent %q", req.GetParent())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var names []string
	for name := range s.queues {
		if strings.HasPrefix(name, req.GetParent()+"/queues/") {
			names = append(names, name)
		}
	}
	page, next, err := paginate(names, req.GetPageSize(), req.GetPageToken())
	if err != nil {
		return nil, err
	}
	resp := &cloudtaskspb.ListQueuesResponse{NextPageToken: next}
	for _, name := range page {
		resp.Queues = append(resp.Queues, proto.Clone(s.queues[name].pb).(*cloudtaskspb.Queue))
	}
	return resp, nil
}

// PauseQueue stops dispatching from a queue; tasks can still be added.
func (s *Server) PauseQueue(_ context.Context, req *cloudtaskspb.PauseQueueRequest) (*cloudtaskspb.Queue, error) {
	return s.setState(req.GetName(), cloudtaskspb.Queue_PAUSED)
}

// ResumeQueue resumes dispatching from a paused queue.
func (s *Server) ResumeQueue(_ context.Context, req *cloudtaskspb.ResumeQueueRequest) (*cloudtaskspb.Queue, error) {
	return s.setState(req.GetName(), cloudtaskspb.Queue_RUNNING)
}

func (s *Server) setState(name string, st cloudtaskspb.Queue_State) (*cloudtaskspb.Queue, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q, err := s.queueLocked(name)
	if err != nil {
		return nil, err
	}
	q.pb.State = st
	q.poke()
	return proto.Clone(q.pb).(*cloudtaskspb.Queue), nil
}

// PurgeQueue deletes every task of a queue. Their names stay reserved for
// the dedup window.
func (s *Server) PurgeQueue(_ context.Context, req *cloudtaskspb.PurgeQueueRequest) (*cloudtaskspb.Queue, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q, err := s.queueLocked(req.GetName())
	if err != nil {
		return nil, err
	}
	now := time.Now()
	for _, t := range q.tasks {
		s.removeLocked(q, t, now)
	}
	q.pb.PurgeTime = timestamppb.New(now)
	s.notifyLocked()
	return proto.Clone(q.pb).(*cloudtaskspb.Queue), nil
}

func (s *Server) queueLocked(name string) (*queue, error) {
	if !queueRE.MatchString(name) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid queue name %q", name)
	}
	q := s.queues[name]
	if q == nil {
		return nil, status.Errorf(codes.NotFound, "queue %q does not exist", name)
	}
	return q, nil
}

// ---- tasks ----

// CreateTask validates and adds a task, as the service does: ALREADY_EXISTS
// for a name in use or within its dedup window, INVALID_ARGUMENT for a bad
// name, URL, deadline, schedule time or size, NOT_FOUND for a missing queue.
func (s *Server) CreateTask(ctx context.Context, req *cloudtaskspb.CreateTaskRequest) (*cloudtaskspb.Task, error) {
	half := s.opts.CreateTaskLatency / 2
	if err := s.pause(ctx, half); err != nil {
		return nil, err
	}
	t, err := s.createTask(req)
	if perr := s.pause(ctx, s.opts.CreateTaskLatency-half); perr != nil && err == nil {
		// The task exists; the caller gave up waiting for the answer, as
		// with the service.
		return nil, perr
	}
	return t, err
}

// pause waits d (Options.CreateTaskLatency's halves) or until ctx or the
// server ends.
func (s *Server) pause(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	case <-s.ctx.Done():
		return status.Error(codes.Unavailable, "taskstest: server closed")
	}
}

func (s *Server) createTask(req *cloudtaskspb.CreateTaskRequest) (*cloudtaskspb.Task, error) {
	now := time.Now()
	parent := req.GetParent()
	if !queueRE.MatchString(parent) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid parent %q", parent)
	}
	in := req.GetTask()
	if in == nil {
		return nil, status.Error(codes.InvalidArgument, "task is required")
	}
	if size := proto.Size(in); size > MaxTaskSize {
		return nil, status.Errorf(codes.InvalidArgument, "task size %d bytes exceeds the maximum of %d", size, MaxTaskSize)
	}
	hr := in.GetHttpRequest()
	if hr == nil {
		return nil, status.Error(codes.InvalidArgument, "only HTTP tasks are supported by the emulator")
	}
	if err := validateHTTPRequest(hr); err != nil {
		return nil, err
	}
	target := encodeURL(hr.GetUrl())
	id := ""
	if in.GetName() != "" {
		m := taskRE.FindStringSubmatch(in.GetName())
		if m == nil || m[1] != parent || len(m[2]) > MaxTaskIDLength {
			return nil, status.Errorf(codes.InvalidArgument, "invalid task name %q for queue %q", in.GetName(), parent)
		}
		id = m[2]
	}
	due := now
	if in.ScheduleTime != nil {
		if err := in.ScheduleTime.CheckValid(); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "schedule_time: %v", err)
		}
		due = in.ScheduleTime.AsTime()
		if due.Sub(now) > MaxScheduleAhead {
			return nil, status.Errorf(codes.InvalidArgument, "schedule_time %v is more than 30 days ahead", due)
		}
		// A time in the past means now, as the service sets it.
		due = later(due, now).Truncate(time.Microsecond)
	}
	deadline := DefaultDispatchDeadline
	if in.DispatchDeadline != nil {
		deadline = in.DispatchDeadline.AsDuration().Truncate(time.Millisecond)
		if deadline < s.opts.MinDispatchDeadline || deadline > MaxDispatchDeadline {
			return nil, status.Errorf(codes.InvalidArgument, "dispatch_deadline %v outside [%v, %v]", deadline, s.opts.MinDispatchDeadline, MaxDispatchDeadline)
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.queues[parent]
	if q == nil {
		if err := s.reusableLocked(parent, now); err != nil {
			return nil, err
		}
	}
	if q == nil && s.opts.AutoCreateQueues && !s.closed {
		var err error
		if q, err = s.newQueue(&cloudtaskspb.Queue{Name: parent}); err != nil {
			return nil, err
		}
		s.addQueueLocked(q)
	}
	if q == nil {
		return nil, status.Errorf(codes.NotFound, "queue %q does not exist", parent)
	}
	retry := q.retry
	if in.RetryConfig != nil {
		rc := proto.Clone(in.RetryConfig).(*cloudtaskspb.RetryConfig)
		if !s.opts.SubsecondBackoffs {
			truncateRetry(rc)
		}
		if err := applyRetryDefaults(rc); err != nil {
			return nil, err
		}
		retry = policyOf(rc)
	}
	if id == "" {
		id = s.newTaskIDLocked(q)
	} else if q.tasks[id] != nil {
		return nil, status.Errorf(codes.AlreadyExists, "task %q already exists", in.GetName())
	} else if until, ok := q.tombs[id]; ok && now.Before(until) {
		return nil, status.Errorf(codes.AlreadyExists, "task %q was deleted or executed recently", in.GetName())
	}

	pb := proto.Clone(in).(*cloudtaskspb.Task)
	pb.Name = parent + "/tasks/" + id
	pb.ScheduleTime = timestamppb.New(due)
	pb.CreateTime = timestamppb.New(now.Truncate(time.Second))
	pb.DispatchDeadline = durationpb.New(deadline)
	pb.DispatchCount, pb.ResponseCount = 0, 0
	pb.FirstAttempt, pb.LastAttempt = nil, nil
	pb.GetHttpRequest().Url = target
	if pb.GetHttpRequest().GetHttpMethod() == cloudtaskspb.HttpMethod_HTTP_METHOD_UNSPECIFIED {
		pb.GetHttpRequest().HttpMethod = cloudtaskspb.HttpMethod_POST
	}
	q.seq++
	q.tasks[id] = &task{pb: pb, id: id, seq: q.seq, due: due, deadline: deadline, retry: retry}
	q.poke()
	s.notifyLocked()
	return view(pb, req.GetResponseView()), nil
}

func validateHTTPRequest(hr *cloudtaskspb.HttpRequest) error {
	u, err := url.Parse(encodeURL(hr.GetUrl()))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return status.Errorf(codes.InvalidArgument, "url %q must be an absolute http:// or https:// URL", hr.GetUrl())
	}
	if len(hr.GetUrl()) > maxURLLength {
		return status.Errorf(codes.InvalidArgument, "url longer than %d characters", maxURLLength)
	}
	switch hr.GetHttpMethod() {
	case cloudtaskspb.HttpMethod_HTTP_METHOD_UNSPECIFIED, cloudtaskspb.HttpMethod_POST,
		cloudtaskspb.HttpMethod_PUT, cloudtaskspb.HttpMethod_PATCH:
	default:
		if len(hr.GetBody()) > 0 {
			return status.Errorf(codes.InvalidArgument, "a body is allowed only with POST, PUT or PATCH, not %v", hr.GetHttpMethod())
		}
	}
	n := 0
	for k, v := range hr.GetHeaders() {
		n += len(k) + len(v)
	}
	if n >= maxHeadersBytes {
		return status.Errorf(codes.InvalidArgument, "headers of %d bytes exceed 80KB", n)
	}
	if tok := hr.GetOidcToken(); tok != nil && tok.GetServiceAccountEmail() == "" {
		return status.Error(codes.InvalidArgument, "oidc_token.service_account_email is required")
	}
	if tok := hr.GetOauthToken(); tok != nil && tok.GetServiceAccountEmail() == "" {
		return status.Error(codes.InvalidArgument, "oauth_token.service_account_email is required")
	}
	return nil
}

// encodeURL percent-encodes what a URL may not hold as is, the way the
// service does rather than refusing the URL: a '%' that does not start a
// %XX escape becomes %25, and spaces, control characters and bytes above
// 0x7F after the host are escaped. Valid escapes are kept as they are.
func encodeURL(raw string) string {
	start := 0
	if i := strings.Index(raw, "://"); i >= 0 {
		start = i + 3
		if j := strings.IndexAny(raw[start:], "/?#"); j >= 0 {
			start += j
		} else {
			return raw
		}
	}
	var b strings.Builder
	b.WriteString(raw[:start])
	for i := start; i < len(raw); i++ {
		c := raw[i]
		switch {
		case c == '%' && i+2 < len(raw) && isHex(raw[i+1]) && isHex(raw[i+2]):
			b.WriteByte(c)
		case c == '%' || c <= ' ' || c >= 0x7f:
			fmt.Fprintf(&b, "%%%02X", c)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// newTaskIDLocked makes a random numeric id, like the service's generated
// ids, that is not in use.
func (s *Server) newTaskIDLocked(q *queue) string {
	for {
		var b [8]byte
		_, _ = rand.Read(b[:])
		id := strconv.FormatUint(binary.BigEndian.Uint64(b[:])>>1, 10)
		if q.tasks[id] == nil && q.tombs[id].IsZero() {
			return id
		}
	}
}

// GetTask returns a live task; NOT_FOUND once it succeeded, gave up or was
// deleted.
func (s *Server) GetTask(_ context.Context, req *cloudtaskspb.GetTaskRequest) (*cloudtaskspb.Task, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, t, err := s.taskLocked(req.GetName())
	if err != nil {
		return nil, err
	}
	return view(t.pb, req.GetResponseView()), nil
}

// ListTasks lists a queue's live tasks in name order.
func (s *Server) ListTasks(_ context.Context, req *cloudtaskspb.ListTasksRequest) (*cloudtaskspb.ListTasksResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q, err := s.queueLocked(req.GetParent())
	if err != nil {
		return nil, err
	}
	var names []string
	for _, t := range q.tasks {
		names = append(names, t.pb.Name)
	}
	page, next, err := paginate(names, req.GetPageSize(), req.GetPageToken())
	if err != nil {
		return nil, err
	}
	resp := &cloudtaskspb.ListTasksResponse{NextPageToken: next}
	for _, name := range page {
		id := name[strings.LastIndexByte(name, '/')+1:]
		resp.Tasks = append(resp.Tasks, view(q.tasks[id].pb, req.GetResponseView()))
	}
	return resp, nil
}

// DeleteTask deletes a scheduled or running task and reserves its name for
// the dedup window; NOT_FOUND when it no longer exists. An attempt in flight
// is not cancelled, but its outcome is discarded.
func (s *Server) DeleteTask(_ context.Context, req *cloudtaskspb.DeleteTaskRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q, t, err := s.taskLocked(req.GetName())
	if err != nil {
		return nil, err
	}
	s.removeLocked(q, t, time.Now())
	s.notifyLocked()
	return &emptypb.Empty{}, nil
}

func (s *Server) taskLocked(name string) (*queue, *task, error) {
	m := taskRE.FindStringSubmatch(name)
	if m == nil {
		return nil, nil, status.Errorf(codes.InvalidArgument, "invalid task name %q", name)
	}
	q, err := s.queueLocked(m[1])
	if err != nil {
		return nil, nil, err
	}
	t := q.tasks[m[2]]
	if t == nil {
		return nil, nil, status.Errorf(codes.NotFound, "task %q does not exist", name)
	}
	return q, t, nil
}

// view copies a task for an answer; the BASIC view (the default) leaves out
// the body, as the service does.
func view(pb *cloudtaskspb.Task, v cloudtaskspb.Task_View) *cloudtaskspb.Task {
	out := proto.Clone(pb).(*cloudtaskspb.Task)
	if v != cloudtaskspb.Task_FULL {
		v = cloudtaskspb.Task_BASIC
		if hr := out.GetHttpRequest(); hr != nil {
			hr.Body = nil
		}
	}
	out.View = v
	return out
}

// paginate sorts names and returns the page after token (the last name of
// the previous page).
func paginate(names []string, size int32, token string) ([]string, string, error) {
	if size < 0 {
		return nil, "", status.Error(codes.InvalidArgument, "negative page_size")
	}
	if size == 0 || size > maxPageSize {
		size = maxPageSize
	}
	slices.Sort(names)
	start := 0
	if token != "" {
		start, _ = slices.BinarySearch(names, token)
		if start < len(names) && names[start] == token {
			start++
		}
	}
	end := min(len(names), start+int(size))
	next := ""
	if end < len(names) {
		next = names[end-1]
	}
	return names[start:end], next, nil
}
