package taskstest_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	cloudtasks "cloud.google.com/go/cloudtasks/apiv2"
	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"go.uber.org/goleak"
	"google.golang.org/api/iterator"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/taskguard/taskguard/tasks/taskstest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	location  = "projects/p/locations/l"
	queueName = location + "/queues/q"
)

type env struct {
	srv    *taskstest.Server
	client *cloudtasks.Client
}

// newEnv starts an emulator with one queue (settings from rl and rc, nil for
// defaults) and a real client connected to it.
func newEnv(t *testing.T, opts taskstest.Options, rl *cloudtaskspb.RateLimits, rc *cloudtaskspb.RetryConfig) *env {
	t.Helper()
	srv := taskstest.Start(t, opts)
	client, err := srv.NewClient(t.Context())
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	t.Cleanup(func() { _ = client.Close() })
	_, err = client.CreateQueue(t.Context(), &cloudtaskspb.CreateQueueRequest{
		Parent: location,
		Queue:  &cloudtaskspb.Queue{Name: queueName, RateLimits: rl, RetryConfig: rc},
	})
	if err != nil {
		t.Fatalf("CreateQueue: %v", err)
	}
	return &env{srv: srv, client: client}
}

func httpTask(url string, body string) *cloudtaskspb.Task {
	return &cloudtaskspb.Task{MessageType: &cloudtaskspb.Task_HttpRequest{HttpRequest: &cloudtaskspb.HttpRequest{
		Url:  url,
		Body: []byte(body),
	}}}
}

func (e *env) create(t *testing.T, task *cloudtaskspb.Task) *cloudtaskspb.Task {
	t.Helper()
	got, err := e.client.CreateTask(t.Context(), &cloudtaskspb.CreateTaskRequest{Parent: queueName, Task: task})
	if err != nil {
		t.Fatalf("CreateTask: %v", err)
	}
	return got
}

// whilePaused runs fn with the queue paused, and resumes it.
func (e *env) whilePaused(t *testing.T, fn func()) {
	t.Helper()
	if _, err := e.client.PauseQueue(t.Context(), &cloudtaskspb.PauseQueueRequest{Name: queueName}); err != nil {
		t.Fatal(err)
	}
	fn()
	if _, err := e.client.ResumeQueue(t.Context(), &cloudtaskspb.ResumeQueueRequest{Name: queueName}); err != nil {
		t.Fatal(err)
	}
}

func (e *env) waitIdle(t *testing.T, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	defer cancel()
	if err := e.srv.WaitIdle(ctx, queueName); err != nil {
		t.Fatalf("%v (attempts so far: %d)", err, len(e.srv.Attempts()))
	}
}

// recorder is a target that answers with the statuses it is given, in turn,
// and records every request it got.
type recorder struct {
	mu       sync.Mutex
	reqs     []*http.Request
	bodies   []string
	at       []time.Time
	answers  []int
	headers  []map[string]string // extra answer headers, by request index
	inFlight atomic.Int32
	maxSeen  atomic.Int32
	hold     time.Duration
}

func (r *recorder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	n := r.inFlight.Add(1)
	defer r.inFlight.Add(-1)
	for {
		m := r.maxSeen.Load()
		if n <= m || r.maxSeen.CompareAndSwap(m, n) {
			break
		}
	}
	body, _ := io.ReadAll(req.Body)
	r.mu.Lock()
	i := len(r.reqs)
	r.reqs = append(r.reqs, req)
	r.bodies = append(r.bodies, string(body))
	r.at = append(r.at, time.Now())
	code := http.StatusOK
	if i < len(r.answers) {
		code = r.answers[i]
	}
	var extra map[string]string
	if i < len(r.headers) {
		extra = r.headers[i]
	}
	r.mu.Unlock()
	if r.hold > 0 {
		select {
		case <-time.After(r.hold):
		case <-req.Context().Done():
		}
	}
	for k, v := range extra {
		w.Header().Set(k, v)
	}
	w.WriteHeader(code)
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.reqs)
}

