// Package serverproc starts a real server binary (memcached, redis-server,
// postgres) as a child process on a free loopback port for tests, waits
// until it answers, and stops it by its pid in t.Cleanup. It is the shared
// engine of locking/mclock/mctest, locking/redislock/redistest and
// locking/fence/sqlfence/pgtest.
package serverproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"
)

// Spec describes one kind of server.
type Spec struct {
	// Name is used in messages ("memcached").
	Name string
	// Binary is the executable looked up in PATH ("memcached").
	Binary string
	// Args returns the command-line arguments that make the server listen
	// on 127.0.0.1:port only, without persistence.
	Args func(port int) []string
	// Ready performs one probe of the server at addr and returns nil once it
	// answers commands.
	Ready func(ctx context.Context, addr string) error
	// EnvAddr names an environment variable that, when set, points at an
	// external server to use instead of starting one. Such a server is shared:
	// it cannot be restarted.
	EnvAddr string
	// Setup, when set, adjusts the command before it starts (another user
	// to run as, a working directory). It must keep cmd.SysProcAttr's
	// Pdeathsig.
	Setup func(cmd *exec.Cmd)
	// StopSignal, when set, is sent to stop the server instead of SIGKILL,
	// for a server that must clean up after itself (PostgreSQL's shared
	// memory); SIGKILL follows if it has not exited after stopTimeout.
	StopSignal os.Signal
}

// stopTimeout bounds how long a server given a StopSignal may take to exit.
const stopTimeout = 10 * time.Second

// readyTimeout bounds how long a fresh server may take to answer.
const readyTimeout = 15 * time.Second

// Server is a running server. Its methods must be called from the test's own
// goroutine (they call t.Fatal).
type Server struct {
	// Addr is host:port of the server, on 127.0.0.1 unless it is external.
	Addr string

	spec     Spec
	external bool

	mu   sync.Mutex // guards proc
	proc *process   // nil when stopped or external
}

// process is one run of the server binary.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once cmd.Wait returned
	output *syncBuffer   // combined stdout and stderr, for error messages
	stop   os.Signal     // Spec.StopSignal
}

// Start starts the server described by spec and registers its stop with
// t.Cleanup. When spec.EnvAddr names an external server, Start uses it
// instead. When the binary is missing, Start fails the test if the
// environment variable CI is "true" and skips it otherwise.
func Start(t testing.TB, spec Spec) *Server {
	t.Helper()
	if addr := os.Getenv(spec.EnvAddr); spec.EnvAddr != "" && addr != "" {
		return &Server{Addr: addr, spec: spec, external: true}
	}
	path, err := exec.LookPath(spec.Binary)
	if err != nil {
		msg := fmt.Sprintf("%s not found in PATH (install the Debian package, or set %s to a running server): %v",
			spec.Binary, spec.EnvAddr, err)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	s := &Server{spec: spec}
	t.Cleanup(func() {
		if err := s.stop(); err != nil {
			t.Errorf("%s: stop: %v", spec.Name, err)
		}
	})
	// A free port can be taken by someone else between our probe and the
	// server's bind; try a few ports before giving up.
	var lastErr error
	for range 3 {
		port, err := freePort()
		if err != nil {
			t.Fatalf("%s: find a free port: %v", spec.Name, err)
		}
		if lastErr = s.start(path, port); lastErr == nil {
			return s
		}
	}
	t.Fatalf("%s: start: %v", spec.Name, lastErr)
	return nil
}

// External reports whether the server was named by the environment rather
// than started by Start.
func (s *Server) External() bool { return s.external }

// Restart kills the server and starts
// it again on the same port, so every key it held is gone. Clients keep
// their address. Restart skips the test when the server is external.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	if s.external {
		t.Skipf("%s: cannot restart the external server named by %s", s.spec.Name, s.spec.EnvAddr)
	}
	if err := s.stop(); err != nil {
		t.Fatalf("%s: stop: %v", s.spec.Name, err)
	}
	_, portStr, err := net.SplitHostPort(s.Addr)
	if err != nil {
		t.Fatalf("%s: %v", s.spec.Name, err)
	}
	port, _ := strconv.Atoi(portStr)
	path, err := exec.LookPath(s.spec.Binary)
	if err != nil {
		t.Fatalf("%s: %v", s.spec.Name, err)
	}
	if err := s.start(path, port); err != nil {
		t.Fatalf("%s: restart: %v", s.spec.Name, err)
	}
}

// Stop stops the server now rather than at cleanup; clients then see
// connection errors. It is a no-op for an external server.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	if err := s.stop(); err != nil {
		t.Fatalf("%s: stop: %v", s.spec.Name, err)
	}
}

// start runs the binary on port and waits until it answers.
func (s *Server) start(path string, port int) error {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	cmd := exec.Command(path, s.spec.Args(port)...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	setPdeathsig(cmd)
	if s.spec.Setup != nil {
		s.spec.Setup(cmd)
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	p := &process{cmd: cmd, exited: make(chan struct{}), output: out, stop: s.spec.StopSignal}
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()

	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	for {
		pctx, pcancel := context.WithTimeout(ctx, time.Second)
		err := s.spec.Ready(pctx, addr)
		pcancel()
		if err == nil {
			break
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited before it was ready: %v; output:\n%s", s.spec.Name, cmd.ProcessState, out.String())
		case <-ctx.Done():
			_ = p.kill()
			return fmt.Errorf("%s at %s not ready after %v: %v; output:\n%s", s.spec.Name, addr, readyTimeout, err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	s.mu.Lock()
	s.proc = p
	s.Addr = addr
	s.mu.Unlock()
	return nil
}

// stop terminates the current process, if any, by its pid and waits for it.
func (s *Server) stop() error {
	s.mu.Lock()
	p := s.proc
	s.proc = nil
	s.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.kill()
}

// kill stops the process with SIGKILL and waits until it has exited. The
// servers keep nothing on disk, so nothing is lost that a graceful stop would
// keep, and a kill is instant (memcached takes most of a second to honour
// SIGTERM) and is what a crash looks like to clients. A server with a
// StopSignal gets that first, and SIGKILL only if it has not exited after
// stopTimeout.
func (p *process) kill() error {
	if p.stop != nil {
		if err := p.cmd.Process.Signal(p.stop); err == nil {
			select {
			case <-p.exited:
				return nil
			case <-time.After(stopTimeout):
			}
		}
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	<-p.exited
	return nil
}

// freePort asks the kernel for a free TCP port on 127.0.0.1.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Probe dials addr, writes req and checks that the first reply line starts
// with want. Starters use it as their Ready function.
func Probe(ctx context.Context, addr, req, want string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := c.Write([]byte(req)); err != nil {
		return err
	}
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(buf[:n], []byte(want)) {
		return fmt.Errorf("unexpected reply %q to %q", buf[:n], req)
	}
	return nil
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a child's
// stdout and stderr copiers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
