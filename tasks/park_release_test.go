package tasks_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	dsclient "cloud.google.com/go/datastore"
	"google.golang.org/api/option"

	"github.com/taskguard/taskguard/locking/lockhttp"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/dswait"
)

// TestHandOffFromEveryRelease: a task parked behind a lock held by another
// process, through lockhttp.Guard, locking.With or Lock.Release, runs within
// one dispatch of the release (under 2 s here), not a lease later: this
// test process holds the locks (with tasks.HandOff registered on its lock
// client, as a program beside the Worker would), and a Worker process
// parks the tasks; both keep their locks and the wait list on the Firestore
// emulator.
func TestHandOffFromEveryRelease(t *testing.T) {
	e2eBackend(t) // starts (once) and resets the Datastore emulator
	emu := datastore.emu
	const (
		lease = 10 * time.Second // a safety wake would come after it
		hold  = time.Second
	)
	srv, workerURL, target := frontedQueue(t)
	logPath := filepath.Join(t.TempDir(), "runs.log")
	_, addr := startWorkerProcess(t, workerProcessConfig{Project: emu.ProjectID, TasksEmulator: srv.Addr(), WorkerURL: workerURL,
		Log: logPath, Lease: lease, Work: 10 * time.Millisecond}, emu.Host)
	target.Store(httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: addr}))

	// This process: the locks' other user.
	locker := emulatorLocker(t, lease)
	cc, err := emu.Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	dc, err := dsclient.NewClient(t.Context(), emu.ProjectID, option.WithGRPCConn(cc))
	if err != nil {
		t.Fatal(err)
	}
	list, err := dswait.New(dc, dswait.Options{})
	if err != nil {
		t.Fatal(err)
	}
	client, err := tasks.NewClient(t.Context(), baseConfig(workerURL), srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	if err := tasks.HandOff(locker, client, list, nil); err != nil {
		t.Fatal(err)
	}

	holders := []struct {
		name string
		hold func(id string, during func())
	}{
		{"lockhttp.Guard", func(id string, during func()) {
			h := lockhttp.Guard(locker, lockhttp.Query("id", ""), http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
				during()
				rw.WriteHeader(http.StatusNoContent)
			}))
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/rebuild?id="+url.QueryEscape(id), nil))
			if rec.Code != http.StatusNoContent {
				t.Fatalf("guarded handler answered %d", rec.Code)
			}
		}},
		{"locking.With", func(id string, during func()) {
			if err := locker.With(t.Context(), id, func(context.Context) error { during(); return nil }); err != nil {
				t.Fatal(err)
			}
		}},
		{"Lock.Release", func(id string, during func()) {
			l, err := locker.Acquire(t.Context(), id)
			if err != nil {
				t.Fatal(err)
			}
			during()
			if err := l.Release(t.Context()); err != nil {
				t.Fatal(err)
			}
		}},
	}
	parked := func() int {
		n := 0
		for _, a := range srv.Attempts() {
			if a.Status == tasks.StatusParked {
				n++
			}
		}
		return n
	}
	for i, h := range holders {
		t.Run(h.name, func(t *testing.T) {
			id := "tenant-" + h.name
			before := parked()
			h.hold(id, func() {
				if _, err := client.Enqueue(t.Context(), tasks.Task{Job: "slow", LockID: id, Payload: i}); err != nil {
					t.Fatal(err)
				}
				waitFor(t, "the task to park", func() bool { return parked() > before })
				time.Sleep(hold)
			})
			released := time.Now()
			waitFor(t, "the parked task to run", func() bool { return len(readRuns(t, logPath).starts[i]) > 0 })
			after := readRuns(t, logPath).starts[i][0].Sub(released)
			t.Logf("%s: the parked task started %v after the release (its safety wake would come after %v)", h.name, after.Round(time.Millisecond), lease)
			if after > 2*time.Second {
				t.Errorf("%s: the parked task started %v after the release; want within one dispatch (< 2 s)", h.name, after)
			}
		})
	}
}