func serve(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	ts := httptest.NewServer(h)
	t.Cleanup(ts.Close)
	return ts
}

// fastRetry retries in milliseconds: the emulator must run with
// Options.SubsecondBackoffs, or the backoffs truncate to 0 s.
func fastRetry(maxAttempts int32) *cloudtaskspb.RetryConfig {
	return &cloudtaskspb.RetryConfig{
		MaxAttempts:  maxAttempts,
		MinBackoff:   durationpb.New(10 * time.Millisecond),
		MaxBackoff:   durationpb.New(40 * time.Millisecond),
		MaxDoublings: 2,
	}
}

func TestCreateTaskValidation(t *testing.T) {
	e := newEnv(t, taskstest.Options{}, nil, nil)
	later := func(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(time.Now().Add(d)) }
	url := "http://127.0.0.1:1/x"
	tests := []struct {
		name   string
		parent string
		task   func() *cloudtaskspb.Task
		want   codes.Code
	}{
		{"ok", queueName, func() *cloudtaskspb.Task { return httpTask(url, "x") }, codes.OK},
		{"ok named", queueName, func() *cloudtaskspb.Task {
			tk := httpTask(url, "x")
			tk.Name = queueName + "/tasks/" + strings.Repeat("a-_9", 125)
			return tk
		}, codes.OK},
		{"missing queue", location + "/queues/nope", func() *cloudtaskspb.Task { return httpTask(url, "") }, codes.NotFound},
		{"bad parent", "projects/p/queues/q", func() *cloudtaskspb.Task { return httpTask(url, "") }, codes.InvalidArgument},
		{"bad id charset", queueName, func() *cloudtaskspb.Task {
			tk := httpTask(url, "")
			tk.Name = queueName + "/tasks/a.b"
			return tk
		}, codes.InvalidArgument},
		{"id too long", queueName, func() *cloudtaskspb.Task {
			tk := httpTask(url, "")
			tk.Name = queueName + "/tasks/" + strings.Repeat("a", 501)
			return tk
		}, codes.InvalidArgument},
		{"name in other queue", queueName, func() *cloudtaskspb.Task {
			tk := httpTask(url, "")
			tk.Name = location + "/queues/other/tasks/a"
			return tk
		}, codes.InvalidArgument},
		{"too large", queueName, func() *cloudtaskspb.Task { return httpTask(url, strings.Repeat("x", taskstest.MaxTaskSize)) }, codes.InvalidArgument},
		{"30 days ahead", queueName, func() *cloudtaskspb.Task {
			tk := httpTask(url, "")
			tk.ScheduleTime = later(30*24*time.Hour + time.Minute)
			return tk
		}, codes.InvalidArgument},
		{"29 days ahead", queueName, func() *cloudtaskspb.Task {
			tk := httpTask(url, "")
			tk.ScheduleTime = later(29 * 24 * time.Hour)
			return tk
		}, codes.OK},
		{"deadline too short", queueName, func() *cloudtaskspb.Task {
			tk := httpTask(url, "")
			tk.DispatchDeadline = durationpb.New(14 * time.Second)
			return tk
		}, codes.InvalidArgument},
		{"deadline too long", queueName, func() *cloudtaskspb.Task {
			tk := httpTask(url, "")
			tk.DispatchDeadline = durationpb.New(31 * time.Minute)
			return tk
		}, codes.InvalidArgument},
		{"not http", queueName, func() *cloudtaskspb.Task { return httpTask("ftp://h/x", "") }, codes.InvalidArgument},
		{"body with GET", queueName, func() *cloudtaskspb.Task {
			tk := httpTask(url, "x")
			tk.GetHttpRequest().HttpMethod = cloudtaskspb.HttpMethod_GET
			return tk
		}, codes.InvalidArgument},
		{"no target", queueName, func() *cloudtaskspb.Task { return &cloudtaskspb.Task{} }, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tk := tt.task()
			tk.ScheduleTime = cmpOr(tk.ScheduleTime, later(time.Hour)) // never dispatch
			_, err := e.client.CreateTask(t.Context(), &cloudtaskspb.CreateTaskRequest{Parent: tt.parent, Task: tk})
			if got := status.Code(err); got != tt.want {
				t.Fatalf("code = %v (%v), want %v", got, err, tt.want)
			}
		})
	}
}

