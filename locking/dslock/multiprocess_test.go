package dslock

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// Environment of a worker process (the test binary re-executed).
const (
	workerEnv       = "DSLOCK_TEST_WORKER"
	workerHostEnv   = "DSLOCK_TEST_HOST"
	workerProjEnv   = "DSLOCK_TEST_PROJECT"
	workerIDEnv     = "DSLOCK_TEST_ID"
	workerRoundsEnv = "DSLOCK_TEST_ROUNDS"
	// Optional: goroutines per worker (default workerGoroutines), how long
	// each holds the lock (default 2ms), how long the first holding of the
	// run lasts (default: hold), and how long a goroutine pauses after each
	// release before it tries again (default 0).
	workerGoroutinesEnv = "DSLOCK_TEST_GOROUTINES"
	workerHoldEnv       = "DSLOCK_TEST_HOLD"
	workerFirstHoldEnv  = "DSLOCK_TEST_FIRST_HOLD"
	workerPauseEnv      = "DSLOCK_TEST_PAUSE"

	workerGoroutines = 2
)

// section is one stay inside the lock, as a worker reports it.
type section struct {
	Worker string `json:"w"`
	G      int    `json:"g"`
	Enter  int64  `json:"enter"` // wall clock, ns; one machine, one clock
	Exit   int64  `json:"exit"`
	Token  uint64 `json:"token"`
}

// TestMultiProcess re-executes the test binary as 2 worker processes, each
// running 2 goroutines with their own connection and locking client, all
// hammering one id; the parent checks that no two sections overlap and that
// fencing tokens increase in the order the sections were entered.
func TestMultiProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test skipped in -short mode")
	}
	const workers = 2
	rounds := 12
	if n, err := strconv.Atoi(os.Getenv("DSLOCK_SOAK_ROUNDS")); err == nil && n > 0 {
		rounds = n // a longer soak: DSLOCK_SOAK_ROUNDS=500 go test -run TestMultiProcess
	}
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		id := "multiprocess-" + e.Mode.String()
		outs := make([]bytes.Buffer, workers)
		errs := make([]bytes.Buffer, workers)
		var wg sync.WaitGroup
		runErrs := make([]error, workers)
		for w := range workers {
			cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(),
				workerEnv+"=w"+strconv.Itoa(w),
				workerHostEnv+"="+e.Host,
				workerProjEnv+"="+e.ProjectID,
				workerIDEnv+"="+id,
				workerRoundsEnv+"="+strconv.Itoa(rounds),
			)
			cmd.Stdout, cmd.Stderr = &outs[w], &errs[w]
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			wg.Go(func() { runErrs[w] = cmd.Wait() })
		}
		wg.Wait()
		var all []section
		for w := range workers {
			if runErrs[w] != nil {
				t.Fatalf("worker %d: %v\nstderr:\n%s", w, runErrs[w], errs[w].String())
			}
			sc := bufio.NewScanner(&outs[w])
			for sc.Scan() {
				var s section
				if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
					t.Fatalf("worker %d printed %q: %v", w, sc.Text(), err)
				}
				all = append(all, s)
			}
		}
		if want := workers * workerGoroutines * rounds; len(all) != want {
			t.Fatalf("%d sections reported; want %d", len(all), want)
		}
		slices.SortFunc(all, func(a, b section) int { return int(a.Enter - b.Enter) })
		procs := map[string]bool{}
		for i, s := range all {
			procs[s.Worker] = true
			if s.Exit < s.Enter {
				t.Errorf("section %+v exits before it enters", s)
			}
			if i == 0 {
				continue
			}
			p := all[i-1]
			if s.Enter <= p.Exit {
				t.Errorf("overlap: %s/%d entered at %d before %s/%d left at %d", s.Worker, s.G, s.Enter, p.Worker, p.G, p.Exit)
			}
			if s.Token <= p.Token {
				t.Errorf("token %d (%s/%d) entered after token %d (%s/%d)", s.Token, s.Worker, s.G, p.Token, p.Worker, p.G)
			}
		}
		if len(procs) != workers {
			t.Errorf("sections from %d processes; want %d", len(procs), workers)
		}
		t.Logf("%d sections from %d processes × %d goroutines, none overlapping, tokens increasing", len(all), workers, workerGoroutines)
	})
}

// worker is the body of a re-executed test binary: it prints one JSON
// section per line and returns the exit code.
func worker() int {
	if err := runWorker(); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		return 1
	}
	return 0
}

func runWorker() error {
	rounds, err := strconv.Atoi(os.Getenv(workerRoundsEnv))
	if err != nil {
		return err
	}
	name, id := os.Getenv(workerEnv), os.Getenv(workerIDEnv)
	goroutines := workerGoroutines
	if n, err := strconv.Atoi(os.Getenv(workerGoroutinesEnv)); err == nil && n > 0 {
		goroutines = n
	}
	hold := 2 * time.Millisecond
	if d, err := time.ParseDuration(os.Getenv(workerHoldEnv)); err == nil {
		hold = d
	}
	firstHold := hold
	if d, err := time.ParseDuration(os.Getenv(workerFirstHoldEnv)); err == nil {
		firstHold = d
	}
	pause, _ := time.ParseDuration(os.Getenv(workerPauseEnv))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var (
		mu    sync.Mutex // serialises stdout
		wg    sync.WaitGroup
		errs  = make([]error, goroutines)
		first atomic.Bool
	)
	enc := json.NewEncoder(os.Stdout)
	for g := range goroutines {
		wg.Go(func() {
			errs[g] = func() error {
				cc, err := grpc.NewClient("passthrough:///"+os.Getenv(workerHostEnv), grpc.WithTransportCredentials(insecure.NewCredentials()))
				if err != nil {
					return err
				}
				defer cc.Close()
				b, err := New(ctx, Options{ProjectID: os.Getenv(workerProjEnv), Conn: cc, ClockSkew: testSkew})
				if err != nil {
					return err
				}
				c, err := locking.New(locking.Config{Strong: b, Lease: 10 * time.Second, MinBackoff: 2 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
				if err != nil {
					return err
				}
				for range rounds {
					err := c.With(ctx, id, func(ctx context.Context) error {
						s := section{Worker: name, G: g, Enter: time.Now().UnixNano(), Token: locking.FromContext(ctx).Token()}
						if first.CompareAndSwap(false, true) {
							time.Sleep(firstHold)
						} else {
							time.Sleep(hold)
						}
						s.Exit = time.Now().UnixNano()
						mu.Lock()
						defer mu.Unlock()
						return enc.Encode(s)
					})
					if err != nil {
						return err
					}
					time.Sleep(pause)
				}
				return nil
			}()
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}
