package tasks_test

import (
	"net/http/httputil"
	"net/url"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
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
	f := startFrozenPair(t, 10*time.Second, 300*time.Millisecond, workerProcessConfig{}, "t0", false)
	if _, err := f.client.Enqueue(t.Context(), tasks.Task{Job: "slow", LockID: "hot", Name: "t0", Payload: 0}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "task 0 to start", func() bool { return len(readRuns(t, f.log).starts[0]) > 0 })
	if _, err := f.client.Enqueue(t.Context(), tasks.Task{Job: "slow", LockID: "hot", Payload: 1}); err != nil {
		t.Fatal(err)
	}
	_, answered := f.freezeWhenAnswered(t)
	waitFor(t, "task 1 to run", func() bool { return len(readRuns(t, f.log).ends[1]) > 0 })
	after := readRuns(t, f.log).starts[1][0].Sub(answered)
	t.Logf("task 1 started %v after the first process answered and was frozen", after.Round(time.Millisecond))
	if after > 3*time.Second {
		t.Errorf("task 1 started %v after the frozen process's answer; want within a couple of seconds (the lease is %v)", after, f.lease)
	}
	locker := emulatorLocker(t, 0)
	waitIdle(t, f.srv, 30*time.Second)
	assertFree(t, locker, "hot")
}

// TestWorkerFrozenAfterALostReply: a Worker whose acquire the store applied
// but whose reply was lost answers 503, and gives that acquire back before
// it answers: frozen (SIGSTOP) the moment it has answered, it leaves the
// lock free (the give-back, slowed by 500 ms, would otherwise be cut off by
// the freeze and the lock held for a whole lease). Cloud Tasks' retry of
// the task then runs it, once, on the other process.
func TestWorkerFrozenAfterALostReply(t *testing.T) {
	losing := workerProcessConfig{LoseReplyOf: "lost", GiveBackDelay: 500 * time.Millisecond}
	f := startFrozenPair(t, 30*time.Second, 100*time.Millisecond, losing, "l0", true)
	if _, err := f.client.Enqueue(t.Context(), tasks.Task{Job: "slow", LockID: "lost", Name: "l0", Payload: 7}); err != nil {
		t.Fatal(err)
	}
	status, _ := f.freezeWhenAnswered(t)
	if status != tasks.StatusRetry {
		t.Errorf("the attempt whose acquire reply was lost was answered %d, want %d", status, tasks.StatusRetry)
	}
	// The retry comes after the queue's minimum backoff (5 s): until then
	// nothing but the frozen process's acquire could hold the lock.
	assertFree(t, emulatorLocker(t, 0), "lost")
	waitFor(t, "the retry to run", func() bool { return len(readRuns(t, f.log).ends[7]) > 0 })
	waitIdle(t, f.srv, 30*time.Second)
	if n := len(readRuns(t, f.log).starts[7]); n != 1 {
		t.Errorf("the task ran %d times, want once", n)
	}
}

// frozenPair is two Worker processes behind one queue and one URL, as two
// instances of one Cloud Run function: the first gets one task's
// deliveries, the second everything else.
type frozenPair struct {
	srv    *taskstest.Server
	client *tasks.Client
	first  *exec.Cmd
	task   string // the first process's task id
	log    string // the job's runs log
	lease  time.Duration
}

// startFrozenPair starts the pair on the Datastore emulator (reset), with
// the first process's settings given by first (the rest is filled in).
// Task name's deliveries go to the first process: all of them, or only its
// first attempt when onlyFirstAttempt.
func startFrozenPair(t *testing.T, lease, work time.Duration, first workerProcessConfig, name string, onlyFirstAttempt bool) *frozenPair {
	t.Helper()
	e2eBackend(t) // starts (once) and resets the Datastore emulator
	emu := datastore.emu
	srv, workerURL, target := frontedQueue(t)
	cfg := workerProcessConfig{Project: emu.ProjectID, TasksEmulator: srv.Addr(), WorkerURL: workerURL,
		Log: filepath.Join(t.TempDir(), "runs.log"), Lease: lease, Work: work}
	first.Project, first.TasksEmulator, first.WorkerURL, first.Log, first.Lease, first.Work = cfg.Project, cfg.TasksEmulator, cfg.WorkerURL, cfg.Log, cfg.Lease, cfg.Work
	p := &frozenPair{srv: srv, task: tasks.TaskID("slow", name), log: cfg.Log, lease: lease}
	var firstAddr string
	p.first, firstAddr = startWorkerProcess(t, first, emu.Host)
	_, secondAddr := startWorkerProcess(t, cfg, emu.Host)
	target.Store(&httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		host := secondAddr
		if pr.In.Header.Get("X-CloudTasks-TaskName") == p.task && (!onlyFirstAttempt || pr.In.Header.Get("X-CloudTasks-TaskRetryCount") == "0") {
			host = firstAddr
		}
		pr.SetURL(&url.URL{Scheme: "http", Host: host})
	}})
	client, err := tasks.NewClient(t.Context(), baseConfig(workerURL), srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	p.client = client
	return p
}

// freezeWhenAnswered freezes the first process (SIGSTOP) the moment an
// attempt of its task has been answered, and returns that answer's status
// and when it was seen.
func (p *frozenPair) freezeWhenAnswered(t *testing.T) (int, time.Time) {
	t.Helper()
	status := 0
	for end := time.Now().Add(time.Minute); status == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the first process's task was not answered within a minute")
		}
		for _, a := range p.srv.Attempts() {
			if strings.HasSuffix(a.Task, p.task) && a.Status != 0 {
				status = a.Status
			}
		}
	}
	answered := time.Now()
	if err := p.first.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.first.Process.Signal(syscall.SIGCONT) })
	return status, answered
}

// emulatorLocker is a lock client of this process on the Datastore
// emulator that e2eBackend started, with lease (the default when 0).
func emulatorLocker(t *testing.T, lease time.Duration) *locking.Client {
	t.Helper()
	emu := datastore.emu
	cc, err := emu.Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	b, err := dslock.New(t.Context(), dslock.Options{ProjectID: emu.ProjectID, Conn: cc})
	if err != nil {
		t.Fatal(err)
	}
	locker, err := locking.New(locking.Config{Strong: b, Lease: lease})
	if err != nil {
		t.Fatal(err)
	}
	return locker
}