func cmpOr(a, b *timestamppb.Timestamp) *timestamppb.Timestamp {
	if a != nil {
		return a
	}
	return b
}

func TestDedupWindow(t *testing.T) {
	rec := &recorder{}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{DedupWindow: 300 * time.Millisecond}, nil, nil)
	named := func(id string, at time.Duration) *cloudtaskspb.Task {
		tk := httpTask(ts.URL, "")
		tk.Name = queueName + "/tasks/" + id
		tk.ScheduleTime = timestamppb.New(time.Now().Add(at))
		return tk
	}
	create := func(tk *cloudtaskspb.Task) error {
		_, err := e.client.CreateTask(t.Context(), &cloudtaskspb.CreateTaskRequest{Parent: queueName, Task: tk})
		return err
	}
	// Existing task.
	if err := create(named("pending", time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got := status.Code(create(named("pending", time.Hour))); got != codes.AlreadyExists {
		t.Fatalf("second create of a pending task: %v, want AlreadyExists", got)
	}
	// Deleted task.
	if err := e.client.DeleteTask(t.Context(), &cloudtaskspb.DeleteTaskRequest{Name: queueName + "/tasks/pending"}); err != nil {
		t.Fatal(err)
	}
	if got := status.Code(create(named("pending", time.Hour))); got != codes.AlreadyExists {
		t.Fatalf("create after delete: %v, want AlreadyExists", got)
	}
	// Executed task.
	if err := create(named("run", 0)); err != nil {
		t.Fatal(err)
	}
	e.waitIdle(t, 5*time.Second)
	if rec.count() != 1 {
		t.Fatalf("target got %d requests, want 1", rec.count())
	}
	if got := status.Code(create(named("run", 0))); got != codes.AlreadyExists {
		t.Fatalf("create after execution: %v, want AlreadyExists", got)
	}
	// After the window, the names are free again.
	time.Sleep(350 * time.Millisecond)
	if err := create(named("run", time.Hour)); err != nil {
		t.Fatalf("create after the window: %v", err)
	}
	if err := create(named("pending", time.Hour)); err != nil {
		t.Fatalf("create after the window: %v", err)
	}
}

func TestDispatchHeadersAndRetryCounts(t *testing.T) {
	rec := &recorder{answers: []int{404, 500, 204}}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{SubsecondBackoffs: true}, nil, fastRetry(10))
	tk := httpTask(ts.URL+"/work?a=1", `{"k":"v"}`)
	tk.Name = queueName + "/tasks/t1"
	hr := tk.GetHttpRequest()
	hr.Headers = map[string]string{"Content-Type": "application/json", "X-Mine": "yes", "User-Agent": "me", "X-CloudTasks-TaskName": "forged"}
	hr.AuthorizationHeader = &cloudtaskspb.HttpRequest_OidcToken{OidcToken: &cloudtaskspb.OidcToken{
		ServiceAccountEmail: "sa@p.iam.gserviceaccount.com", Audience: "https://worker.example",
	}}
	created := e.create(t, tk)
	e.waitIdle(t, 5*time.Second)

	if n := rec.count(); n != 3 {
		t.Fatalf("target got %d requests, want 3", n)
	}
	eta := created.GetScheduleTime().AsTime()
	wantRetry := []string{"0", "1", "2"}
	wantExec := []string{"0", "1", "1"} // the 500 does not count as an execution
	wantPrev := []string{"", "404", "500"}
	for i, req := range rec.reqs {
		h := req.Header
		checks := map[string][2]string{
			"method":                         {req.Method, "POST"},
			"path":                           {req.URL.RequestURI(), "/work?a=1"},
			"body":                           {rec.bodies[i], `{"k":"v"}`},
			"Content-Type":                   {h.Get("Content-Type"), "application/json"},
			"X-Mine":                         {h.Get("X-Mine"), "yes"},
			"User-Agent":                     {h.Get("User-Agent"), "Google-Cloud-Tasks"},
			taskstest.HeaderQueueName:        {h.Get(taskstest.HeaderQueueName), "q"},
			taskstest.HeaderTaskName:         {h.Get(taskstest.HeaderTaskName), "t1"},
			taskstest.HeaderRetryCount:       {h.Get(taskstest.HeaderRetryCount), wantRetry[i]},
			taskstest.HeaderExecutionCount:   {h.Get(taskstest.HeaderExecutionCount), wantExec[i]},
			taskstest.HeaderPreviousResponse: {h.Get(taskstest.HeaderPreviousResponse), wantPrev[i]},
		}
		for name, c := range checks {
			if c[0] != c[1] {
				t.Errorf("request %d: %s = %q, want %q", i, name, c[0], c[1])
			}
		}
		if (i > 0) != (h.Get(taskstest.HeaderRetryReason) != "") {
			t.Errorf("request %d: retry reason %q", i, h.Get(taskstest.HeaderRetryReason))
		}
		claims, err := taskstest.DecodeToken(h.Get("Authorization"))
		if err != nil {
			t.Fatalf("request %d: token: %v", i, err)
		}
		if claims.Audience != "https://worker.example" || claims.Email != "sa@p.iam.gserviceaccount.com" {
			t.Errorf("request %d: claims %+v", i, claims)
		}
		secs, err := strconv.ParseFloat(h.Get(taskstest.HeaderETA), 64)
		if err != nil {
			t.Fatalf("request %d: ETA %q: %v", i, h.Get(taskstest.HeaderETA), err)
		}
		if i == 0 && time.Duration(secs*1e9-float64(eta.UnixNano())).Abs() > time.Millisecond {
			t.Errorf("first ETA %v, want the schedule time %v", secs, eta)
		}
		if got := time.Unix(0, int64(secs*1e9)); rec.at[i].Before(got.Add(-time.Millisecond)) {
			t.Errorf("request %d arrived at %v, before its ETA %v", i, rec.at[i], got)
		}
	}
	atts := e.srv.Attempts()
	if len(atts) != 3 || atts[2].Outcome != "done" || atts[0].Outcome != "retry" {
		t.Fatalf("attempts %+v", atts)
	}
}

