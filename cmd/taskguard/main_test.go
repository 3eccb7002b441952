package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// emulators holds each Datastore emulator, started once per test binary in
// the background from TestMain and stopped after all tests.
var emulators *dstest.Set

// runMainEnv makes the test binary run main instead of the tests: the
// process tests exec it as the command.
const runMainEnv = "TASKGUARD_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main()
		return
	}
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

// eachEmulator runs fn as a subtest against each emulator, reset to empty,
// with the environment pointing the command at it.
func eachEmulator(t *testing.T, fn func(t *testing.T, e *dstest.Emulator)) {
	for _, m := range []dstest.Mode{dstest.Legacy, dstest.Firestore} {
		t.Run(m.String(), func(t *testing.T) {
			e := emulators.Get(t, m, true)
			t.Setenv("DATASTORE_EMULATOR_HOST", e.Host)
			t.Setenv("DATASTORE_PROJECT_ID", e.ProjectID)
			fn(t, e)
		})
	}
}

// holder returns a locking client on its own connection to e: another
// instance of an application holding locks.
func holder(t *testing.T, e *dstest.Emulator) *locking.Client {
	t.Helper()
	cc, err := e.Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	b, err := dslock.New(t.Context(), dslock.Options{ProjectID: e.ProjectID, Conn: cc, ClockSkew: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	c, err := locking.New(locking.Config{Strong: b, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func acquire(t *testing.T, c *locking.Client, id string, lease time.Duration) *locking.Lock {
	t.Helper()
	l, err := c.Acquire(t.Context(), id, locking.Lease(lease), locking.Wait(false))
	if err != nil {
		t.Fatalf("Acquire(%q): %v", id, err)
	}
	t.Cleanup(func() { _ = l.Release(context.Background()) })
	return l
}

type result struct {
	code           int
	stdout, stderr string
}

// taskguard runs the command line in this process.
func taskguard(t *testing.T, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(t.Context(), args, &out, &errb)
	return result{code, out.String(), errb.String()}
}

// locks runs "taskguard locks ARGS" with the clock-skew margin of tests
// (every process of a test runs on this machine's clock).
func locks(t *testing.T, args ...string) result {
	t.Helper()
	return taskguard(t, append(append([]string{"locks"}, args...), "--clock-skew=10ms")...)
}

func (r result) want(t *testing.T, code int) result {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit status %d; want %d\nstdout:\n%s\nstderr:\n%s", r.code, code, r.stdout, r.stderr)
	}
	return r
}

// rows returns the table rows of stdout (without the header), first column
// and state per row.
func rows(t *testing.T, stdout string) []string {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "ID ") {
		t.Fatalf("no table header in:\n%s", stdout)
	}
	var out []string
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		out = append(out, f[0]+" "+f[1]+" "+f[2])
	}
	return out
}

func TestLocksList(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		c := holder(t, e)
		l1 := acquire(t, c, "job/1", time.Minute)
		l3 := acquire(t, c, "other", time.Minute)
		dead := fmt.Sprint(abandon(t, e, "job/2", 50*time.Millisecond))
		time.Sleep(200 * time.Millisecond)

		tests := []struct {
			name string
			args []string
			want []string // "id state token"
		}{
			{"all", nil, []string{"job/1 held " + tok(l1), "job/2 expired " + dead, "other held " + tok(l3)}},
			{"prefix", []string{"--prefix=job/"}, []string{"job/1 held " + tok(l1), "job/2 expired " + dead}},
			{"held only", []string{"--held-only"}, []string{"job/1 held " + tok(l1), "other held " + tok(l3)}},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				r := locks(t, append([]string{"list"}, tt.args...)...).want(t, exitOK)
				if got := rows(t, r.stdout); fmt.Sprint(got) != fmt.Sprint(tt.want) {
					t.Errorf("rows %q; want %q\n%s", got, tt.want, r.stdout)
				}

				r = locks(t, append([]string{"list", "--json"}, tt.args...)...).want(t, exitOK)
				var locks []lockJSON
				if err := json.Unmarshal([]byte(r.stdout), &locks); err != nil {
					t.Fatalf("--json output: %v\n%s", err, r.stdout)
				}
				var got []string
				for _, in := range locks {
					got = append(got, fmt.Sprintf("%s %s %d", in.ID, in.State, in.Token))
					if in.Key != dslock.KeyName(in.ID) || in.Owner == "" || in.LeaseMs <= 0 || (in.State == "held") != (in.RemainingMs > 0) {
						t.Errorf("--json lock %+v: inconsistent fields", in)
					}
				}
				if fmt.Sprint(got) != fmt.Sprint(tt.want) {
					t.Errorf("--json locks %q; want %q", got, tt.want)
				}
			})
		}
		r := locks(t, "list", "--prefix=none/").want(t, exitOK)
		if r.stdout != "" || !strings.Contains(r.stderr, "Listed 0 items") {
			t.Errorf("empty list: stdout %q, stderr %q", r.stdout, r.stderr)
		}

		// Bounded: --limit=2 reads two of the three and names the cursor
		// that reads the third.
		first := locks(t, "list", "--limit=2").want(t, exitOK)
		m := regexp.MustCompile(`Read 2 lock entities; more remain. Continue with --cursor=(\S+)`).FindStringSubmatch(first.stderr)
		if m == nil {
			t.Fatalf("list --limit=2: stderr %q; want the cursor of the rest", first.stderr)
		}
		rest := locks(t, "list", "--limit=2", "--cursor="+m[1]).want(t, exitOK)
		if strings.Contains(rest.stderr, "more remain") {
			t.Errorf("second page: stderr %q; want the end", rest.stderr)
		}
		got := append(rows(t, first.stdout), rows(t, rest.stdout)...)
		slices.Sort(got)
		if want := []string{"job/1 held " + tok(l1), "job/2 expired " + dead, "other held " + tok(l3)}; fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("two pages: rows %q; want %q", got, want)
		}
		locks(t, "list", "--limit=0").want(t, exitUsage)
		locks(t, "list", "--cursor=not a cursor!").want(t, exitUsage)
	})
}

