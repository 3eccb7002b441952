package app

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/tasks"
)

// TestUserCodeAndWorkerShareLocks is the reproduction of a shop's Checkout
// that held customer-z (token 1) while the functions' Worker ran a
// customer-z task with token 1 too: the App had built a second in-memory
// store. Now the user's code (locking.With, the default client) and the
// deployed Worker exclude each other: the task is turned away while
// Checkout holds the lock (parked, 202, by default; 429 in 429 mode), and
// runs after it with a greater token.
func TestUserCodeAndWorkerShareLocks(t *testing.T) {
	for _, busy := range []string{BusyPark, Busy429} {
		t.Run(busy, func(t *testing.T) { testUserCodeAndWorkerShareLocks(t, busy) })
	}
}

func testUserCodeAndWorkerShareLocks(t *testing.T, busy string) {
	turnedAway := http.StatusTooManyRequests
	if busy == BusyPark {
		turnedAway = tasks.StatusParked
	}
	for _, k := range []string{EnvProject, EnvDatastoreEmulator, EnvMemcache, EnvValkey, "DATASTORE_PROJECT_ID", "K_SERVICE"} {
		t.Setenv(k, "")
	}
	freshDefault(t)
	var (
		mu     sync.Mutex
		tokens []uint64
	)
	a, srv, emu := newTestApp(t, map[string]string{EnvBusy: busy})
	a.worker.Handle("charge", func(ctx context.Context, d *tasks.Delivery) error {
		mu.Lock()
		defer mu.Unlock()
		tokens = append(tokens, d.Token)
		return nil
	}, tasks.LockOptions(locking.Lease(time.Second)))

	checkout := func(ctx context.Context) error {
		held := locking.FromContext(ctx).Token()
		if code, out := post(t, srv.URL+"/Enqueue", `{"job":"charge","lockId":"customer-z"}`); code != http.StatusOK {
			t.Fatalf("enqueue: %d %v", code, out)
		}
		// Hold the lock until the Worker has been turned away once.
		for {
			for _, at := range emu.Attempts() {
				if at.Status == turnedAway {
					mu.Lock()
					defer mu.Unlock()
					if len(tokens) > 0 {
						t.Errorf("the Worker ran customer-z (token %v) while Checkout held it (token %d)", tokens, held)
					}
					return nil
				}
				if at.Status != 0 {
					t.Errorf("the Worker answered %d while Checkout held customer-z (token %d); want %d", at.Status, held, turnedAway)
					return nil
				}
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	var userToken uint64
	err := locking.With(t.Context(), "customer-z", func(ctx context.Context) error {
		userToken = locking.FromContext(ctx).Token()
		return checkout(ctx)
	}, locking.Lease(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if err := emu.WaitIdle(t.Context(), testQueue); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(tokens) != 1 || tokens[0] <= userToken {
		t.Errorf("Worker ran with tokens %v after Checkout's %d; want one run with a greater token", tokens, userToken)
	}
}

// TestNewRefusesMemoryOnCloudRun: on Cloud Run settings with no
// Datastore, building the functions fails with the error that names the
// fix, and the served functions answer 500 without rebuilding.
func TestNewRefusesMemoryOnCloudRun(t *testing.T) {
	for _, k := range []string{EnvProject, EnvDatastoreEmulator, EnvMemcache, EnvValkey, "DATASTORE_PROJECT_ID", locking.EnvAllowMemory} {
		t.Setenv(k, "")
	}
	t.Setenv("K_SERVICE", "worker")
	freshDefault(t)
	builds := 0
	l := &lazyApp{now: time.Now, log: slog.New(slog.DiscardHandler), build: func() (*App, error) {
		builds++
		return New(t.Context(), Config{}, slog.New(slog.DiscardHandler))
	}}
	_, _, err := l.get()
	if !errors.Is(err, locking.ErrNoStrongBackend) || !strings.Contains(err.Error(), EnvProject) {
		t.Fatalf("New on Cloud Run without a project = %v; want ErrNoStrongBackend naming %s", err, EnvProject)
	}
	h := serveFrom(l, (*App).Worker, true)
	for range 2 {
		w := httptest.NewRecorder()
		h(w, httptest.NewRequest(http.MethodPost, "/", nil))
		if w.Code != http.StatusInternalServerError || builds != 1 {
			t.Errorf("answer %d after %d builds; want 500 after 1", w.Code, builds)
		}
	}
}