func TestScheduleTime(t *testing.T) {
	rec := &recorder{}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{}, nil, nil)
	due := time.Now().Add(300 * time.Millisecond)
	tk := httpTask(ts.URL, "")
	tk.ScheduleTime = timestamppb.New(due)
	e.create(t, tk)
	e.create(t, httpTask(ts.URL, "now"))
	e.waitIdle(t, 5*time.Second)
	if rec.count() != 2 {
		t.Fatalf("got %d requests", rec.count())
	}
	if rec.bodies[0] != "now" {
		t.Errorf("the task due now was not dispatched first")
	}
	if rec.at[1].Before(due) {
		t.Errorf("dispatched %v before its schedule time", due.Sub(rec.at[1]))
	}
	if late := rec.at[1].Sub(due); late > 500*time.Millisecond {
		t.Errorf("dispatched %v late", late)
	}
}

func TestDispatchDeadline(t *testing.T) {
	var cancelled atomic.Int32
	block := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
			cancelled.Add(1)
		case <-time.After(5 * time.Second):
		}
	})
	ts := serve(t, block)
	e := newEnv(t, taskstest.Options{MinDispatchDeadline: 50 * time.Millisecond, SubsecondBackoffs: true}, nil, fastRetry(2))
	tk := httpTask(ts.URL, "")
	tk.DispatchDeadline = durationpb.New(100 * time.Millisecond)
	e.create(t, tk)
	e.waitIdle(t, 5*time.Second)
	atts := e.srv.Attempts()
	if len(atts) != 2 {
		t.Fatalf("%d attempts, want 2 (max attempts)", len(atts))
	}
	for i, a := range atts {
		d := a.Responded.Sub(a.Dispatched)
		if !errors.Is(a.Err, context.DeadlineExceeded) || d < 100*time.Millisecond || d > time.Second {
			t.Errorf("attempt %d: err %v after %v, want deadline after 100ms", i, a.Err, d)
		}
	}
	if atts[1].Outcome != "gave-up" || atts[1].Header.Get(taskstest.HeaderPreviousResponse) != "" ||
		atts[1].Header.Get(taskstest.HeaderRetryReason) == "" {
		t.Errorf("second attempt: outcome %q, headers %v", atts[1].Outcome, atts[1].Header)
	}
	deadline := time.Now().Add(2 * time.Second)
	for cancelled.Load() != 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if cancelled.Load() != 2 {
		t.Errorf("the target saw %d cancelled requests, want 2", cancelled.Load())
	}
}