func tok(l *locking.Lock) string { return fmt.Sprint(l.Token()) }

func TestLocksShow(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		c := holder(t, e)
		l := acquire(t, c, "user 42", time.Minute)

		r := locks(t, "show", "user 42").want(t, exitOK)
		for _, want := range []string{`id: "user 42"`, "state: held", "token: " + tok(l), "lease: 1m0s", "key: " + dslock.KeyName("user 42")} {
			if !strings.Contains(r.stdout, want+"\n") {
				t.Errorf("show output lacks %q:\n%s", want, r.stdout)
			}
		}
		r = locks(t, "show", "--json", "user 42").want(t, exitOK)
		var in lockJSON
		if err := json.Unmarshal([]byte(r.stdout), &in); err != nil {
			t.Fatal(err)
		}
		if in.ID != "user 42" || in.Token != l.Token() || in.State != "held" || in.RemainingMs <= 50_000 {
			t.Errorf("show --json = %+v", in)
		}
		r = locks(t, "show", "missing").want(t, exitFailure)
		if !strings.Contains(r.stderr, `lock "missing" not found`) || r.stdout != "" {
			t.Errorf("show missing: stdout %q, stderr %q", r.stdout, r.stderr)
		}
	})
}

func TestLocksForceRelease(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		c := holder(t, e)
		const lease = 900 * time.Millisecond // renewed every 300 ms
		l := acquire(t, c, "stuck", lease)

		r := locks(t, "release", "stuck").want(t, exitUsage)
		if !strings.Contains(r.stderr, "without --force") {
			t.Errorf("release without --force: stderr %q", r.stderr)
		}
		r = locks(t, "release", "stuck", "--force", fmt.Sprintf("--token=%d", l.Token()+1)).want(t, exitFailure)
		if !strings.Contains(r.stderr, "changed hands") {
			t.Errorf("release with a stale token: stderr %q", r.stderr)
		}
		locks(t, "show", "stuck").want(t, exitOK) // still there

		t.Setenv("CLOUDSDK_CORE_ACCOUNT", "ops@example.com")
		r = locks(t, "release", "stuck", "--force", fmt.Sprintf("--token=%d", l.Token()), "--reason=test", "--json").want(t, exitOK)
		var out struct {
			Released lockJSON
			Fence    uint64
			By       string
			Reason   string
		}
		if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
			t.Fatalf("%v\n%s", err, r.stdout)
		}
		if out.Released.Token != l.Token() || out.Released.State != "held" || out.Fence <= l.Token() || !strings.Contains(out.By, "@") || out.Reason != "test" {
			t.Errorf("release --json = %+v; want the held lock with token %d and a fence above it", out, l.Token())
		}

		// The audit record on stderr.
		var audit map[string]any
		if err := json.Unmarshal([]byte(strings.TrimSpace(r.stderr)), &audit); err != nil {
			t.Fatalf("audit record is not one JSON line: %v\n%s", err, r.stderr)
		}
		for k, want := range map[string]any{
			"audit": true, "lock_id": "stuck", "token": float64(l.Token()), "owner": out.Released.Owner,
			"fence": float64(out.Fence), "by": out.By, "account": "ops@example.com", "reason": "test",
		} {
			if audit[k] != want {
				t.Errorf("audit[%q] = %v; want %v", k, audit[k], want)
			}
		}
		if at, err := time.Parse(time.RFC3339Nano, fmt.Sprint(audit["at"])); err != nil || time.Since(at) > time.Minute {
			t.Errorf("audit at = %v (%v); want now", audit["at"], err)
		}

		locks(t, "show", "stuck").want(t, exitFailure)
		select {
		case <-l.Done():
			if !errors.Is(l.Err(), locking.ErrLockLost) {
				t.Errorf("holder's Err() = %v; want ErrLockLost", l.Err())
			}
		case <-time.After(lease):
			t.Fatal("the holder's Done did not close within a lease of the force release")
		}
		next := acquire(t, holder(t, e), "stuck", time.Minute)
		if next.Token() <= out.Fence {
			t.Errorf("next token %d; want above the fence %d and the removed token %d", next.Token(), out.Fence, l.Token())
		}
		t.Logf("removed token %d, fence %d, next token %d", l.Token(), out.Fence, next.Token())

		r = locks(t, "release", "never-held", "--force").want(t, exitFailure)
		if !strings.Contains(r.stderr, "not found") {
			t.Errorf("release of a missing lock: stderr %q", r.stderr)
		}
	})
}

