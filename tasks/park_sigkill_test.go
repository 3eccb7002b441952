package tasks_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	dsclient "cloud.google.com/go/datastore"

	"github.com/taskguard/taskguard/deploy"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/dswait"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// envWorkerProcess, when set, makes the test binary a Worker process (see
// workerProcess) instead of running tests; its value is a JSON
// workerProcessConfig.
const envWorkerProcess = "TASKGUARD_TEST_WORKER_PROCESS"

type workerProcessConfig struct {
	Project, TasksEmulator, WorkerURL, Log string
	Lease, Work                            time.Duration
	// LoseReplyOf names a lock id whose first acquire is applied by the
	// store but answered with an error, as when its reply is lost on the
	// way; the give-back of that acquire then takes GiveBackDelay more.
	LoseReplyOf   string
	GiveBackDelay time.Duration
}

// lostReply is a lock store whose first acquire of one lock id is applied
// and then reported failed (its reply lost); the release that follows it,
// the acquire's give-back, is slowed by delay.
type lostReply struct {
	locking.Backend
	id    string
	delay time.Duration
	lost  atomic.Bool
}

func (b *lostReply) Unwrap() locking.Backend { return b.Backend }

func (b *lostReply) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	g, err := b.Backend.Acquire(ctx, r)
	if err == nil && r.ID == b.id && b.lost.CompareAndSwap(false, true) {
		return locking.Grant{}, errors.New("the store's reply was lost")
	}
	return g, err
}

func (b *lostReply) Release(ctx context.Context, id, owner string) error {
	if id == b.id && b.lost.Load() {
		time.Sleep(b.delay)
	}
	return b.Backend.Release(ctx, id, owner)
}

// workerProcess serves a park-mode Worker in this process, as one Cloud
// Run instance would: locks and wait list on the Datastore emulator
// (DATASTORE_EMULATOR_HOST), continuations through the Cloud Tasks
// emulator. Its job "slow" appends "start I NANOS" and "end I NANOS" to the
// log file around its work. It prints "listening ADDR" and serves until
// killed.
func workerProcess() {
	raw := os.Getenv(envWorkerProcess)
	if raw == "" {
		return
	}
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "worker process:", err)
		os.Exit(2)
	}
	var cfg workerProcessConfig
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		fail(err)
	}
	ctx := context.Background()
	b, err := dslock.New(ctx, dslock.Options{ProjectID: cfg.Project})
	if err != nil {
		fail(err)
	}
	var store locking.Backend = b
	if cfg.LoseReplyOf != "" {
		store = &lostReply{Backend: b, id: cfg.LoseReplyOf, delay: cfg.GiveBackDelay}
	}
	locker, err := locking.New(locking.Config{Strong: store, Lease: cfg.Lease})
	if err != nil {
		fail(err)
	}
	dc, err := dsclient.NewClient(ctx, cfg.Project)
	if err != nil {
		fail(err)
	}
	list, err := dswait.New(dc, dswait.Options{})
	if err != nil {
		fail(err)
	}
	client, err := tasks.NewClient(ctx, baseConfig(cfg.WorkerURL), tasks.EmulatorOptions(cfg.TasksEmulator)...)
	if err != nil {
		fail(err)
	}
	w, err := tasks.NewWorker(locker, tasks.WithQueue(queueName), tasks.WithParking(client, list), tasks.WithParkingLease(cfg.Lease))
	if err != nil {
		fail(err)
	}
	logf, err := os.OpenFile(cfg.Log, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		fail(err)
	}
	var mu sync.Mutex
	note := func(what string, i int) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(logf, "%s %d %d\n", what, i, time.Now().UnixNano())
	}
	w.Handle("slow", func(ctx context.Context, d *tasks.Delivery) error {
		var i int
		if err := d.Decode(&i); err != nil {
			return tasks.Permanent(err)
		}
		note("start", i)
		select {
		case <-time.After(cfg.Work):
		case <-ctx.Done():
			return ctx.Err()
		}
		note("end", i)
		return nil
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail(err)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	fail(http.Serve(ln, w))
}

// startWorkerProcess starts a Worker process and returns it with its
// address.
func startWorkerProcess(t *testing.T, cfg workerProcessConfig, datastoreHost string) (*exec.Cmd, string) {
	t.Helper()
	raw, _ := json.Marshal(cfg)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envWorkerProcess+"="+string(raw), "DATASTORE_EMULATOR_HOST="+datastoreHost)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if addr, ok := strings.CutPrefix(sc.Text(), "listening "); ok {
			go func() {
				for sc.Scan() {
				}
			}()
			return cmd, addr
		}
	}
	t.Fatalf("the worker process exited before listening: %v", sc.Err())
	return nil, ""
}

// frontedQueue starts the emulator with deploy's queue and one URL for the
// Worker, as Cloud Run gives: it forwards to the process target names.
func frontedQueue(t *testing.T) (*taskstest.Server, string, *atomic.Pointer[httputil.ReverseProxy]) {
	t.Helper()
	settings, err := deploy.DefaultQueue()
	if err != nil {
		t.Fatal(err)
	}
	srv := taskstest.Start(t, taskstest.Options{})
	if _, err := srv.CreateQueue(t.Context(), &cloudtaskspb.CreateQueueRequest{Parent: location, Queue: settings.Queue(queueName)}); err != nil {
		t.Fatal(err)
	}
	target := &atomic.Pointer[httputil.ReverseProxy]{}
	front := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) { target.Load().ServeHTTP(rw, r) })}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = front.Serve(ln) }()
	t.Cleanup(func() { _ = front.Close() })
	return srv, "http://" + ln.Addr().String() + "/Worker", target
}

