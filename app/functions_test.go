package app

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestAppBuildRecoversFromPassingFailure injects a start-up failure that
// passes: the credentials file Cloud Tasks' client needs is missing on the
// first requests and appears later. The functions answer 503 with
// Retry-After meanwhile, retry the build after a growing backoff (not on
// every request), and serve once the cause is gone.
func TestAppBuildRecoversFromPassingFailure(t *testing.T) {
	for _, k := range []string{EnvProject, EnvDatastoreEmulator, EnvMemcache, EnvValkey, "DATASTORE_PROJECT_ID"} {
		t.Setenv(k, "")
	}
	creds := filepath.Join(t.TempDir(), "credentials.json")
	t.Setenv("GOOGLE_APPLICATION_CREDENTIALS", creds)
	cfg := Config{
		Queue: "projects/p/locations/l/queues/jobs", WorkerURL: "https://worker.example/",
		TaskServiceAccount: "tasks@p.iam.gserviceaccount.com",
	}
	now := time.Unix(1_700_000_000, 0)
	builds := 0
	freshDefault(t)
	l := &lazyApp{now: func() time.Time { return now }, log: slog.New(slog.DiscardHandler), build: func() (*App, error) {
		builds++
		return New(context.Background(), cfg, slog.New(slog.DiscardHandler))
	}}
	h := serveFrom(l, (*App).Enqueue, false)
	call := func(wantStatus, wantBuilds int, wantRetryAfter string) {
		t.Helper()
		w := httptest.NewRecorder()
		h(w, httptest.NewRequest(http.MethodGet, "/", nil)) // a built Enqueue answers 405
		if w.Code != wantStatus || builds != wantBuilds || w.Header().Get("Retry-After") != wantRetryAfter {
			t.Fatalf("answer %d (Retry-After %q) after %d builds; want %d (Retry-After %q) after %d: %s",
				w.Code, w.Header().Get("Retry-After"), builds, wantStatus, wantRetryAfter, wantBuilds, w.Body)
		}
	}
	call(http.StatusServiceUnavailable, 1, "1")
	call(http.StatusServiceUnavailable, 1, "1") // within the backoff: no new build
	now = now.Add(time.Second)
	call(http.StatusServiceUnavailable, 2, "2") // retried; the backoff doubles
	if err := os.WriteFile(creds, []byte(`{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	now = now.Add(2 * time.Second)
	call(http.StatusMethodNotAllowed, 3, "") // recovered
	t.Cleanup(func() { _ = l.app.Close() })
	now = now.Add(time.Hour)
	call(http.StatusMethodNotAllowed, 3, "") // built once
}

// TestAppBuildKeepsConfigurationErrors checks that a configuration error,
// which cannot fix itself, answers 500 and is not rebuilt.
func TestAppBuildKeepsConfigurationErrors(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	builds := 0
	freshDefault(t)
	l := &lazyApp{now: func() time.Time { return now }, log: slog.New(slog.DiscardHandler), build: func() (*App, error) {
		builds++
		_, err := ConfigFromEnv(env(map[string]string{EnvLease: "soon"}))
		return nil, err
	}}
	h := serveFrom(l, (*App).Worker, true)
	for range 3 {
		w := httptest.NewRecorder()
		h(w, httptest.NewRequest(http.MethodPost, "/", nil))
		if w.Code != http.StatusInternalServerError || builds != 1 {
			t.Fatalf("answer %d after %d builds; want 500 after 1", w.Code, builds)
		}
		now = now.Add(time.Hour)
	}
}