func TestLocksCleanup(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		c := holder(t, e)
		live := acquire(t, c, "live", time.Minute)
		abandon(t, e, "dead/1", 50*time.Millisecond)
		abandon(t, e, "dead/2", 50*time.Millisecond)
		time.Sleep(300 * time.Millisecond)

		r := locks(t, "cleanup", "--dry-run", "--grace=100ms").want(t, exitOK)
		if !strings.Contains(r.stdout, "Dry run: 2 expired lock entities would be deleted") {
			t.Errorf("dry run output: %q", r.stdout)
		}
		if got := rows(t, locks(t, "list").want(t, exitOK).stdout); len(got) != 3 {
			t.Errorf("after a dry run: %q; want all 3 locks kept", got)
		}
		r = locks(t, "cleanup", "--grace=100ms", "--json").want(t, exitOK)
		var rep struct{ Scanned, Expired, Deleted, Errors int }
		if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
			t.Fatal(err)
		}
		if rep.Expired != 2 || rep.Deleted != 2 || rep.Errors != 0 {
			t.Errorf("cleanup report %+v; want 2 expired and deleted", rep)
		}
		want := []string{"live held " + tok(live)}
		if got := rows(t, locks(t, "list").want(t, exitOK).stdout); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("after cleanup: %q; want %q", got, want)
		}
		r = locks(t, "cleanup", "--grace=100ms").want(t, exitOK)
		if !strings.HasPrefix(r.stdout, "Deleted 0 expired lock entities") {
			t.Errorf("second cleanup: %q", r.stdout)
		}
	})
}