func TestRetryBackoffAndGiveUp(t *testing.T) {
	rec := &recorder{answers: []int{500, 500, 500, 500, 500, 500}}
	ts := serve(t, rec)
	rc := &cloudtaskspb.RetryConfig{
		MaxAttempts:  5,
		MinBackoff:   durationpb.New(40 * time.Millisecond),
		MaxBackoff:   durationpb.New(200 * time.Millisecond),
		MaxDoublings: 1,
	}
	e := newEnv(t, taskstest.Options{SubsecondBackoffs: true}, nil, rc)
	tk := httpTask(ts.URL, "")
	tk.Name = queueName + "/tasks/fail"
	e.create(t, tk)
	e.waitIdle(t, 5*time.Second)
	if rec.count() != 5 {
		t.Fatalf("target got %d requests, want max attempts 5", rec.count())
	}
	// 40 ms, doubled once to 80, then linear steps of 80: 160, then capped.
	want := []time.Duration{40, 80, 160, 200}
	for i, w := range want {
		gap := rec.at[i+1].Sub(rec.at[i])
		w *= time.Millisecond
		if gap < w || gap > w+300*time.Millisecond {
			t.Errorf("gap %d = %v, want %v", i, gap, w)
		}
	}
	_, err := e.client.GetTask(t.Context(), &cloudtaskspb.GetTaskRequest{Name: queueName + "/tasks/fail"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("GetTask after giving up: %v, want NotFound", err)
	}
	if atts := e.srv.Attempts(); atts[len(atts)-1].Outcome != "gave-up" {
		t.Errorf("last outcome %q", atts[len(atts)-1].Outcome)
	}
}

func TestMaxRetryDuration(t *testing.T) {
	rec := &recorder{answers: make([]int, 100)}
	for i := range rec.answers {
		rec.answers[i] = 500
	}
	ts := serve(t, rec)
	rc := fastRetry(2)
	rc.MaxRetryDuration = durationpb.New(300 * time.Millisecond)
	e := newEnv(t, taskstest.Options{SubsecondBackoffs: true}, nil, rc)
	e.create(t, httpTask(ts.URL, ""))
	e.waitIdle(t, 5*time.Second)
	n := rec.count()
	span := rec.at[n-1].Sub(rec.at[0])
	if n <= 2 || span < 300*time.Millisecond-50*time.Millisecond || span > time.Second {
		t.Errorf("%d attempts over %v; want more than max attempts 2, for about 300ms", n, span)
	}
}

func TestRetryAfter(t *testing.T) {
	tests := []struct {
		name   string
		status int
		cap    time.Duration
		minGap time.Duration
		maxGap time.Duration
	}{
		{"429 honoured", 429, 0, time.Second, 1500 * time.Millisecond},
		{"503 honoured", 503, 0, time.Second, 1500 * time.Millisecond},
		{"500 ignores it", 500, 0, 10 * time.Millisecond, 300 * time.Millisecond},
		{"429 capped", 429, 50 * time.Millisecond, 50 * time.Millisecond, 300 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rec := &recorder{answers: []int{tt.status, 200}, headers: []map[string]string{{"Retry-After": "1"}}}
			ts := serve(t, rec)
			e := newEnv(t, taskstest.Options{MaxRetryAfter: tt.cap, SubsecondBackoffs: true}, nil, fastRetry(5))
			e.create(t, httpTask(ts.URL, ""))
			e.waitIdle(t, 5*time.Second)
			if rec.count() != 2 {
				t.Fatalf("got %d requests, want 2", rec.count())
			}
			gap := rec.at[1].Sub(rec.at[0])
			if gap < tt.minGap || gap > tt.maxGap {
				t.Errorf("retry after %v, want within [%v, %v]", gap, tt.minGap, tt.maxGap)
			}
			if a := e.srv.Attempts()[0]; a.RetryAfter != time.Second || a.Status != tt.status {
				t.Errorf("attempt recorded %+v", a)
			}
		})
	}
}

