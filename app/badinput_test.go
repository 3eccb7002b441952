package app

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/tasks"
)

// records counts log records; safe for concurrent use.
type records struct {
	mu sync.Mutex
	n  map[slog.Level]int
}

// Enabled drops debug records: the functions log at info and above.
func (r *records) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n[rec.Level]++
	return nil
}
func (r *records) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *records) WithGroup(string) slog.Handler      { return r }

func (r *records) take() (total int, byLevel map[slog.Level]int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	byLevel = r.n
	for _, n := range byLevel {
		total += n
	}
	r.n = make(map[slog.Level]int)
	return total, byLevel
}

// badInputApp builds the functions on in-memory locks, with Enqueue pointed
// at a Cloud Tasks endpoint nothing listens on (every request below is
// refused before any RPC).
func badInputApp(t *testing.T, queue bool) (*App, *records) {
	t.Helper()
	for _, k := range []string{EnvProject, EnvDatastoreEmulator, EnvMemcache, EnvValkey, "DATASTORE_PROJECT_ID"} {
		t.Setenv(k, "")
	}
	cfg := Config{}
	if queue {
		cfg.Queue = "projects/p/locations/l/queues/jobs"
		cfg.WorkerURL = "https://worker.example/"
		cfg.TaskServiceAccount = "tasks@p.iam.gserviceaccount.com"
		cfg.TasksEmulator = "127.0.0.1:1"
	}
	rec := &records{n: make(map[slog.Level]int)}
	freshDefault(t)
	a, err := New(t.Context(), cfg, slog.New(rec))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	a.worker.Handle("job", func(ctx context.Context, d *tasks.Delivery) error { return nil })
	rec.take() // what New logged about its configuration
	return a, rec
}

