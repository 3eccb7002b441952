package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// buildRunner builds this command once per test binary run.
var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func runner(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "taskguard-local")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "taskguard-local")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// cleanEnv is the environment without anything that points at real services.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "TASKGUARD_") || strings.HasPrefix(name, "DATASTORE_") || name == "GOOGLE_CLOUD_PROJECT" ||
			name == "CLOUD_TASKS_EMULATOR_HOST" || name == "MEMCACHE_SERVERS" || name == "VALKEY_ADDR" || name == "REDIS_ADDR" || name == "PORT" {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// TestDemo runs the README's demo command as a newcomer would: no cloud
// account, no environment, embedded defaults. Its own checks decide the exit
// code; the timeline must show them.
func TestDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), demoWait+time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, runner(t), "-demo", "-addr", "127.0.0.1:0")
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out)
	}
	for _, want := range []string{
		"report-A", "per id never more than 1", "parked by the Worker (202", "parked at enqueue: 5 of the", "0 answered 429, 0 answered 503", "burst on report-A: 6 of 6 runs",
		"1 call(s) to the token endpoint", "CleanupLocks: 200 OK", "OK: at most one task at a time per lock id",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}

// logLine is the part of the functions' JSON log lines this test reads.
type logLine struct {
	Severity  string `json:"severity"`
	Message   string `json:"message"`
	User      string `json:"user"`
	Refreshed bool   `json:"refreshed"`
	Token     uint64 `json:"token"`
	Strong    string `json:"strong_backend"`
}

// TestServeOnDatastore starts the runner as a subprocess with Strong locks
// in the real Datastore emulator and drives it over HTTP: a burst of
// enqueued token refreshes, observed through the functions' structured logs,
// then CleanupLocks.
func TestServeOnDatastore(t *testing.T) {
	e := dstest.New(t, dstest.Firestore)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, runner(t), "-addr", addr)
	cmd.Env = append(cleanEnv(), "DATASTORE_EMULATOR_HOST="+e.Host, "DATASTORE_PROJECT_ID="+e.ProjectID, "TASKGUARD_LOG_LEVEL=info")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	})
	lines := make(chan logLine, 1000)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var l logLine
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				lines <- l
			}
		}
	}()

	base := "http://" + addr
	waitUp(t, base+"/CleanupLocks?dryRun=true")
	const distinct, same = 5, 5
	for i := range distinct + same {
		lockID := fmt.Sprintf("refresh-%d", i)
		if i >= distinct {
			lockID = "refresh-same"
		}
		body := fmt.Sprintf(`{"job":"refresh-token","lockId":%q,"payload":{"user":"42"}}`, lockID)
		resp, err := http.Post(base+"/Enqueue", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("Enqueue: %s %s", resp.Status, msg)
		}
	}

	var (
		checked   []logLine
		backend   string
		deadline  = time.After(2 * time.Minute)
		errorLogs []string
	)
	for len(checked) < distinct+same {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("runner exited; %d of %d jobs seen", len(checked), distinct+same)
			}
			switch {
			case l.Message == "oauth token checked":
				checked = append(checked, l)
			case l.Strong != "":
				backend = l.Strong
			case l.Severity == "ERROR":
				errorLogs = append(errorLogs, l.Message)
			}
		case <-deadline:
			t.Fatalf("only %d of %d jobs ran within 2 minutes", len(checked), distinct+same)
		}
	}
	if backend != "datastore" {
		t.Errorf("runner's Strong backend = %q; want datastore (DATASTORE_EMULATOR_HOST is set)", backend)
	}
	refreshed := 0
	for i, l := range checked {
		if l.Refreshed {
			refreshed++
		}
		// Lines are logged while holding the token lock, so their order is
		// the order of holdings.
		if i > 0 && l.Token <= checked[i-1].Token {
			t.Errorf("token lock holding %d has fencing token %d after %d", i, l.Token, checked[i-1].Token)
		}
	}
	if refreshed != 1 {
		t.Errorf("%d refreshes for one expired token; want exactly 1", refreshed)
	}
	if len(errorLogs) > 0 {
		t.Errorf("ERROR logs: %v", errorLogs)
	}

	resp, err := http.Post(base+"/CleanupLocks", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Backend  string `json:"backend"`
		Finished bool   `json:"finished"`
	}
	err = json.NewDecoder(resp.Body).Decode(&rep)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || rep.Backend != "datastore" || !rep.Finished {
		t.Errorf("CleanupLocks = %s %+v (%v); want 200, datastore, finished", resp.Status, rep, err)
	}
}

func waitUp(t *testing.T, url string) {
	t.Helper()
	for end := time.Now().Add(time.Minute); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			return
		}
	}
	t.Fatalf("%s did not answer within a minute", url)
}

// TestServerCutsStalledClients sends the runner's server a request that
// stalls in its body and one that stalls in its headers: the handler's read
// fails when the read timeout passes, and the stalled headers are cut off,
// while each client still holds its connection open.
func TestServerCutsStalledClients(t *testing.T) {
	readErr := make(chan error, 1)
	srv := newServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := io.ReadAll(r.Body)
		readErr <- err
	}), serverTimeouts{header: 200 * time.Millisecond, read: 300 * time.Millisecond, idle: time.Second})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	dial := func() net.Conn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}

	body := dial()
	fmt.Fprint(body, "POST /Worker HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"v\":1,")
	select {
	case err := <-readErr:
		if err == nil {
			t.Error("the read of a stalled body succeeded")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the handler is still reading a stalled body 20 s after the 300 ms read timeout")
	}

	headers := dial()
	fmt.Fprint(headers, "POST /Worker HTTP/1.1\r\nHost: x\r\n")
	_ = headers.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.ReadAll(headers); err != nil {
		t.Errorf("a client stalled in its headers was not cut off: %v", err)
	}
}