func TestMaxConcurrentDispatches(t *testing.T) {
	rec := &recorder{hold: 60 * time.Millisecond}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{}, &cloudtaskspb.RateLimits{MaxConcurrentDispatches: 3}, nil)
	e.whilePaused(t, func() {
		for range 12 {
			e.create(t, httpTask(ts.URL, ""))
		}
	})
	e.waitIdle(t, 5*time.Second)
	if rec.count() != 12 {
		t.Fatalf("got %d requests", rec.count())
	}
	if m := rec.maxSeen.Load(); m != 3 {
		t.Errorf("max in flight = %d, want 3", m)
	}
}

func TestMaxDispatchesPerSecond(t *testing.T) {
	rec := &recorder{}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{}, &cloudtaskspb.RateLimits{MaxDispatchesPerSecond: 20}, nil)
	q, err := e.client.GetQueue(t.Context(), &cloudtaskspb.GetQueueRequest{Name: queueName})
	if err != nil {
		t.Fatal(err)
	}
	if q.GetRateLimits().GetMaxBurstSize() != 20 {
		t.Fatalf("burst %d, want 20", q.GetRateLimits().GetMaxBurstSize())
	}
	// Queue the tasks while paused, so that the bucket alone paces them.
	e.whilePaused(t, func() {
		for range 40 {
			e.create(t, httpTask(ts.URL, ""))
		}
	})
	start := time.Now()
	e.waitIdle(t, 5*time.Second)
	// A full bucket of 20, then 20 more at 20/s: about one second.
	if el := rec.at[len(rec.at)-1].Sub(start); el < 900*time.Millisecond || el > 2*time.Second {
		t.Errorf("40 dispatches took %v, want about 1s", el)
	}
	early := 0
	for _, at := range rec.at {
		if at.Sub(start) < 400*time.Millisecond {
			early++
		}
	}
	if early < 20 || early > 29 {
		t.Errorf("%d dispatches in the first 400ms, want the burst of 20 plus at most 8", early)
	}
}

