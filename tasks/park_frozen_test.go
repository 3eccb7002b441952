package tasks_test

import (
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/tasks"
)

// TestWorkerFrozenAfterItsAnswer: on Cloud Run an instance gets (almost) no
// CPU once it has answered, so a Worker must finish before its answer
// everything others depend on. A Worker process runs a task while another
// task parks behind it on a second process; the first is frozen (SIGSTOP)
// the moment it has answered: the parked task still runs on the second
// process within a couple of seconds (the lock was released and the
// hand-off created before the answer; otherwise it would wait for the 10 s
// lease or its safety wake), and afterwards the lock is free.
func TestWorkerFrozenAfterItsAnswer(t *testing.T) {
	e2eBackend(t) // starts (once) and resets the Datastore emulator
	emu := datastore.emu
	const lease = 10 * time.Second
	srv, workerURL, target := frontedQueue(t)
	logPath := filepath.Join(t.TempDir(), "runs.log")
	cfg := workerProcessConfig{Project: emu.ProjectID, TasksEmulator: srv.Addr(), WorkerURL: workerURL, Log: logPath, Lease: lease, Work: 300 * time.Millisecond}
	first, firstAddr := startWorkerProcess(t, cfg, emu.Host)
	_, secondAddr := startWorkerProcess(t, cfg, emu.Host)
	// Task 0 goes to the first process, everything else to the second.
	task0 := tasks.TaskID("slow", "t0")
	target.Store(&httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		host := secondAddr
		if pr.In.Header.Get("X-CloudTasks-TaskName") == task0 {
			host = firstAddr
		}
		pr.SetURL(&url.URL{Scheme: "http", Host: host})
	}})

	client, err := tasks.NewClient(t.Context(), baseConfig(workerURL), srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	if _, err := client.Enqueue(t.Context(), tasks.Task{Job: "slow", LockID: "hot", Name: "t0", Payload: 0}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "task 0 to start", func() bool { return len(readRuns(t, logPath).starts[0]) > 0 })
	if _, err := client.Enqueue(t.Context(), tasks.Task{Job: "slow", LockID: "hot", Payload: 1}); err != nil {
		t.Fatal(err)
	}
	// Freeze the first process the moment it has answered task 0.
	var answered time.Time
	for end := time.Now().Add(time.Minute); answered.IsZero(); time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("task 0 was not answered within a minute")
		}
		for _, a := range srv.Attempts() {
			if strings.HasSuffix(a.Task, task0) && a.Status != 0 {
				answered = time.Now()
			}
		}
	}
	if err := first.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = first.Process.Signal(syscall.SIGCONT) })
	waitFor(t, "task 1 to run", func() bool { return len(readRuns(t, logPath).ends[1]) > 0 })
	after := readRuns(t, logPath).starts[1][0].Sub(answered)
	t.Logf("task 1 started %v after the first process answered and was frozen", after.Round(time.Millisecond))
	if after > 3*time.Second {
		t.Errorf("task 1 started %v after the frozen process's answer; want within a couple of seconds (the lease is %v)", after, lease)
	}
	cc, err := emu.Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	b, err := dslock.New(t.Context(), dslock.Options{ProjectID: emu.ProjectID, Conn: cc})
	if err != nil {
		t.Fatal(err)
	}
	locker, err := locking.New(locking.Config{Strong: b})
	if err != nil {
		t.Fatal(err)
	}
	waitIdle(t, srv, 30*time.Second)
	assertFree(t, locker, "hot")
}

// TestWorkerFrozenAfterALostReply: a Worker whose acquire the store applied
// but whose reply was lost answers 503, and gives that acquire back before
// it answers: frozen (SIGSTOP) the moment it has answered, it leaves the
// lock free (the give-back, slowed by 500 ms, would otherwise be cut off by
// the freeze and the lock held for a whole lease). Cloud Tasks' retry of
// the task then runs it, once, on the other process.
func TestWorkerFrozenAfterALostReply(t *testing.T) {
	e2eBackend(t) // starts (once) and resets the Datastore emulator
	emu := datastore.emu
	const lease = 30 * time.Second
	srv, workerURL, target := frontedQueue(t)
	logPath := filepath.Join(t.TempDir(), "runs.log")
	cfg := workerProcessConfig{Project: emu.ProjectID, TasksEmulator: srv.Addr(), WorkerURL: workerURL, Log: logPath, Lease: lease, Work: 100 * time.Millisecond}
	losing := cfg
	losing.LoseReplyOf, losing.GiveBackDelay = "lost", 500*time.Millisecond
	first, firstAddr := startWorkerProcess(t, losing, emu.Host)
	_, secondAddr := startWorkerProcess(t, cfg, emu.Host)
	// The task's first attempt goes to the first process, its retries and
	// everything else to the second.
	task := tasks.TaskID("slow", "l0")
	target.Store(&httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		host := secondAddr
		if pr.In.Header.Get("X-CloudTasks-TaskName") == task && pr.In.Header.Get("X-CloudTasks-TaskRetryCount") == "0" {
			host = firstAddr
		}
		pr.SetURL(&url.URL{Scheme: "http", Host: host})
	}})

	client, err := tasks.NewClient(t.Context(), baseConfig(workerURL), srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	if _, err := client.Enqueue(t.Context(), tasks.Task{Job: "slow", LockID: "lost", Name: "l0", Payload: 7}); err != nil {
		t.Fatal(err)
	}
	status := 0
	for end := time.Now().Add(time.Minute); status == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the task's first attempt was not answered within a minute")
		}
		for _, a := range srv.Attempts() {
			if strings.HasSuffix(a.Task, task) && a.Status != 0 {
				status = a.Status
			}
		}
	}
	if err := first.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = first.Process.Signal(syscall.SIGCONT) })
	if status != tasks.StatusRetry {
		t.Errorf("the attempt whose acquire reply was lost was answered %d, want %d", status, tasks.StatusRetry)
	}
	cc, err := emu.Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	b, err := dslock.New(t.Context(), dslock.Options{ProjectID: emu.ProjectID, Conn: cc})
	if err != nil {
		t.Fatal(err)
	}
	locker, err := locking.New(locking.Config{Strong: b})
	if err != nil {
		t.Fatal(err)
	}
	// The retry comes after the queue's minimum backoff (5 s): until then
	// nothing but the frozen process's acquire could hold the lock.
	assertFree(t, locker, "lost")
	waitFor(t, "the retry to run", func() bool { return len(readRuns(t, logPath).ends[7]) > 0 })
	waitIdle(t, srv, 30*time.Second)
	if n := len(readRuns(t, logPath).starts[7]); n != 1 {
		t.Errorf("the task ran %d times, want once", n)
	}
}