// abandon leaves a lock whose holder died: acquired straight from a backend,
// never renewed nor released.
func abandon(t *testing.T, e *dstest.Emulator, id string, lease time.Duration) uint64 {
	t.Helper()
	cc, err := e.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	b, err := dslock.New(t.Context(), dslock.Options{ProjectID: e.ProjectID, Conn: cc})
	if err != nil {
		t.Fatal(err)
	}
	g, err := b.Acquire(t.Context(), locking.Request{ID: id, Owner: "dead-" + id, Lease: lease})
	if err != nil || !g.Acquired {
		t.Fatalf("Acquire(%q) = %+v, %v", id, g, err)
	}
	return g.Token
}

func TestUsage(t *testing.T) {
	t.Setenv("DATASTORE_EMULATOR_HOST", "")
	t.Setenv("DATASTORE_PROJECT_ID", "")
	t.Setenv("GOOGLE_CLOUD_PROJECT", "")
	t.Setenv("TASKGUARD_QUEUE", "")
	tests := []struct {
		args   []string
		code   int
		stdout string // substring, "" for empty output
		stderr string // substring, "" for empty output
	}{
		{nil, exitUsage, "", "SYNOPSIS\n    taskguard GROUP COMMAND"},
		{[]string{"--help"}, exitOK, "GROUPS\n    locks", ""},
		{[]string{"help", "locks", "list"}, exitOK, "NAME\n    taskguard locks list - list locks", ""},
		{[]string{"locks"}, exitUsage, "", "command required"},
		{[]string{"locks", "--help"}, exitOK, "COMMANDS\n    list", ""},
		{[]string{"locks", "bogus"}, exitUsage, "", `invalid choice: "bogus"`},
		{[]string{"bogus"}, exitUsage, "", `(taskguard) invalid choice: "bogus"`},
		{[]string{"locks", "show"}, exitUsage, "", "(taskguard.locks.show) missing argument"},
		{[]string{"locks", "show", "a", "b"}, exitUsage, "", "unexpected arguments"},
		{[]string{"locks", "list", "--bogus"}, exitUsage, "", "flag provided but not defined: -bogus"},
		{[]string{"locks", "list", "--help"}, exitOK, "    --prefix=PREFIX\n", ""},
		{[]string{"locks", "release", "--help"}, exitOK, "EXAMPLES\n", ""},
		{[]string{"locks", "list"}, exitUsage, "", "no project id"},
		{[]string{"locks", "cleanup", "--grace=-1s", "--project=p"}, exitUsage, "", "--grace must be positive"},
		{[]string{"tasks", "enqueue", "--lock-id=x"}, exitUsage, "", "--job is required"},
		{[]string{"tasks", "enqueue", "--job=j", "--lock-id=x"}, exitUsage, "", "set --queue"},
		{[]string{"tasks", "enqueue", "--job=j", "--lock-id=x", "--payload={"}, exitUsage, "", "not valid JSON"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := taskguard(t, tt.args...).want(t, tt.code)
			check := func(name, got, want string) {
				if (want == "" && got != "") || !strings.Contains(got, want) {
					t.Errorf("%s = %q; want it to contain %q", name, got, want)
				}
			}
			check("stdout", r.stdout, tt.stdout)
			check("stderr", r.stderr, tt.stderr)
		})
	}
}