func TestGetListDelete(t *testing.T) {
	e := newEnv(t, taskstest.Options{}, nil, nil)
	later := timestamppb.New(time.Now().Add(time.Hour))
	for _, id := range []string{"c", "a", "b"} {
		tk := httpTask("http://127.0.0.1:1/", "body-"+id)
		tk.Name = queueName + "/tasks/" + id
		tk.ScheduleTime = later
		e.create(t, tk)
	}
	it := e.client.ListTasks(t.Context(), &cloudtaskspb.ListTasksRequest{Parent: queueName, PageSize: 2})
	var names []string
	for {
		tk, err := it.Next()
		if errors.Is(err, iterator.Done) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(tk.GetHttpRequest().GetBody()) != 0 || tk.View != cloudtaskspb.Task_BASIC {
			t.Errorf("BASIC view of %s has body %q, view %v", tk.Name, tk.GetHttpRequest().GetBody(), tk.View)
		}
		names = append(names, tk.Name[len(queueName)+7:])
	}
	if strings.Join(names, ",") != "a,b,c" {
		t.Errorf("listed %v, want a,b,c", names)
	}
	full, err := e.client.GetTask(t.Context(), &cloudtaskspb.GetTaskRequest{Name: queueName + "/tasks/b", ResponseView: cloudtaskspb.Task_FULL})
	if err != nil || string(full.GetHttpRequest().GetBody()) != "body-b" {
		t.Fatalf("FULL GetTask: %v, %v", full, err)
	}
	if err := e.client.DeleteTask(t.Context(), &cloudtaskspb.DeleteTaskRequest{Name: queueName + "/tasks/b"}); err != nil {
		t.Fatal(err)
	}
	for _, call := range []func() error{
		func() error {
			_, err := e.client.GetTask(t.Context(), &cloudtaskspb.GetTaskRequest{Name: queueName + "/tasks/b"})
			return err
		},
		func() error {
			return e.client.DeleteTask(t.Context(), &cloudtaskspb.DeleteTaskRequest{Name: queueName + "/tasks/b"})
		},
	} {
		if err := call(); status.Code(err) != codes.NotFound {
			t.Errorf("after delete: %v, want NotFound", err)
		}
	}
	_, err = e.client.RunTask(t.Context(), &cloudtaskspb.RunTaskRequest{Name: queueName + "/tasks/a"})
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("RunTask: %v, want Unimplemented", err)
	}
	_, err = e.client.CreateQueue(t.Context(), &cloudtaskspb.CreateQueueRequest{Parent: location, Queue: &cloudtaskspb.Queue{Name: queueName}})
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("CreateQueue of an existing queue: %v, want AlreadyExists", err)
	}
}

func TestPauseResume(t *testing.T) {
	rec := &recorder{}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{}, nil, nil)
	if _, err := e.client.PauseQueue(t.Context(), &cloudtaskspb.PauseQueueRequest{Name: queueName}); err != nil {
		t.Fatal(err)
	}
	e.create(t, httpTask(ts.URL, ""))
	time.Sleep(100 * time.Millisecond)
	if rec.count() != 0 {
		t.Fatalf("a paused queue dispatched")
	}
	if _, err := e.client.ResumeQueue(t.Context(), &cloudtaskspb.ResumeQueueRequest{Name: queueName}); err != nil {
		t.Fatal(err)
	}
	e.waitIdle(t, 5*time.Second)
	if rec.count() != 1 {
		t.Fatalf("got %d requests after resume, want 1", rec.count())
	}
}

func TestCloseCancelsDispatches(t *testing.T) {
	var cancelled atomic.Bool
	started := make(chan struct{})
	ts := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-r.Context().Done()
		cancelled.Store(true)
	}))
	srv, err := taskstest.New(taskstest.Options{AutoCreateQueues: true})
	if err != nil {
		t.Fatal(err)
	}
	client, err := srv.NewClient(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.CreateTask(t.Context(), &cloudtaskspb.CreateTaskRequest{Parent: queueName, Task: httpTask(ts.URL, "")}); err != nil {
		t.Fatal(err)
	}
	<-started
	start := time.Now()
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Close took %v", d)
	}
	if err := srv.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	deadline := time.Now().Add(time.Second)
	for !cancelled.Load() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if !cancelled.Load() {
		t.Errorf("the request in flight was not cancelled")
	}
}

