package taskstest_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/taskguard/taskguard/tasks/taskstest"
)

// The tests in this file pin behaviours of the managed service that the
// emulator once left out or got wrong.

// A schedule_time in the past is set to now, and the dispatch's
// X-CloudTasks-TaskETA carries that time, not the stale one.
func TestPastScheduleTimeBecomesNow(t *testing.T) {
	rec := &recorder{}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{}, nil, nil)
	tk := httpTask(ts.URL, "")
	tk.ScheduleTime = timestamppb.New(time.Now().Add(-time.Hour))
	before := time.Now().Truncate(time.Microsecond)
	created := e.create(t, tk)
	if got := created.GetScheduleTime().AsTime(); got.Before(before) {
		t.Errorf("schedule_time %v, want now (not before %v)", got, before)
	}
	e.waitIdle(t, 5*time.Second)
	if rec.count() != 1 {
		t.Fatalf("got %d requests, want 1", rec.count())
	}
	secs, err := strconv.ParseFloat(rec.reqs[0].Header.Get(taskstest.HeaderETA), 64)
	if err != nil {
		t.Fatal(err)
	}
	if eta := time.UnixMicro(int64(secs * 1e6)); eta.Before(before.Add(-time.Millisecond)) {
		t.Errorf("%s = %v, %v before the task was created", taskstest.HeaderETA, eta, before.Sub(eta))
	}
}

// A deleted queue's name cannot be reused for the reuse delay (7 days by
// default): creating it again fails with FAILED_PRECONDITION, and so does
// adding a task to it.
func TestDeletedQueueNameIsReserved(t *testing.T) {
	for _, delay := range []time.Duration{0, 200 * time.Millisecond} {
		t.Run("delay "+delay.String(), func(t *testing.T) {
			e := newEnv(t, taskstest.Options{QueueReuseDelay: delay}, nil, nil)
			if err := e.client.DeleteQueue(t.Context(), &cloudtaskspb.DeleteQueueRequest{Name: queueName}); err != nil {
				t.Fatal(err)
			}
			create := func() error {
				_, err := e.client.CreateQueue(t.Context(), &cloudtaskspb.CreateQueueRequest{Parent: location, Queue: &cloudtaskspb.Queue{Name: queueName}})
				return err
			}
			calls := map[string]func() error{
				"CreateQueue": create,
				"UpdateQueue": func() error {
					_, err := e.client.UpdateQueue(t.Context(), &cloudtaskspb.UpdateQueueRequest{Queue: &cloudtaskspb.Queue{Name: queueName}})
					return err
				},
				"CreateTask": func() error {
					_, err := e.client.CreateTask(t.Context(), &cloudtaskspb.CreateTaskRequest{Parent: queueName, Task: httpTask("http://127.0.0.1:1/", "")})
					return err
				},
			}
			for name, call := range calls {
				if err := call(); status.Code(err) != codes.FailedPrecondition {
					t.Errorf("%s of a just-deleted queue: %v, want FailedPrecondition", name, err)
				}
			}
			if _, err := e.client.GetQueue(t.Context(), &cloudtaskspb.GetQueueRequest{Name: queueName}); status.Code(err) != codes.NotFound {
				t.Errorf("GetQueue of a deleted queue: %v, want NotFound", err)
			}
			if delay == 0 {
				return
			}
			time.Sleep(delay + 50*time.Millisecond)
			if err := create(); err != nil {
				t.Errorf("CreateQueue after the reuse delay: %v", err)
			}
		})
	}
}

// max_burst_size is output only: 100 for a default queue (500 dispatches/s),
// as the service's own sample shows; never more than the rate.
func TestMaxBurstSize(t *testing.T) {
	for _, tt := range []struct {
		rate float64
		want int32
	}{{0, 100}, {500, 100}, {50, 50}, {20, 20}, {0.5, 1}} {
		t.Run(strconv.FormatFloat(tt.rate, 'g', -1, 64), func(t *testing.T) {
			e := newEnv(t, taskstest.Options{}, &cloudtaskspb.RateLimits{MaxDispatchesPerSecond: tt.rate, MaxBurstSize: 7}, nil)
			q, err := e.client.GetQueue(t.Context(), &cloudtaskspb.GetQueueRequest{Name: queueName})
			if err != nil {
				t.Fatal(err)
			}
			if got := q.GetRateLimits().GetMaxBurstSize(); got != tt.want {
				t.Errorf("max_burst_size %d, want %d", got, tt.want)
			}
		})
	}
}

