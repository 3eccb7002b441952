//go:build unix

package torture_test

import (
	"math/rand/v2"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/taskguard/taskguard/internal/torture"
	"github.com/taskguard/taskguard/locking/fence/sqlfence/pgtest"
)

// frozenLease is the lease of the frozen-holder phase; a freeze lasts from
// 1.2 to 3 leases.
const frozenLease = 500 * time.Millisecond

// TestTortureFrozenFence is the frozen-holder phase: worker processes
// contend on the Firestore emulator's locks and end each section with a
// write through the fence — to Datastore, or to PostgreSQL — made whether
// or not they still hold the lock, while this process freezes a random
// worker — one inside a section when there is one — with SIGSTOP past its lease and resumes it with SIGCONT, again and
// again, so that holders resume mid-section, mid-write, mid-transaction.
// The lock alone then lets sections overlap; the resource's own history
// (versions in commit order, each with its token) must show no stale write:
// tokens never decrease from one version to the next.
func TestTortureFrozenFence(t *testing.T) {
	dur := 8 * time.Second
	if long {
		dur = 60 * time.Second
	}
	for _, resource := range []string{torture.FenceDatastore, torture.FencePostgres} {
		t.Run(resource, func(t *testing.T) {
			s := startStore(t, torture.StoreFirestore)
			cfg := s.config(t)
			cfg.Fence = resource
			if resource == torture.FencePostgres {
				pg := pgtest.Start(t)
				if err := torture.SetupPostgres(t.Context(), pg.Open(t)); err != nil {
					t.Fatal(err)
				}
				cfg.FenceDSN = pg.DSN
			}
			cfg.IDs = ids(2)
			cfg.Clients, cfg.Goroutines = 1, 2
			cfg.Duration, cfg.Lease, cfg.MaxHold = dur, frozenLease, 100*time.Millisecond
			const procs = 3
			dir := t.TempDir()
			ws := make([]*worker, procs)
			for i := range procs {
				ws[i] = spawn(t, dir, i, cfg)
			}
			freezes, caught := 0, 0
			for end := time.Now().Add(dur - 3*frozenLease); time.Now().Before(end); {
				pid, holding := freezeTarget(dir, ws)
				if holding {
					caught++
				}
				if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
					t.Fatal(err)
				}
				time.Sleep(frozenLease + frozenLease/5 + rand.N(frozenLease*9/5))
				if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
					t.Fatal(err)
				}
				freezes++
				time.Sleep(rand.N(frozenLease))
			}
			var st torture.Stats
			for _, w := range ws {
				st.Add(w.wait(t))
			}
			sections, err := torture.ReadSections(dir)
			if err != nil {
				t.Fatal(err)
			}
			overlaps := len(torture.Check(sections, 10*time.Second).Overlaps)
			history, err := torture.ReadHistory(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			stale, problems := torture.CheckHistory(history)
			for i, p := range problems {
				if i == 5 {
					t.Errorf("... %d problems in all", len(problems))
					break
				}
				t.Error(p)
			}
			report(t, "%d freezes of 1.2-3 leases (%v) over %v, %d of a process inside a section; %d sections, %d overlapping under the lock alone; fenced writes: %d landed, %d refused as stale, %d failed otherwise (first: %q); resource history: %d writes, %d stale",
				freezes, frozenLease, dur, caught, len(sections), overlaps, st.FencedWrites, st.FenceRefused, st.FenceErrors, st.FenceError, len(history), stale)
			if int64(len(history)) != st.FencedWrites {
				t.Errorf("the history holds %d writes, the workers counted %d landed", len(history), st.FencedWrites)
			}
			if st.FenceRefused == 0 {
				t.Errorf("no write was refused: the freezes produced no stale holder, the phase tested nothing")
			}
			if st.FencedWrites == 0 {
				t.Errorf("no write landed")
			}
		})
	}
}

// freezeTarget returns the pid of a worker inside a section now (from the
// record files: entered, not yet exited), so that freezes catch holders, or
// a random worker's when none is.
func freezeTarget(dir string, ws []*worker) (pid int, holding bool) {
	if secs, err := torture.ReadSections(dir); err == nil {
		var pids []int
		for _, s := range secs {
			if s.Enter != 0 && s.Exit == 0 {
				if p, err := strconv.Atoi(strings.SplitN(s.Owner, "/", 2)[0]); err == nil {
					pids = append(pids, p)
				}
			}
		}
		if len(pids) > 0 {
			return pids[rand.N(len(pids))], true
		}
	}
	return ws[rand.N(len(ws))].cmd.Process.Pid, false
}