func TestTasksEnqueue(t *testing.T) {
	got := make(chan []byte, 1)
	worker := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		select {
		case got <- body:
		default:
		}
	}))
	t.Cleanup(worker.Close)
	srv := taskstest.Start(t, taskstest.Options{AutoCreateQueues: true})
	const queue = "projects/p/locations/l/queues/q"
	t.Setenv("CLOUD_TASKS_EMULATOR_HOST", srv.Addr())
	t.Setenv("TASKGUARD_QUEUE", queue)
	t.Setenv("TASKGUARD_WORKER_URL", worker.URL)
	t.Setenv("TASKGUARD_TASK_SERVICE_ACCOUNT", "worker@p.iam.gserviceaccount.com")

	r := taskguard(t, "tasks", "enqueue", "--job=refresh", "--lock-id=user-42", `--payload={"user":42}`, "--name=once", "--json").want(t, exitOK)
	var out struct {
		Name      string
		Duplicate bool
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.Name, queue+"/tasks/") || out.Duplicate {
		t.Errorf("enqueue --json = %+v", out)
	}
	select {
	case body := <-got:
		var env struct {
			Job, LockID string
			Payload     json.RawMessage
		}
		if err := json.Unmarshal(body, &env); err != nil || env.Job != "refresh" || env.LockID != "user-42" || string(env.Payload) != `{"user":42}` {
			t.Errorf("worker received %s (%v)", body, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the worker received no task")
	}
	r = taskguard(t, "tasks", "enqueue", "--job=refresh", "--lock-id=user-42", "--name=once").want(t, exitOK)
	if !strings.HasPrefix(r.stdout, "Already enqueued (duplicate name): "+out.Name) {
		t.Errorf("second enqueue with the same name: %q", r.stdout)
	}
}

// TestTasksEnqueueRefusesIdentitiesJSONCannotCarry checks that a job or lock
// id the task's JSON body would change is refused as a usage error quoting
// it (tasks.Client refuses it before any RPC; the worker URL is dead).
func TestTasksEnqueueRefusesIdentitiesJSONCannotCarry(t *testing.T) {
	srv := taskstest.Start(t, taskstest.Options{AutoCreateQueues: true})
	t.Setenv("CLOUD_TASKS_EMULATOR_HOST", srv.Addr())
	t.Setenv("TASKGUARD_QUEUE", "projects/p/locations/l/queues/q")
	t.Setenv("TASKGUARD_WORKER_URL", "http://127.0.0.1:1/")
	t.Setenv("TASKGUARD_TASK_SERVICE_ACCOUNT", "worker@p.iam.gserviceaccount.com")
	for _, tc := range []struct{ job, lockID, bad string }{
		{"refresh", "user-\xff42", "user-\xff42"},
		{"refresh", "\xfe", "\xfe"},
		{"resize-\xe9", "x", "resize-\xe9"},
	} {
		r := taskguard(t, "tasks", "enqueue", "--job="+tc.job, "--lock-id="+tc.lockID).want(t, exitUsage)
		if !strings.Contains(r.stderr, strconv.Quote(tc.bad)+" is not valid UTF-8") {
			t.Errorf("tasks enqueue --job=%q --lock-id=%q: stderr %q; want %q quoted", tc.job, tc.lockID, r.stderr, tc.bad)
		}
	}
}

// TestProcess runs the command as a process: exit statuses and the split
// between standard output and standard error reach the shell.
func TestProcess(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		acquire(t, holder(t, e), "held", time.Minute)
		tests := []struct {
			args         []string
			code         int
			stdout, errs string
		}{
			{[]string{"--help"}, exitOK, "GROUPS", ""},
			{[]string{"locks", "show"}, exitUsage, "", "missing argument"},
			{[]string{"locks", "show", "held", "--clock-skew=10ms"}, exitOK, "state: held", ""},
			{[]string{"locks", "show", "missing"}, exitFailure, "", `lock "missing" not found`},
		}
		for _, tt := range tests {
			t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
				cmd := exec.CommandContext(t.Context(), os.Args[0], tt.args...)
				cmd.Env = append(os.Environ(), runMainEnv+"=1")
				var out, errb bytes.Buffer
				cmd.Stdout, cmd.Stderr = &out, &errb
				err := cmd.Run()
				code := 0
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					code = ee.ExitCode()
				} else if err != nil {
					t.Fatal(err)
				}
				if code != tt.code || !strings.Contains(out.String(), tt.stdout) || !strings.Contains(errb.String(), tt.errs) ||
					(tt.stdout == "" && out.Len() > 0) || (tt.errs == "" && errb.Len() > 0) {
					t.Errorf("exit %d; want %d\nstdout:\n%s\nstderr:\n%s", code, tt.code, out.String(), errb.String())
				}
			})
		}
	})
}