// A URL with a bad %-escape is not refused: the service encodes the stray
// '%' as %25 and delivers to the encoded URL.
func TestBadPercentEscapeIsEncoded(t *testing.T) {
	rec := &recorder{}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{}, nil, nil)
	created := e.create(t, httpTask(ts.URL+"/a%zz/b%2Fc?q=%g1&r=%41%", ""))
	want := "/a%25zz/b%2Fc?q=%25g1&r=%41%25"
	if got := created.GetHttpRequest().GetUrl(); got != ts.URL+want {
		t.Errorf("stored url %q, want %q", got, ts.URL+want)
	}
	e.waitIdle(t, 5*time.Second)
	if rec.count() != 1 {
		t.Fatalf("got %d requests, want 1", rec.count())
	}
	if got := rec.reqs[0].RequestURI; got != want {
		t.Errorf("request URI %q, want %q", got, want)
	}
}

// An oauth_token setting becomes "Authorization: Bearer <access token>", a
// fake token that names the service account and the scope (cloud-platform
// when unset).
func TestOAuthToken(t *testing.T) {
	rec := &recorder{}
	ts := serve(t, rec)
	e := newEnv(t, taskstest.Options{}, nil, nil)
	for _, scope := range []string{"", "https://www.googleapis.com/auth/datastore"} {
		tk := httpTask(ts.URL, scope)
		tk.GetHttpRequest().AuthorizationHeader = &cloudtaskspb.HttpRequest_OauthToken{OauthToken: &cloudtaskspb.OAuthToken{
			ServiceAccountEmail: "sa@p.iam.gserviceaccount.com", Scope: scope,
		}}
		e.create(t, tk)
	}
	bad := httpTask(ts.URL, "")
	bad.GetHttpRequest().AuthorizationHeader = &cloudtaskspb.HttpRequest_OauthToken{OauthToken: &cloudtaskspb.OAuthToken{}}
	if _, err := e.client.CreateTask(t.Context(), &cloudtaskspb.CreateTaskRequest{Parent: queueName, Task: bad}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("oauth_token without an account: %v, want InvalidArgument", err)
	}
	e.waitIdle(t, 5*time.Second)
	if rec.count() != 2 {
		t.Fatalf("got %d requests, want 2", rec.count())
	}
	for i, req := range rec.reqs {
		c, err := taskstest.DecodeAccessToken(req.Header.Get("Authorization"))
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		want := rec.bodies[i]
		if want == "" {
			want = "https://www.googleapis.com/auth/cloud-platform"
		}
		if c.Email != "sa@p.iam.gserviceaccount.com" || c.Scope != want {
			t.Errorf("request %d: token claims %+v, want scope %s", i, c, want)
		}
		if _, err := taskstest.DecodeToken(req.Header.Get("Authorization")); err == nil {
			t.Errorf("request %d: an access token decodes as an OIDC token", i)
		}
	}
}