// TestBadRequests feeds the three functions malformed, oversized,
// wrong-method and unauthenticated-looking requests. Each gets the answer
// its handler documents, is logged at most once (exactly once where the
// handler documents a log line), never panics, and leaves no lock held.
func TestBadRequests(t *testing.T) {
	huge := strings.Repeat("x", tasks.MaxTaskSize+128<<10)
	validEnv := `{"v":1,"job":"job","lockId":"bad-input"}`
	cloudTasks := map[string]string{"X-CloudTasks-TaskName": "t1", "X-CloudTasks-QueueName": "jobs"}
	bearer := map[string]string{"Authorization": "Bearer not-a-token"}
	merge := func(ms ...map[string]string) map[string]string {
		out := map[string]string{}
		for _, m := range ms {
			for k, v := range m {
				out[k] = v
			}
		}
		return out
	}
	cases := []struct {
		name     string
		fn       string // worker, enqueue, cleanup
		noQueue  bool
		method   string
		body     string
		headers  map[string]string
		want     int
		wantLogs int // -1: at most one
	}{
		{"worker: no Cloud Tasks headers", "worker", false, "POST", validEnv, bearer, tasks.StatusRejected, 1},
		{"worker: wrong queue", "worker", false, "POST", validEnv, merge(cloudTasks, map[string]string{"X-CloudTasks-QueueName": "evil"}), tasks.StatusRejected, 1},
		{"worker: wrong method", "worker", false, "GET", "", cloudTasks, tasks.StatusDropped, 1},
		{"worker: not JSON", "worker", false, "POST", "{{{", cloudTasks, tasks.StatusDropped, 1},
		{"worker: binary", "worker", false, "POST", "\x00\xff\xfe", cloudTasks, tasks.StatusDropped, 1},
		{"worker: empty body", "worker", false, "POST", "", cloudTasks, tasks.StatusDropped, 1},
		{"worker: oversized", "worker", false, "POST", huge, cloudTasks, tasks.StatusDropped, 1},
		{"worker: unknown job", "worker", false, "POST", `{"v":1,"job":"nope","lockId":"bad-input"}`, cloudTasks, tasks.StatusDropped, 1},
		{"worker: newer envelope", "worker", false, "POST", `{"v":7,"job":"job","lockId":"bad-input"}`, cloudTasks, tasks.StatusRetry, 1},
		{"worker: garbage headers", "worker", false, "POST", validEnv, merge(cloudTasks, map[string]string{"X-CloudTasks-TaskRetryCount": "-99999999999999999999", "X-CloudTasks-TaskETA": "NaN.x"}), tasks.StatusDone, 0},
		{"enqueue: wrong method", "enqueue", false, "GET", "", bearer, http.StatusMethodNotAllowed, -1},
		{"enqueue: not JSON", "enqueue", false, "POST", "not json", bearer, http.StatusBadRequest, -1},
		{"enqueue: unknown field", "enqueue", false, "POST", `{"job":"job","lockId":"x","admin":true}`, nil, http.StatusBadRequest, -1},
		{"enqueue: trailing data", "enqueue", false, "POST", `{"job":"job","lockId":"x"} {}`, nil, http.StatusBadRequest, -1},
		{"enqueue: unknown job", "enqueue", false, "POST", `{"job":"nope","lockId":"x"}`, nil, http.StatusBadRequest, -1},
		{"enqueue: negative delay", "enqueue", false, "POST", `{"job":"job","lockId":"x","delaySeconds":-1}`, nil, http.StatusBadRequest, -1},
		{"enqueue: delay too long", "enqueue", false, "POST", `{"job":"job","lockId":"x","delaySeconds":1e300}`, nil, http.StatusBadRequest, -1},
		{"enqueue: no lock id", "enqueue", false, "POST", `{"job":"job"}`, nil, http.StatusBadRequest, -1},
		{"enqueue: oversized", "enqueue", false, "POST", `{"job":"job","lockId":"x","payload":"` + huge + `"}`, nil, http.StatusRequestEntityTooLarge, -1},
		{"enqueue: no queue configured", "enqueue", true, "POST", `{"job":"job","lockId":"x"}`, nil, http.StatusServiceUnavailable, 1},
		{"cleanup: wrong method", "cleanup", false, "DELETE", "", bearer, http.StatusMethodNotAllowed, -1},
		{"cleanup: junk body", "cleanup", false, "POST", "\x00junk", bearer, http.StatusOK, -1},
		{"cleanup: junk query", "cleanup", false, "POST", "", bearer, http.StatusBadRequest, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a, logs := badInputApp(t, !tc.noQueue)
			h := map[string]http.Handler{"worker": a.Worker(), "enqueue": a.Enqueue(), "cleanup": a.CleanupLocks()}[tc.fn]
			target := "/?"
			if strings.HasPrefix(tc.name, "cleanup: junk query") {
				target = "/?dryRun=%E2%80&x=\x7f"
			}
			r := httptest.NewRequest(tc.method, "/", bytes.NewReader([]byte(tc.body)))
			r.URL.RawQuery = strings.TrimPrefix(target, "/?")
			for k, v := range tc.headers {
				r.Header.Set(k, v)
			}
			w := httptest.NewRecorder()
			func() {
				defer func() {
					if p := recover(); p != nil {
						t.Fatalf("handler panicked: %v", p)
					}
				}()
				h.ServeHTTP(w, r)
			}()
			if w.Code != tc.want {
				t.Errorf("status %d; want %d (body %q)", w.Code, tc.want, truncate(w.Body.String()))
			}
			if w.Code == http.StatusMethodNotAllowed && w.Header().Get("Allow") == "" {
				t.Error("405 without an Allow header")
			}
			n, levels := logs.take()
			switch {
			case tc.wantLogs >= 0 && n != tc.wantLogs:
				t.Errorf("%d log records (%v); want %d", n, levels, tc.wantLogs)
			case tc.wantLogs < 0 && n > 1:
				t.Errorf("%d log records (%v); want at most one", n, levels)
			}
			for _, id := range []string{"bad-input", "x"} {
				l, err := a.Locks().Acquire(t.Context(), id, locking.Wait(false), locking.Lease(time.Minute))
				if err != nil {
					t.Errorf("lock %q left held: %v", id, err)
					continue
				}
				_ = l.Release(t.Context())
			}
		})
	}
}

// TestWorkerSlowBody checks that a client that stops sending its body half
// way does not leave a lock held: the body is read before any lock is taken.
func TestWorkerSlowBody(t *testing.T) {
	a, _ := badInputApp(t, false)
	pr, pw := io.Pipe()
	r := httptest.NewRequest(http.MethodPost, "/", pr)
	r.Header.Set("X-CloudTasks-TaskName", "t1")
	r.Header.Set("X-CloudTasks-QueueName", "jobs")
	go func() {
		_, _ = pw.Write([]byte(`{"v":1,"job":"job","lockId":"bad-input"`))
		_ = pw.CloseWithError(io.ErrUnexpectedEOF)
	}()
	w := httptest.NewRecorder()
	a.Worker().ServeHTTP(w, r)
	if w.Code != tasks.StatusRetry {
		t.Errorf("status %d for a body cut short; want %d (retry)", w.Code, tasks.StatusRetry)
	}
	l, err := a.Locks().Acquire(t.Context(), "bad-input", locking.Wait(false))
	if err != nil {
		t.Fatalf("lock left held: %v", err)
	}
	_ = l.Release(t.Context())
}