func TestUpdateQueue(t *testing.T) {
	e := newEnv(t, taskstest.Options{SubsecondBackoffs: true}, &cloudtaskspb.RateLimits{MaxConcurrentDispatches: 3}, fastRetry(7))
	q, err := e.client.UpdateQueue(t.Context(), &cloudtaskspb.UpdateQueueRequest{
		Queue: &cloudtaskspb.Queue{
			Name:        queueName,
			RateLimits:  &cloudtaskspb.RateLimits{MaxConcurrentDispatches: 9},
			RetryConfig: &cloudtaskspb.RetryConfig{MaxAttempts: 2},
		},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"rate_limits.max_concurrent_dispatches"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := q.GetRateLimits().GetMaxConcurrentDispatches(); got != 9 {
		t.Errorf("max concurrent dispatches %d, want 9", got)
	}
	if got := q.GetRetryConfig().GetMaxAttempts(); got != 7 {
		t.Errorf("max attempts %d, want 7 (not in the mask)", got)
	}
	if got := q.GetRetryConfig().GetMinBackoff().AsDuration(); got != 10*time.Millisecond {
		t.Errorf("min backoff %v, want the queue's 10ms", got)
	}
	_, err = e.client.UpdateQueue(t.Context(), &cloudtaskspb.UpdateQueueRequest{Queue: &cloudtaskspb.Queue{
		Name: queueName, RateLimits: &cloudtaskspb.RateLimits{MaxDispatchesPerSecond: 501},
	}})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("501 dispatches/s: %v, want InvalidArgument", err)
	}
}

// A task deleted while its attempt runs is not retried, whatever the answer.
func TestDeleteWhileRunning(t *testing.T) {
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	ts := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-release
		w.WriteHeader(http.StatusInternalServerError)
	}))
	e := newEnv(t, taskstest.Options{SubsecondBackoffs: true}, nil, fastRetry(5))
	tk := httpTask(ts.URL, "")
	// No audience: the token's audience is the URL.
	tk.GetHttpRequest().AuthorizationHeader = &cloudtaskspb.HttpRequest_OidcToken{OidcToken: &cloudtaskspb.OidcToken{ServiceAccountEmail: "sa@p"}}
	created := e.create(t, tk)
	<-started
	if err := e.client.DeleteTask(t.Context(), &cloudtaskspb.DeleteTaskRequest{Name: created.Name}); err != nil {
		t.Fatal(err)
	}
	close(release)
	deadline := time.Now().Add(2 * time.Second)
	for len(e.srv.Attempts()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // room for a wrong retry (backoff 10ms)
	atts := e.srv.Attempts()
	if len(atts) != 1 || atts[0].Outcome != "deleted" || atts[0].Status != 500 {
		t.Fatalf("attempts %+v, want one, deleted", atts)
	}
	claims, err := taskstest.DecodeToken(atts[0].Header.Get("Authorization"))
	if err != nil || claims.Audience != ts.URL || claims.Email != "sa@p" {
		t.Errorf("claims %+v, %v; want audience %s", claims, err, ts.URL)
	}
}

func TestDeleteAndPurgeQueue(t *testing.T) {
	e := newEnv(t, taskstest.Options{}, nil, nil)
	later := timestamppb.New(time.Now().Add(time.Hour))
	for _, id := range []string{"a", "b"} {
		tk := httpTask("http://127.0.0.1:1/", "")
		tk.Name = queueName + "/tasks/" + id
		tk.ScheduleTime = later
		e.create(t, tk)
	}
	if _, err := e.client.PurgeQueue(t.Context(), &cloudtaskspb.PurgeQueueRequest{Name: queueName}); err != nil {
		t.Fatal(err)
	}
	e.waitIdle(t, time.Second)
	tk := httpTask("http://127.0.0.1:1/", "")
	tk.Name = queueName + "/tasks/a"
	if _, err := e.client.CreateTask(t.Context(), &cloudtaskspb.CreateTaskRequest{Parent: queueName, Task: tk}); status.Code(err) != codes.AlreadyExists {
		t.Errorf("name of a purged task: %v, want AlreadyExists", err)
	}
	if err := e.client.DeleteQueue(t.Context(), &cloudtaskspb.DeleteQueueRequest{Name: queueName}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.client.GetQueue(t.Context(), &cloudtaskspb.GetQueueRequest{Name: queueName}); status.Code(err) != codes.NotFound {
		t.Errorf("GetQueue after delete: %v, want NotFound", err)
	}
	if _, err := e.client.CreateTask(t.Context(), &cloudtaskspb.CreateTaskRequest{Parent: queueName, Task: httpTask("http://127.0.0.1:1/", "")}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("CreateTask in a deleted queue: %v, want FailedPrecondition (its name is reserved)", err)
	}
}