// Backoffs and the retry duration are truncated to whole seconds, in what
// the queue reports and in when it retries, unless SubsecondBackoffs is set.
func TestBackoffsTruncatedToSeconds(t *testing.T) {
	ms := time.Millisecond
	rc := &cloudtaskspb.RetryConfig{
		MaxAttempts:      2,
		MinBackoff:       durationpb.New(1500 * ms),
		MaxBackoff:       durationpb.New(2700 * ms),
		MaxRetryDuration: durationpb.New(3900 * ms),
		MaxDoublings:     1,
	}
	for _, tt := range []struct {
		subsecond          bool
		min, max, duration time.Duration
	}{
		{false, time.Second, 2 * time.Second, 3 * time.Second},
		{true, 1500 * ms, 2700 * ms, 3900 * ms},
	} {
		t.Run("subsecond="+strconv.FormatBool(tt.subsecond), func(t *testing.T) {
			rec := &recorder{answers: []int{500, 500}}
			ts := serve(t, rec)
			e := newEnv(t, taskstest.Options{SubsecondBackoffs: tt.subsecond}, nil, rc)
			q, err := e.client.GetQueue(t.Context(), &cloudtaskspb.GetQueueRequest{Name: queueName})
			if err != nil {
				t.Fatal(err)
			}
			got := q.GetRetryConfig()
			if got.GetMinBackoff().AsDuration() != tt.min || got.GetMaxBackoff().AsDuration() != tt.max ||
				got.GetMaxRetryDuration().AsDuration() != tt.duration {
				t.Errorf("retry config %v, want backoff %v to %v, duration %v", got, tt.min, tt.max, tt.duration)
			}
			// A task's own retry config is truncated the same way.
			tk := httpTask(ts.URL, "")
			tk.RetryConfig = &cloudtaskspb.RetryConfig{MaxAttempts: 2, MinBackoff: rc.MinBackoff, MaxBackoff: rc.MaxBackoff}
			e.create(t, tk)
			e.waitIdle(t, 10*time.Second)
			a := e.srv.Attempts()
			if len(a) != 2 || a[0].Outcome != "retry" {
				t.Fatalf("attempts %+v, want a retry", a)
			}
			if d := a[0].NextAttempt.Sub(a[0].Responded); d != tt.min {
				t.Errorf("first retry scheduled %v after the answer, want %v", d, tt.min)
			}
		})
	}
}

// After 429 and 503 answers the whole queue dispatches more slowly, until
// the errors stop; the queue's settings do not change.
func TestSystemThrottling(t *testing.T) {
	for _, off := range []bool{false, true} {
		t.Run("off="+strconv.FormatBool(off), func(t *testing.T) {
			busy := &recorder{answers: []int{429, 503, 429, 429}}
			tsBusy := serve(t, busy)
			rec := &recorder{}
			ts := serve(t, rec)
			rc := &cloudtaskspb.RetryConfig{MaxAttempts: 4, MinBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(10 * time.Millisecond)}
			e := newEnv(t, taskstest.Options{SubsecondBackoffs: true, NoSystemThrottling: off},
				&cloudtaskspb.RateLimits{MaxDispatchesPerSecond: 100}, rc)
			if r := e.srv.DispatchRate(queueName); r != 100 {
				t.Fatalf("dispatch rate before any error %v, want 100", r)
			}
			e.create(t, httpTask(tsBusy.URL, ""))
			e.waitIdle(t, 5*time.Second)
			// Four answers of 429 or 503: 100/s halved four times.
			want := 100.0 / 16
			if off {
				want = 100
			}
			rate := e.srv.DispatchRate(queueName)
			if rate > want || rate < want/2 {
				t.Errorf("dispatch rate just after four 429/503 answers %v, want %v", rate, want)
			}
			q, err := e.client.GetQueue(t.Context(), &cloudtaskspb.GetQueueRequest{Name: queueName})
			if err != nil || q.GetRateLimits().GetMaxDispatchesPerSecond() != 100 {
				t.Errorf("the queue's settings changed: %v, %v", q.GetRateLimits(), err)
			}
			// Tasks on an unrelated target are paced by the lowered rate: no
			// burst, each dispatch at least 1/rate after the one before.
			const n = 5
			e.whilePaused(t, func() {
				for range n {
					e.create(t, httpTask(ts.URL, ""))
				}
			})
			e.waitIdle(t, 10*time.Second)
			if rec.count() != n {
				t.Fatalf("got %d requests, want %d", rec.count(), n)
			}
			if !off {
				for i := 1; i < n; i++ {
					if gap := rec.at[i].Sub(rec.at[i-1]); gap < time.Duration(float64(time.Second)/want/4) {
						t.Errorf("dispatch %d came %v after the one before; the throttled rate allows one per %v",
							i, gap, time.Duration(float64(time.Second)/want))
					}
				}
			}
			// Once the errors stop, the rate comes back: doubled each second.
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			for e.srv.DispatchRate(queueName) != 100 {
				select {
				case <-ctx.Done():
					t.Fatalf("rate %v 10 s after the last error, want 100 again", e.srv.DispatchRate(queueName))
				case <-time.After(50 * time.Millisecond):
				}
			}
		})
	}
}
