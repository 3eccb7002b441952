package app

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

const envDrainProcess = "TASKGUARD_TEST_DRAIN_PROCESS"

func TestMain(m *testing.M) {
	if mode := os.Getenv(envDrainProcess); mode != "" {
		drainProcess(mode)
		return
	}
	os.Exit(m.Run())
}

// drainProcess is the process TestDrainOnSIGTERM starts: a Cloud Run
// instance serving the Worker, locks on the Datastore emulator, with
// DrainOnSIGTERM when mode is "drain". Its job "hold" prints "started" and
// holds its lock until its context ends, then prints the context's cause.
func drainProcess(mode string) {
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "drain process:", err)
		os.Exit(2)
	}
	ctx := context.Background()
	b, err := dslock.New(ctx, dslock.Options{ProjectID: os.Getenv("DATASTORE_PROJECT_ID")})
	if err != nil {
		fail(err)
	}
	locks, err := locking.New(locking.Config{Strong: b, Lease: 30 * time.Second})
	if err != nil {
		fail(err)
	}
	opts := []Option{WithLocks(locks), WithConfig(Config{Busy: Busy429}), WithJob("hold", func(ctx context.Context, d *tasks.Delivery) error {
		fmt.Println("started")
		<-ctx.Done()
		fmt.Println("cause:", context.Cause(ctx))
		return ctx.Err()
	})}
	if mode == "drain" {
		opts = append(opts, DrainOnSIGTERM(5*time.Second))
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail(err)
	}
	fmt.Println("listening", ln.Addr())
	fail(http.Serve(ln, Handler(Functions{Worker: "Worker"}, opts...)))
}

// TestDrainOnSIGTERM: Cloud Run sends SIGTERM before it shuts an instance
// down. With DrainOnSIGTERM the job in flight is told (cause ErrShutdown),
// the Worker answers (500: retried) and releases the task's lock before the
// process exits, with status 0; without it the process dies at once, the
// delivery gets no answer and the lock stays held for its lease (30 s).
func TestDrainOnSIGTERM(t *testing.T) {
	emu := dstest.New(t, dstest.Firestore)
	for _, mode := range []string{"drain", "default"} {
		t.Run(mode, func(t *testing.T) {
			if err := emu.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^TestDrainProcess$")
			cmd.Env = append(os.Environ(), envDrainProcess+"="+mode, "DATASTORE_EMULATOR_HOST="+emu.Host, "DATASTORE_PROJECT_ID="+emu.ProjectID, "K_SERVICE=worker")
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
			lines := make(chan string, 16)
			go func() {
				sc := bufio.NewScanner(out)
				for sc.Scan() {
					lines <- sc.Text()
				}
				close(lines)
			}()
			next := func(prefix string) string {
				t.Helper()
				for {
					select {
					case l, ok := <-lines:
						if !ok {
							return ""
						}
						if strings.HasPrefix(l, prefix) {
							return l
						}
					case <-time.After(30 * time.Second):
						t.Fatalf("no %q line from the process", prefix)
					}
				}
			}
			addr := strings.TrimPrefix(next("listening "), "listening ")
			req, err := taskstest.NewRequest(tasks.Task{Job: "hold", LockID: "term"}, taskstest.RequestWorkerURL("http://"+addr+"/Worker"))
			if err != nil {
				t.Fatal(err)
			}
			answer := make(chan int, 1)
			go func() {
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					answer <- 0
					return
				}
				resp.Body.Close()
				answer <- resp.StatusCode
			}()
			next("started")
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			status := <-answer
			cause := next("cause:")
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			var exitErr error
			select {
			case exitErr = <-exited:
			case <-time.After(10 * time.Second):
				t.Fatal("the process did not exit within 10 s of SIGTERM")
			}
			conn, err := emu.Dial()
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			store, err := dslock.New(t.Context(), dslock.Options{ProjectID: emu.ProjectID, Conn: conn})
			if err != nil {
				t.Fatal(err)
			}
			check, err := locking.New(locking.Config{Strong: store})
			if err != nil {
				t.Fatal(err)
			}
			l, lockErr := check.Acquire(t.Context(), "term", locking.Wait(false))
			if lockErr == nil {
				_ = l.Release(t.Context())
			}
			if mode == "default" {
				// What DrainOnSIGTERM is for: no answer, and a held lock.
				if status != 0 || !errors.Is(lockErr, locking.ErrNotAcquired) {
					t.Errorf("without draining: answer %d, lock %v; want no answer and the lock held", status, lockErr)
				}
				return
			}
			if status != tasks.StatusFailed {
				t.Errorf("the delivery in flight was answered %d, want %d (retried)", status, tasks.StatusFailed)
			}
			if !strings.Contains(cause, ErrShutdown.Error()) {
				t.Errorf("the job's context ended with %q, want ErrShutdown", cause)
			}
			if exitErr != nil {
				t.Errorf("the process exited with %v, want status 0", exitErr)
			}
			if lockErr != nil {
				t.Errorf("the lock was left held after the drained exit: %v", lockErr)
			}
		})
	}
}
