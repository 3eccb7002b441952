package serverproc_test

import (
	"context"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/taskguard/taskguard/locking/internal/serverproc"
	"github.com/taskguard/taskguard/locking/mclock/mctest"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// recorder is a testing.TB that records Fatal and Skip instead of ending
// the real test; Start runs on a goroutine of its own so that those calls
// can end it with runtime.Goexit, as the real ones do.
type recorder struct {
	testing.TB
	mu       sync.Mutex
	fatal    string
	skipped  string
	cleanups []func()
}

func (r *recorder) Helper() {}
func (r *recorder) Fatal(args ...any) {
	r.mu.Lock()
	r.fatal = fmt.Sprint(args...)
	r.mu.Unlock()
	runtime.Goexit()
}
func (r *recorder) Fatalf(f string, args ...any) { r.Fatal(fmt.Sprintf(f, args...)) }
func (r *recorder) Skip(args ...any) {
	r.mu.Lock()
	r.skipped = fmt.Sprint(args...)
	r.mu.Unlock()
	runtime.Goexit()
}
func (r *recorder) Skipf(f string, args ...any) { r.Skip(fmt.Sprintf(f, args...)) }
func (r *recorder) Cleanup(f func())            { r.cleanups = append(r.cleanups, f) }

func start(rec *recorder, spec serverproc.Spec) *serverproc.Server {
	var s *serverproc.Server
	done := make(chan struct{})
	go func() {
		defer close(done)
		s = serverproc.Start(rec, spec)
	}()
	<-done
	return s
}

var missing = serverproc.Spec{
	Name:    "nothing",
	Binary:  "taskguard-no-such-server",
	EnvAddr: "TASKGUARD_NO_SUCH_SERVER_ADDR",
	Args:    func(int) []string { return nil },
	Ready:   func(context.Context, string) error { return nil },
}

func TestMissingBinary(t *testing.T) {
	for _, tc := range []struct {
		ci        string
		wantFatal bool
	}{
		{"true", true},
		{"", false},
		{"false", false},
	} {
		t.Run("CI="+tc.ci, func(t *testing.T) {
			t.Setenv("CI", tc.ci)
			t.Setenv(missing.EnvAddr, "")
			rec := &recorder{TB: t}
			if s := start(rec, missing); s != nil {
				t.Fatalf("Start returned a server for a missing binary")
			}
			if tc.wantFatal && (rec.fatal == "" || rec.skipped != "") {
				t.Errorf("CI=%q: fatal %q, skipped %q; want a failure", tc.ci, rec.fatal, rec.skipped)
			}
			if !tc.wantFatal && (rec.skipped == "" || rec.fatal != "") {
				t.Errorf("CI=%q: fatal %q, skipped %q; want a skip", tc.ci, rec.fatal, rec.skipped)
			}
		})
	}
}

func TestExternalServer(t *testing.T) {
	t.Setenv(missing.EnvAddr, "127.0.0.1:6399")
	rec := &recorder{TB: t}
	s := start(rec, missing)
	if s == nil || !s.External() || s.Addr != "127.0.0.1:6399" || rec.fatal != "" || rec.skipped != "" {
		t.Fatalf("Start with %s set = %+v (fatal %q, skipped %q)", missing.EnvAddr, s, rec.fatal, rec.skipped)
	}
}

// TestCleanupStopsServer: when a test ends, its server is gone; Restart
// keeps the address and loses the data.
func TestCleanupStopsServer(t *testing.T) {
	for _, tc := range []struct {
		name  string
		start func(t *testing.T) (addr string, restart func())
		probe string
	}{
		{"memcached", func(t *testing.T) (string, func()) {
			s := mctest.Start(t)
			return s.Addr, func() { s.Restart(t) }
		}, "version\r\n"},
		{"redis", func(t *testing.T) (string, func()) {
			s := redistest.Start(t)
			return s.Addr, func() { s.Restart(t) }
		}, "PING\r\n"},
	} {
		var addr string
		t.Run(tc.name, func(t *testing.T) {
			var restart func()
			addr, restart = tc.start(t)
			host, port, _ := net.SplitHostPort(addr)
			if p, _ := strconv.Atoi(port); host != "127.0.0.1" || p == 0 {
				t.Fatalf("address %q is not a port on 127.0.0.1", addr)
			}
			if err := serverproc.Probe(t.Context(), addr, tc.probe, ""); err != nil {
				t.Fatalf("server not answering: %v", err)
			}
			restart()
			if err := serverproc.Probe(t.Context(), addr, tc.probe, ""); err != nil {
				t.Fatalf("server not answering after Restart: %v", err)
			}
		})
		if addr == "" {
			continue // skipped
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			t.Errorf("%s: %s still accepts connections after its test ended", tc.name, addr)
		}
	}
}