func truncate(s string) string {
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}

// TestEnqueueRefusesIdentitiesJSONCannotCarry posts job names, lock ids and
// dedup names that JSON decoding would change (invalid UTF-8 bytes, unpaired
// surrogate escapes): each is refused with 400 quoting it, before any task
// is created.
func TestEnqueueRefusesIdentitiesJSONCannotCarry(t *testing.T) {
	a, _ := badInputApp(t, true)
	a.worker.Handle("\uFFFD", func(context.Context, *tasks.Delivery) error { return nil })
	for _, tc := range []struct{ body, quoted string }{
		{"{\"job\":\"job\",\"lockId\":\"user-\xff42\"}", `"user-\xff42"`},
		{"{\"job\":\"job\",\"lockId\":\"\xfe\"}", `"\xfe"`},
		{"{\"job\":\"resize-\xe9\",\"lockId\":\"x\"}", `"resize-\xe9"`},
		{"{\"job\":\"job\",\"lockId\":\"x\",\"name\":\"\xff\"}", `"\xff"`},
		{`{"job":"job","lockId":"user-\ud800"}`, `user-\ud800`},
		{`{"job":"\udfff","lockId":"x"}`, `\udfff`},
	} {
		w := httptest.NewRecorder()
		a.Enqueue().ServeHTTP(w, httptest.NewRequest(http.MethodPost, "/", strings.NewReader(tc.body)))
		var out struct{ Error string }
		_ = json.Unmarshal(w.Body.Bytes(), &out)
		if w.Code != http.StatusBadRequest || !strings.Contains(out.Error, tc.quoted) {
			t.Errorf("body %q: %d %q; want 400 naming %s", tc.body, w.Code, out.Error, tc.quoted)
		}
	}
}

// TestWithJobRefusesNamesJSONCannotCarry checks that a job no task could
// name byte for byte is refused where it is registered.
func TestWithJobRefusesNamesJSONCannotCarry(t *testing.T) {
	defer func() {
		if p := recover(); p == nil || !strings.Contains(fmt.Sprint(p), `"resize-\xe9"`) {
			t.Errorf("WithJob(\"resize-\\xe9\") panicked with %v; want a panic quoting the name", p)
		}
	}()
	WithJob("resize-\xe9", func(context.Context, *tasks.Delivery) error { return nil })
}

// TestStalledBodyEndsWithTheRequest sends the headers and part of a body over
// a real connection, then stalls, to Worker and Enqueue behind a server that
// gives each request a 300 ms deadline. Each handler stops reading when the
// deadline passes and answers (Worker 503 retry, Enqueue 408) while the
// client still holds the connection open; no lock is left held.
func TestStalledBodyEndsWithTheRequest(t *testing.T) {
	a, _ := badInputApp(t, true)
	for _, tc := range []struct {
		fn   string
		h    http.Handler
		want int
	}{
		{"Worker", a.Worker(), tasks.StatusRetry},
		{"Enqueue", a.Enqueue(), http.StatusRequestTimeout},
	} {
		t.Run(tc.fn, func(t *testing.T) {
			returned := make(chan struct{})
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				defer close(returned)
				ctx, cancel := context.WithTimeout(r.Context(), 300*time.Millisecond)
				defer cancel()
				tc.h.ServeHTTP(w, r.WithContext(ctx))
			}))
			t.Cleanup(srv.Close)
			conn, err := net.Dial("tcp", srv.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			part := `{"v":1,"job":"job","lockId":"bad-input"`
			fmt.Fprintf(conn, "POST /%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"+
				"X-CloudTasks-TaskName: t1\r\nX-CloudTasks-QueueName: jobs\r\n\r\n%s", tc.fn, part)
			// The client stalls; it never closes the connection before the
			// handler answers. A handler still reading after 20 s is blocked.
			select {
			case <-returned:
			case <-time.After(20 * time.Second):
				t.Fatal("the handler is still reading a stalled body 20 s after its 300 ms deadline")
			}
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			_ = resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Errorf("status %d; want %d", resp.StatusCode, tc.want)
			}
			l, err := a.Locks().Acquire(t.Context(), "bad-input", locking.Wait(false))
			if err != nil {
				t.Fatalf("lock left held: %v", err)
			}
			_ = l.Release(t.Context())
		})
	}
}
