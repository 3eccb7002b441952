package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// TestBusyModeChoice checks which mode New chooses for a busy lock, and
// with which wait list.
func TestBusyModeChoice(t *testing.T) {
	queued := Config{Queue: testQueue, WorkerURL: "http://127.0.0.1:1/Worker", TaskServiceAccount: "w@p.iam.gserviceaccount.com", TasksEmulator: "127.0.0.1:1"}
	mem, other := modeClients(t)
	with := func(cfg Config, busy string) Config { cfg.Busy = busy; return cfg }
	for _, tc := range []struct {
		name  string
		cfg   Config
		locks *locking.Client
		want  string
		fails bool
	}{
		{"default, queue, memory locks", queued, mem, BusyPark, false},
		{"park, queue, memory locks", with(queued, BusyPark), mem, BusyPark, false},
		{"429 asked", with(queued, Busy429), mem, Busy429, false},
		{"default, no queue", Config{}, mem, Busy429, false},
		{"park asked, no queue", with(Config{}, BusyPark), mem, "", true},
		{"default, a store without a shared wait list", queued, other, Busy429, false},
		{"park asked, a store without a shared wait list", with(queued, BusyPark), other, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := New(t.Context(), tc.cfg, slog.New(slog.DiscardHandler), WithLocks(tc.locks))
			if tc.fails {
				if !errors.Is(err, ErrConfig) {
					t.Fatalf("New = %v; want ErrConfig", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			if a.Busy() != tc.want {
				t.Errorf("Busy() = %q; want %q", a.Busy(), tc.want)
			}
		})
	}
}

// TestRunRecordsIn429Mode checks that a Worker in 429 mode keeps run
// records in the wait list New would park in: a second delivery of a task
// that ran to an end is answered 204 without running again. With a Strong
// store New keeps no wait list for, there are none, and it runs again.
func TestRunRecordsIn429Mode(t *testing.T) {
	mem, other := modeClients(t)
	for _, tc := range []struct {
		name  string
		locks *locking.Client
		runs  int32
	}{{"memory locks", mem, 1}, {"a store without a shared wait list", other, 2}} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := New(t.Context(), Config{Busy: Busy429}, slog.New(slog.DiscardHandler), WithLocks(tc.locks))
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			var runs atomic.Int32
			a.worker.Handle("once", func(context.Context, *tasks.Delivery) error { runs.Add(1); return nil })
			for attempt := range 2 {
				r, err := taskstest.NewRequest(tasks.Task{Job: "once", LockID: "rr", Name: "once-1"}, taskstest.RequestAttempt(attempt, attempt))
				if err != nil {
					t.Fatal(err)
				}
				rw := httptest.NewRecorder()
				a.worker.ServeHTTP(rw, r)
				if rw.Code != tasks.StatusDone {
					t.Errorf("delivery %d answered %d, want %d", attempt, rw.Code, tasks.StatusDone)
				}
			}
			if got := runs.Load(); got != tc.runs {
				t.Errorf("the job ran %d times, want %d", got, tc.runs)
			}
		})
	}
}

// modeClients returns a lock client on memory, where New keeps its wait
// list, and one on a store New knows no wait list for.
func modeClients(t *testing.T) (mem, other *locking.Client) {
	t.Helper()
	mem, err := locking.New(locking.Config{Strong: memlock.New()})
	if err != nil {
		t.Fatal(err)
	}
	other, err = locking.New(locking.Config{Strong: fakeStrong{memlock.New()}})
	if err != nil {
		t.Fatal(err)
	}
	return mem, other
}

// fakeStrong is a Strong backend of a type New knows no wait list for.
type fakeStrong struct{ locking.Backend }

// TestMemoryWaitListShared checks that two Apps on one in-memory lock
// store share its wait list, and Apps on two stores do not.
func TestMemoryWaitListShared(t *testing.T) {
	b1, b2 := memlock.New(), memlock.New()
	if first, again := memoryWaitList(b1), memoryWaitList(b1); first != again {
		t.Error("one store, two wait lists")
	}
	if memoryWaitList(b1) == memoryWaitList(b2) {
		t.Error("two stores, one wait list")
	}
}

