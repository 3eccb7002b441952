package torture_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/taskguard/taskguard/internal/torture"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/locking/mclock/mctest"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// long reports whether the long run was asked for (make torture).
var long = os.Getenv("TASKGUARD_TORTURE") == "long"

// emulators are started once, in the background, by TestMain.
var emulators *dstest.Set

func TestMain(m *testing.M) {
	torture.Main() // a re-executed worker process never returns from here
	emulators = dstest.StartSet(dstest.Legacy, dstest.Firestore)
	code := m.Run()
	emulators.Close()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// store is one real backend server under test.
type store struct {
	name    string // torture.Store*
	addr    string
	project string
	restart func(t testing.TB) // nil when the store cannot be restarted
}

// eachStore runs fn as a subtest against each of the four real stores,
// started (or skipped: locally when not installed, never with CI=true). With
// parallel set the subtests run at once: for tests whose checks do not
// depend on timing margins, to keep the CI run short.
func eachStore(t *testing.T, parallel bool, fn func(t *testing.T, s store)) {
	for _, name := range []string{torture.StoreFirestore, torture.StoreLegacy, torture.StoreMemcached, torture.StoreRedis} {
		t.Run(name, func(t *testing.T) {
			if parallel {
				t.Parallel()
			}
			fn(t, startStore(t, name))
		})
	}
}

func startStore(t *testing.T, name string) store {
	t.Helper()
	switch name {
	case torture.StoreLegacy, torture.StoreFirestore:
		mode := dstest.Legacy
		if name == torture.StoreFirestore {
			mode = dstest.Firestore
		}
		e := emulators.Get(t, mode, false)
		return store{name: name, addr: e.Host, project: e.ProjectID}
	case torture.StoreMemcached:
		s := mctest.Start(t)
		return store{name: name, addr: s.Addr, restart: s.Restart}
	default:
		s := redistest.Start(t)
		return store{name: name, addr: s.Addr, restart: s.Restart}
	}
}

// prefix returns a key prefix (an entity kind on Datastore) unique to the
// test, so tests sharing an emulator do not see each other's locks.
func prefix(t *testing.T) string {
	r := strings.NewReplacer("/", "_", " ", "_", "=", "_")
	return "T" + r.Replace(t.Name()) + strconv.FormatInt(time.Now().UnixNano()%1e6, 10) + ":"
}

// config returns the base worker configuration for store s.
func (s store) config(t *testing.T) torture.Config {
	p := prefix(t)
	if torture.Kind(s.name) == 0 { // Strong: Datastore kinds take no colon
		p = strings.TrimSuffix(p, ":")
	}
	return torture.Config{Store: s.name, Addr: s.addr, Project: s.project, Prefix: p}
}

// worker is one running worker process.
type worker struct {
	cmd    *exec.Cmd
	stdout bytes.Buffer
	stderr bytes.Buffer
	out    string
}

// spawn starts the test binary as a worker process running cfg; its record
// file goes to dir.
func spawn(t *testing.T, dir string, n int, cfg torture.Config) *worker {
	t.Helper()
	cfg.Out = filepath.Join(dir, fmt.Sprintf("w%d.jsonl", n))
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	w := &worker{out: cfg.Out}
	w.cmd = exec.Command(os.Args[0], "-test.run=^$")
	w.cmd.Env = append(os.Environ(), torture.EnvConfig+"="+string(raw))
	w.cmd.Stdout, w.cmd.Stderr = &w.stdout, &w.stderr
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if w.cmd.ProcessState == nil {
			_ = w.cmd.Process.Kill()
			_ = w.cmd.Wait()
		}
	})
	return w
}

// wait waits for w and returns its stats; it fails t if w failed.
func (w *worker) wait(t *testing.T) torture.Stats {
	t.Helper()
	err := w.cmd.Wait()
	var st torture.Stats
	if jerr := json.Unmarshal(w.stdout.Bytes(), &st); err != nil || jerr != nil {
		t.Fatalf("worker %d: %v %v\nstdout: %s\nstderr: %s", w.cmd.Process.Pid, err, jerr, w.stdout.String(), w.stderr.String())
	}
	return st
}

// runWorkers starts procs worker processes of cfg (mutate, when set, edits
// the config of process i), runs during while they work (from the test's
// goroutine; nil to just wait), waits for them and returns their summed
// stats and the checked history.
func runWorkers(t *testing.T, procs int, cfg torture.Config, mutate func(i int, c *torture.Config), during func()) (torture.Stats, []torture.Section) {
	t.Helper()
	dir := t.TempDir()
	ws := make([]*worker, procs)
	for i := range procs {
		c := cfg
		c.IDs = append([]string(nil), cfg.IDs...)
		if mutate != nil {
			mutate(i, &c)
		}
		ws[i] = spawn(t, dir, i, c)
	}
	if during != nil {
		during()
	}
	var sum torture.Stats
	for _, w := range ws {
		sum.Add(w.wait(t))
	}
	sections, err := torture.ReadSections(dir)
	if err != nil {
		t.Fatal(err)
	}
	return sum, sections
}

// waitEntered polls the record file of w until a section was entered and
// returns it.
func waitEntered(t *testing.T, w *worker, timeout time.Duration) torture.Section {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if f, err := os.Open(w.out); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				var s torture.Section
				if json.Unmarshal(sc.Bytes(), &s) == nil && s.Enter != 0 {
					f.Close()
					return s
				}
			}
			f.Close()
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("worker %d entered no section within %v\nstderr: %s", w.cmd.Process.Pid, timeout, w.stderr.String())
	return torture.Section{}
}

// lastRenewal returns the largest send time in a renewal log, or 0.
func lastRenewal(t *testing.T, path string) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var last int64
	for line := range strings.Lines(string(b)) {
		if n, err := strconv.ParseInt(strings.TrimSpace(line), 10, 64); err == nil {
			last = max(last, n)
		}
	}
	return last
}

// figures collects the numbers every test prints, for RELIABILITY.md.
var figures struct {
	mu    sync.Mutex
	lines []string
}

func report(t *testing.T, format string, args ...any) {
	t.Helper()
	line := fmt.Sprintf("%s: ", t.Name()) + fmt.Sprintf(format, args...)
	t.Log(line)
	figures.mu.Lock()
	figures.lines = append(figures.lines, line)
	figures.mu.Unlock()
}
