package app

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/taskguard/taskguard/cloudlog"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

const testQueue = "projects/test-project/locations/here/queues/jobs"

// newTestApp builds an App whose Enqueue goes to an in-process Cloud Tasks
// emulator that delivers to the App's own Worker over HTTP.
func newTestApp(t *testing.T, extra map[string]string) (*App, *httptest.Server, *taskstest.Server) {
	t.Helper()
	emu := taskstest.Start(t, taskstest.Options{SubsecondBackoffs: true})
	_, err := emu.CreateQueue(t.Context(), &cloudtaskspb.CreateQueueRequest{
		Parent: "projects/test-project/locations/here",
		Queue: &cloudtaskspb.Queue{Name: testQueue, RetryConfig: &cloudtaskspb.RetryConfig{
			MaxAttempts: -1, MinBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(time.Second),
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	vars := map[string]string{
		EnvQueue: testQueue, EnvWorkerURL: srv.URL + "/Worker", EnvTaskServiceAccount: "w@test-project.iam.gserviceaccount.com",
		EnvTasksEmulator: emu.Addr(),
	}
	for k, v := range extra {
		vars[k] = v
	}
	cfg, err := ConfigFromEnv(env(vars))
	if err != nil {
		t.Fatal(err)
	}
	freshDefault(t)
	a, err := New(t.Context(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	mux.Handle("/Worker", a.Worker())
	mux.Handle("/Enqueue", a.Enqueue())
	mux.Handle("/CleanupLocks", a.CleanupLocks())
	return a, srv, emu
}

func post(t *testing.T, url, body string) (int, map[string]any) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	raw, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("answer is not JSON: %v: %s", err, raw)
	}
	return resp.StatusCode, out
}

func TestEnqueueAnswers(t *testing.T) {
	a, srv, emu := newTestApp(t, nil)
	ran := make(chan string, 10)
	a.worker.Handle("echo", func(ctx context.Context, d *tasks.Delivery) error { ran <- d.LockID; return nil })

	code, out := post(t, srv.URL+"/Enqueue", `{"job":"echo","lockId":"user-1","payload":{"x":1}}`)
	if code != http.StatusOK || !strings.HasPrefix(out["task"].(string), testQueue+"/tasks/") {
		t.Fatalf("enqueue = %d %v; want 200 with the task name", code, out)
	}
	select {
	case id := <-ran:
		if id != "user-1" {
			t.Errorf("job ran with lock id %q", id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the enqueued task did not run")
	}

	code, out = post(t, srv.URL+"/Enqueue", `{"job":"echo","lockId":"user-1","name":"once"}`)
	if code != http.StatusOK || out["duplicate"] != nil {
		t.Fatalf("named enqueue = %d %v", code, out)
	}
	first := out["task"]
	code, out = post(t, srv.URL+"/Enqueue", `{"job":"echo","lockId":"user-1","name":"once"}`)
	if code != http.StatusOK || out["duplicate"] != true || out["task"] != first {
		t.Errorf("duplicate enqueue = %d %v; want 200, duplicate, the same task", code, out)
	}

	bad := []struct {
		name, body string
		want       int
	}{
		{"not JSON", `{"job":`, http.StatusBadRequest},
		{"unknown field", `{"job":"echo","lockId":"a","colour":"red"}`, http.StatusBadRequest},
		{"unknown job", `{"job":"nope","lockId":"a"}`, http.StatusBadRequest},
		{"empty job", `{"lockId":"a"}`, http.StatusBadRequest},
		{"empty lock id", `{"job":"echo"}`, http.StatusBadRequest},
		{"negative delay", `{"job":"echo","lockId":"a","delaySeconds":-1}`, http.StatusBadRequest},
		{"delay past 30 days", `{"job":"echo","lockId":"a","delaySeconds":2600000}`, http.StatusBadRequest},
		{"trailing data", `{"job":"echo","lockId":"a"} {}`, http.StatusBadRequest},
		{"oversized", `{"job":"echo","lockId":"a","payload":"` + strings.Repeat("x", 2<<20) + `"}`, http.StatusRequestEntityTooLarge},
	}
	for _, tc := range bad {
		if code, out := post(t, srv.URL+"/Enqueue", tc.body); code != tc.want || out["error"] == nil {
			t.Errorf("%s: %d %v; want %d with an error", tc.name, code, out, tc.want)
		}
	}
	resp, err := http.Get(srv.URL + "/Enqueue")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET /Enqueue = %d; want 405", resp.StatusCode)
	}
	if err := emu.WaitIdle(t.Context(), testQueue); err != nil {
		t.Fatal(err)
	}
}

func TestEnqueueWithoutQueue(t *testing.T) {
	freshDefault(t)
	a, err := New(t.Context(), Config{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	a.Enqueue().ServeHTTP(rec, httptest.NewRequest("POST", "/Enqueue", strings.NewReader(`{"job":"x","lockId":"y"}`)))
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), EnvQueue) {
		t.Errorf("Enqueue without a queue = %d %s; want 503 naming %s", rec.Code, rec.Body, EnvQueue)
	}
}

// TestCleanupLocks runs CleanupLocks on locks in the real Datastore
// emulator: an expired lock is deleted, a live one survives, a dry run only
// counts.
func TestCleanupLocks(t *testing.T) {
	e := dstest.New(t, dstest.Firestore)
	t.Setenv(EnvDatastoreEmulator, e.Host)
	t.Setenv("DATASTORE_PROJECT_ID", e.ProjectID)
	freshDefault(t)
	a, err := New(t.Context(), Config{CleanupGrace: time.Millisecond}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	b, ok := a.Locks().Backend(locking.Strong).(*dslock.Backend)
	if !ok {
		t.Fatalf("Strong backend is %T; want *dslock.Backend with DATASTORE_EMULATOR_HOST set", a.Locks().Backend(locking.Strong))
	}
	for _, r := range []locking.Request{
		{ID: "dead-holder", Owner: "o1", Lease: 100 * time.Millisecond},
		{ID: "live-holder", Owner: "o2", Lease: time.Hour},
	} {
		if g, err := b.Acquire(t.Context(), r); err != nil || !g.Acquired {
			t.Fatalf("acquire %s: %v %v", r.ID, g, err)
		}
	}
	time.Sleep(time.Second)

	run := func(query string) CleanupReport {
		rec := httptest.NewRecorder()
		a.CleanupLocks().ServeHTTP(rec, httptest.NewRequest("POST", "/CleanupLocks"+query, nil))
		if rec.Code != http.StatusOK {
			t.Fatalf("CleanupLocks%s = %d %s", query, rec.Code, rec.Body)
		}
		var rep CleanupReport
		if err := json.NewDecoder(bytes.NewReader(rec.Body.Bytes())).Decode(&rep); err != nil {
			t.Fatal(err)
		}
		return rep
	}
	if rep := run("?dryRun=true"); !rep.DryRun || rep.Expired != 1 || rep.Deleted != 0 || !rep.Finished || rep.Backend != "datastore" {
		t.Errorf("dry run report = %+v; want 1 expired, 0 deleted, finished", rep)
	}
	if rep := run(""); rep.Deleted != 1 || !rep.Finished {
		t.Errorf("cleanup report = %+v; want 1 deleted, finished", rep)
	}
	if g, _ := b.Acquire(t.Context(), locking.Request{ID: "live-holder", Owner: "o3", Lease: time.Second}); g.Acquired {
		t.Errorf("cleanup deleted a live lock")
	}
	if g, _ := b.Acquire(t.Context(), locking.Request{ID: "dead-holder", Owner: "o3", Lease: time.Second}); !g.Acquired || g.TookOver {
		t.Errorf("after cleanup the dead holder's lock = %+v; want free (deleted, not taken over)", g)
	}
}

// TestWorkerLogsCarryTrace checks that the Worker's log lines are
// correlated with the request's trace in Cloud Logging and carry the task.
func TestWorkerLogsCarryTrace(t *testing.T) {
	var buf bytes.Buffer
	freshDefault(t)
	a, err := New(t.Context(), Config{ProjectID: "p1"}, slog.New(cloudlog.NewHandler(&buf, slog.LevelInfo, "p1")))
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest("POST", "/Worker", strings.NewReader("not an envelope"))
	req.Header.Set("X-CloudTasks-TaskName", "task-1")
	req.Header.Set("X-CloudTasks-QueueName", "jobs")
	req.Header.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	buf.Reset() // drop the client's start-up line
	rec := httptest.NewRecorder()
	a.Worker().ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("malformed envelope answered %d; want 200 (dropped)", rec.Code)
	}
	var line map[string]any
	if err := json.Unmarshal(bytes.TrimSpace(buf.Bytes()), &line); err != nil {
		t.Fatalf("want one JSON log line: %v: %s", err, buf.String())
	}
	if line["severity"] != "ERROR" || line["task"] != "task-1" || line[cloudlog.TraceKey] != "projects/p1/traces/4bf92f3577b34da6a3ce929d0e0e4736" {
		t.Errorf("log line = %v; want ERROR with the task and the trace", line)
	}
}

// TestCleanupLocksFlagsFailClosed checks that a safety flag that is
// misspelt, repeated or not a boolean is refused with 400 before anything is
// deleted, and that every spelling of a true boolean makes a dry run.
func TestCleanupLocksFlagsFailClosed(t *testing.T) {
	e := dstest.New(t, dstest.Firestore)
	t.Setenv(EnvDatastoreEmulator, e.Host)
	t.Setenv("DATASTORE_PROJECT_ID", e.ProjectID)
	freshDefault(t)
	a, err := New(t.Context(), Config{CleanupGrace: time.Millisecond}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	b := a.Locks().Backend(locking.Strong).(*dslock.Backend)
	if g, err := b.Acquire(t.Context(), locking.Request{ID: "expired", Owner: "o1", Lease: 50 * time.Millisecond}); err != nil || !g.Acquired {
		t.Fatalf("acquire: %v %v", g, err)
	}
	time.Sleep(500 * time.Millisecond)
	stillThere := func(t *testing.T) {
		t.Helper()
		if _, err := b.Inspect(t.Context(), "expired"); err != nil {
			t.Fatalf("the expired lock was deleted: %v", err)
		}
	}
	call := func(query string) (int, CleanupReport, string) {
		rec := httptest.NewRecorder()
		r := httptest.NewRequest("POST", "/CleanupLocks", nil)
		r.URL.RawQuery = query
		a.CleanupLocks().ServeHTTP(rec, r)
		var rep CleanupReport
		_ = json.Unmarshal(rec.Body.Bytes(), &rep)
		return rec.Code, rep, rec.Body.String()
	}
	for _, q := range []string{"dryRun=yes", "dryRun=", "dryRun", "dryRun=on", "dryrun=true", "dry-run=true", "dryRun=true&dryRun=false",
		"dryRun=true&force=1", "dryRun=%E2%80", "dryRun=true;x", "dryRun=%zz"} {
		t.Run("refused "+q, func(t *testing.T) {
			code, _, body := call(q)
			if code != http.StatusBadRequest {
				t.Errorf("?%s answered %d %s; want 400", q, code, body)
			}
			stillThere(t)
		})
	}
	for _, q := range []string{"dryRun=1", "dryRun=TRUE", "dryRun=True", "dryRun=t", "dryRun=true"} {
		t.Run("dry run "+q, func(t *testing.T) {
			code, rep, body := call(q)
			if code != http.StatusOK || !rep.DryRun || rep.Expired != 1 || rep.Deleted != 0 {
				t.Errorf("?%s answered %d %s; want 200, a dry run counting 1 expired", q, code, body)
			}
			stillThere(t)
		})
	}
	if code, rep, body := call("dryRun=false"); code != http.StatusOK || rep.DryRun || rep.Deleted != 1 {
		t.Errorf("?dryRun=false answered %d %s; want 200, 1 deleted", code, body)
	}
}

// fakeCleaner answers CleanupLocks' call with a fixed report and error.
type fakeCleaner struct {
	rep dslock.Report
	err error
}

func (f fakeCleaner) Cleanup(context.Context, dslock.CleanupOptions) (dslock.Report, error) {
	return f.rep, f.err
}
func (fakeCleaner) Close() error { return nil }

// TestCleanupLocksErrors checks the status of a run by what went wrong:
// the budget alone running out is 200 (the next run goes on); page errors
// are 500 with the errors in the report, also when the budget ran out too.
func TestCleanupLocksErrors(t *testing.T) {
	budget := fmt.Errorf("dslock: cleanup: %w", context.DeadlineExceeded)
	page := errors.New("dslock: cleanup: delete: rpc error: code = PermissionDenied desc = no")
	cases := []struct {
		name string
		rep  dslock.Report
		err  error
		want int
	}{
		{"finished", dslock.Report{Scanned: 10, Deleted: 10, Finished: true}, nil, http.StatusOK},
		{"budget ran out", dslock.Report{Scanned: 500, Deleted: 300, Unknown: 200}, errors.Join(budget), http.StatusOK},
		{"page errors, finished", dslock.Report{Scanned: 500, Errors: 500, Finished: true}, errors.Join(page), http.StatusInternalServerError},
		{"page errors and budget ran out", dslock.Report{Scanned: 1000, Deleted: 500, Errors: 500}, errors.Join(page, budget), http.StatusInternalServerError},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a, _ := badInputApp(t, false)
			a.cleaner = fakeCleaner{tc.rep, tc.err}
			rec := httptest.NewRecorder()
			a.CleanupLocks().ServeHTTP(rec, httptest.NewRequest("POST", "/CleanupLocks", nil))
			var rep CleanupReport
			if err := json.Unmarshal(rec.Body.Bytes(), &rep); err != nil {
				t.Fatal(err)
			}
			if rec.Code != tc.want || rep.Errors != tc.rep.Errors || rep.Unknown != tc.rep.Unknown {
				t.Errorf("answered %d %+v; want %d with the report's counts", rec.Code, rep, tc.want)
			}
			if tc.want == http.StatusInternalServerError && !strings.Contains(rep.Error, "PermissionDenied") {
				t.Errorf("500 report's error = %q; want the page errors", rep.Error)
			}
		})
	}
}