// TestParkHolderSIGKILL kills, with SIGKILL, the Worker process that holds
// a lock while its job runs, with tasks parked behind it on the Datastore
// emulator: every parked task still runs, once, on the other process, never
// beside another run, the first a lease (plus the safety margin and a
// dispatch) after the kill; the killed task runs again on Cloud Tasks'
// retry.
func TestParkHolderSIGKILL(t *testing.T) {
	e2eBackend(t) // starts (once) and resets the Datastore emulator
	emu := datastore.emu
	const (
		parked = 5
		lease  = 2 * time.Second
		work   = 300 * time.Millisecond
	)
	srv, workerURL, target := frontedQueue(t)
	logPath := filepath.Join(t.TempDir(), "runs.log")
	cfg := workerProcessConfig{Project: emu.ProjectID, TasksEmulator: srv.Addr(), WorkerURL: workerURL, Log: logPath, Lease: lease, Work: work}
	holder, holderAddr := startWorkerProcess(t, cfg, emu.Host)
	_, otherAddr := startWorkerProcess(t, cfg, emu.Host)
	proxy := func(addr string) *httputil.ReverseProxy {
		return httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: addr})
	}
	target.Store(proxy(holderAddr))

	client, err := tasks.NewClient(t.Context(), baseConfig(workerURL), srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	enqueue := func(i int) {
		t.Helper()
		if _, err := client.Enqueue(t.Context(), tasks.Task{Job: "slow", LockID: "hot", Payload: i}); err != nil {
			t.Fatal(err)
		}
	}
	// The holder's job gets a long enough run to be killed in: task 0 runs
	// work, and the kill comes while it runs.
	enqueue(0)
	waitFor(t, "task 0 to start", func() bool { return len(readRuns(t, logPath).starts[0]) > 0 })
	for i := 1; i <= parked; i++ {
		enqueue(i)
	}
	waitFor(t, "the tasks to park", func() bool {
		n := 0
		for _, a := range srv.Attempts() {
			if a.Status == tasks.StatusParked {
				n++
			}
		}
		return n >= parked
	})
	if runs := readRuns(t, logPath); len(runs.ends[0]) > 0 {
		t.Fatalf("task 0 ended before the kill: work %v is too short for this machine", work)
	}
	if err := holder.Process.Kill(); err != nil { // SIGKILL: no release, no hand-off
		t.Fatal(err)
	}
	killed := time.Now()
	target.Store(proxy(otherAddr))

	waitFor(t, "every task to run", func() bool {
		runs := readRuns(t, logPath)
		for i := 0; i <= parked; i++ {
			if len(runs.ends[i]) == 0 {
				return false
			}
		}
		return true
	})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if err := srv.WaitIdle(ctx, queueName); err != nil {
		t.Fatal(err)
	}
	runs := readRuns(t, logPath)
	first := time.Time{}
	for i := 1; i <= parked; i++ {
		if len(runs.ends[i]) != 1 {
			t.Errorf("parked task %d ran %d times; want once", i, len(runs.ends[i]))
		}
		if s := runs.starts[i]; len(s) > 0 && (first.IsZero() || s[0].Before(first)) {
			first = s[0]
		}
	}
	if len(runs.ends[0]) != 1 {
		t.Errorf("the killed task ran to its end %d times after its retry; want once", len(runs.ends[0]))
	}
	// Never two runs at once: the killed run counts until the kill.
	type span struct{ from, to time.Time }
	var spans []span
	for i := 0; i <= parked; i++ {
		for k, s := range runs.starts[i] {
			to := killed
			if i != 0 || k > 0 {
				to = runs.ends[i][min(k, len(runs.ends[i])-1)]
			}
			spans = append(spans, span{s, to})
		}
	}
	for a := range spans {
		for b := range spans {
			if a < b && spans[a].from.Before(spans[b].to) && spans[b].from.Before(spans[a].to) {
				t.Errorf("two runs overlapped: %v–%v and %v–%v", spans[a].from, spans[a].to, spans[b].from, spans[b].to)
			}
		}
	}
	t.Logf("first parked task started %v after the SIGKILL (lease %v + safety margin %v); every task (the %d parked ones and the killed one's retry) done %v after it",
		first.Sub(killed).Round(time.Millisecond), lease, tasks.DefaultSafetyMargin, parked, runs.last.Sub(killed).Round(time.Millisecond))
}

// runLog is the Worker processes' log of runs.
type runLog struct {
	starts, ends map[int][]time.Time
	last         time.Time
}

func readRuns(t *testing.T, path string) runLog {
	t.Helper()
	r := runLog{starts: map[int][]time.Time{}, ends: map[int][]time.Time{}}
	raw, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return r
	}
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue
		}
		i, err1 := strconv.Atoi(f[1])
		ns, err2 := strconv.ParseInt(f[2], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		at := time.Unix(0, ns)
		switch f[0] {
		case "start":
			r.starts[i] = append(r.starts[i], at)
		case "end":
			r.ends[i] = append(r.ends[i], at)
			r.last = later(r.last, at)
		}
	}
	return r
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for end := time.Now().Add(2 * time.Minute); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}
