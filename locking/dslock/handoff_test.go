package dslock

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// spawnWorkers runs n worker processes (the test binary re-executed, see
// runWorker) with env added, and returns their sections sorted by entry.
func spawnWorkers(t *testing.T, n int, env ...string) []section {
	t.Helper()
	outs := make([]bytes.Buffer, n)
	errs := make([]bytes.Buffer, n)
	runErrs := make([]error, n)
	var wg sync.WaitGroup
	for w := range n {
		cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^$")
		cmd.Env = append(append(os.Environ(), workerEnv+"=w"+strconv.Itoa(w)), env...)
		cmd.Stdout, cmd.Stderr = &outs[w], &errs[w]
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { runErrs[w] = cmd.Wait() })
	}
	wg.Wait()
	var all []section
	for w := range n {
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
	slices.SortFunc(all, func(a, b section) int { return int(a.Enter - b.Enter) })
	return all
}

// TestHandoffWrites counts, at the wire, the writes that reach the lock's
// one entity while two processes hand a lock back and forth through
// locking.Client.With: each holds it for 30 ms, then pauses 150 ms while the
// other, which was waiting, takes it. A change of holder must cost at most 2
// write attempts on the entity (the holder's delete and the next holder's
// insert) and no failed write: the process that just released knows the
// lock is contended and reads before it writes.
//
// Counting starts once each process has held the lock (at the end of the
// first holding of the second process to get it): until then, each process
// meets the lock held for the first time, and that first try is an Insert
// (a free lock costs 1 RPC that way), which fails: one failed write per
// process, as the package documentation says.
func TestHandoffWrites(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test skipped in -short mode")
	}
	const rounds = 8
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		w, addr := startWire(t, e)
		id := "handoff-writes-" + e.Mode.String()
		secs := spawnWorkers(t, 2,
			workerHostEnv+"="+addr,
			workerProjEnv+"="+e.ProjectID,
			workerIDEnv+"="+id,
			workerRoundsEnv+"="+strconv.Itoa(rounds),
			workerGoroutinesEnv+"=1",
			workerHoldEnv+"=30ms",
			workerFirstHoldEnv+"=1s",
			workerPauseEnv+"=150ms",
		)
		if len(secs) != 2*rounds {
			t.Fatalf("%d sections; want %d", len(secs), 2*rounds)
		}
		handoffs := 0
		for i := 1; i < len(secs); i++ {
			if secs[i].Enter <= secs[i-1].Exit || secs[i].Token <= secs[i-1].Token {
				t.Errorf("section %d overlaps or goes back in tokens: %+v after %+v", i, secs[i], secs[i-1])
			}
			if secs[i].Worker != secs[i-1].Worker {
				handoffs++
			}
		}
		name := KeyName(id)
		s := slices.IndexFunc(secs, func(x section) bool { return x.Worker != secs[0].Worker })
		if s < 0 {
			t.Fatalf("only %s held the lock", secs[0].Worker)
		}
		firstExit := time.Unix(0, secs[s].Exit)
		var before, after, failed []codes.Code
		for _, c := range w.take() {
			if !slices.Contains(c.keys, name) {
				continue
			}
			if c.start.Before(firstExit) {
				before = append(before, c.code)
				continue
			}
			after = append(after, c.code)
			if c.code != codes.OK {
				failed = append(failed, c.code)
			}
		}
		// From then on: every change of holder (hand-off, or the same
		// process taking it again) is a release and an acquire, and the
		// last holding's release ends the run.
		changes := len(secs) - 1 - s
		perChange := float64(len(after)-1) / float64(changes)
		t.Logf("%d holdings, %d hand-offs between processes; once both had held it: %d writes on the entity (%.2f per change of holder), failed: %v; before: %v",
			len(secs), handoffs, len(after), perChange, failed, before)
		if len(failed) != 0 {
			t.Errorf("failed writes on the lock entity once both processes had held it: %v; want none", failed)
		}
		if perChange > 2 {
			t.Errorf("%.2f writes per change of holder; want at most 2", perChange)
		}
		if changes < 10 || handoffs < (len(secs)-1)/2 {
			t.Errorf("%d of %d changes of holder went to the other process, %d counted; want most, and at least 10 counted (the test measures hand-offs)", handoffs, len(secs)-1, changes)
		}
	})
}