// TestParkDefaultBurst enqueues a burst on one lock id through the Enqueue
// function with the default configuration: every task runs once, one at a
// time, in the order they were enqueued, and no delivery is answered 429 or
// 503; the busy ones are parked (202).
func TestParkDefaultBurst(t *testing.T) {
	for _, store := range []string{"memory", "datastore"} {
		t.Run(store, func(t *testing.T) {
			// A short lease: the parked tasks' safety nets, which find
			// nothing to run, come soon after, and the queue is idle then.
			extra := map[string]string{EnvLease: "2s"}
			if store == "datastore" {
				e := dstest.New(t, dstest.Firestore)
				t.Setenv(EnvDatastoreEmulator, e.Host)
				t.Setenv(EnvDatastoreProject, e.ProjectID)
				extra[EnvDatastoreProject] = e.ProjectID
			}
			a, srv, emu := newTestApp(t, extra)
			if a.Busy() != BusyPark {
				t.Fatalf("Busy() = %q; want %q by default", a.Busy(), BusyPark)
			}
			if (a.waitDS != nil) != (store == "datastore") {
				t.Fatalf("wait list in Datastore: %v; want it for Datastore locks only", a.waitDS != nil)
			}
			const n = 6
			var (
				mu      sync.Mutex
				order   []int
				running int
				overlap bool
			)
			done := make(chan struct{}, n)
			a.worker.Handle("step", func(ctx context.Context, d *tasks.Delivery) error {
				var i int
				if err := d.Decode(&i); err != nil {
					return tasks.Permanent(err)
				}
				mu.Lock()
				running++
				overlap = overlap || running > 1
				order = append(order, i)
				mu.Unlock()
				time.Sleep(100 * time.Millisecond)
				mu.Lock()
				running--
				mu.Unlock()
				done <- struct{}{}
				return nil
			})
			// The first holds the lock; the others arrive while it runs.
			for i := range n {
				if code, out := post(t, srv.URL+"/Enqueue", fmt.Sprintf(`{"job":"step","lockId":"burst","payload":%d}`, i)); code != http.StatusOK {
					t.Fatalf("enqueue %d = %d %v", i, code, out)
				}
				if i == 0 {
					time.Sleep(30 * time.Millisecond)
				}
			}
			for range n {
				select {
				case <-done:
				case <-time.After(30 * time.Second):
					t.Fatalf("only %v ran", order)
				}
			}
			if err := emu.WaitIdle(t.Context(), testQueue); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			defer mu.Unlock()
			if overlap {
				t.Error("two runs on one lock id at once")
			}
			seen := map[int]int{}
			for _, i := range order {
				seen[i]++
			}
			if len(order) != n || len(seen) != n || order[0] != 0 {
				t.Errorf("runs %v; want each of 0..%d once, 0 first", order, n-1)
			}
			queued := map[string]bool{}
			for _, at := range emu.Attempts() {
				queued[at.Task] = true
				switch at.Status {
				case http.StatusTooManyRequests, http.StatusServiceUnavailable:
					t.Errorf("attempt %s #%d answered %d", at.Task, at.Number, at.Status)
				}
			}
			// The Enqueue function parks at enqueue: after the first, the
			// burst's tasks went into the wait list, and the queue carried
			// the first and the wakes only (n tasks and their wakes before).
			if len(queued) >= n {
				t.Errorf("the queue carried %d tasks for a burst of %d; want fewer (parked at enqueue)", len(queued), n)
			}
		})
	}
}

// TestParkGivenWaitListAnyStore: with a wait list of its own
// (WithWaitList), New parks on any Strong store, also one that cannot
// probe a lock (then the Enqueue function does not park at enqueue: its
// tasks go through the queue, as in park mode before).
func TestParkGivenWaitListAnyStore(t *testing.T) {
	queued := Config{Queue: testQueue, WorkerURL: "http://127.0.0.1:1/Worker", TaskServiceAccount: "w@p.iam.gserviceaccount.com", TasksEmulator: "127.0.0.1:1"}
	_, other := modeClients(t)
	a, err := New(t.Context(), queued, slog.New(slog.DiscardHandler), WithLocks(other), WithWaitList(&tasks.MemoryWaitList{}))
	if err != nil {
		t.Fatalf("New with a wait list of its own on a store that cannot probe: %v", err)
	}
	defer a.Close()
	if a.Busy() != BusyPark {
		t.Errorf("Busy() = %q; want %q", a.Busy(), BusyPark)
	}
}
