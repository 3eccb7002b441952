// Package redistest starts a real Redis-protocol server (redis-server or
// valkey-server) for tests, the way net/http/httptest starts an HTTP server:
// on a free port on 127.0.0.1, without persistence, stopped by its pid when
// the test ends.
//
// It runs redis-server from PATH (Debian package "redis-server"), or
// valkey-server when redis-server is missing. When neither is present, Start
// fails the test if the environment variable CI is "true" and skips it
// otherwise. When REDISTEST_ADDR is set (host:port), Start uses that server
// instead; it is then shared, so tests must use their own keys, and Restart
// skips.
package redistest

import (
	"context"
	"os/exec"
	"strconv"
	"testing"

	"github.com/taskguard/taskguard/locking/internal/serverproc"
)

// EnvAddr is the environment variable naming an external server to use
// instead of starting one.
const EnvAddr = "REDISTEST_ADDR"

// Server is a running redis-server.
type Server struct {
	// Addr is the server's host:port.
	Addr string

	s *serverproc.Server
}

// Start starts the server (no RDB snapshots, no AOF, loopback only) and
// registers its stop with t.Cleanup. It blocks until the server answers PING.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := serverBinary()
	s := serverproc.Start(t, serverproc.Spec{
		Name:    bin,
		Binary:  bin,
		EnvAddr: EnvAddr,
		Args: func(port int) []string {
			return []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
				"--save", "", "--appendonly", "no", "--daemonize", "no"}
		},
		Ready: func(ctx context.Context, addr string) error {
			return serverproc.Probe(ctx, addr, "PING\r\n", "+PONG")
		},
	})
	return &Server{Addr: s.Addr, s: s}
}

// Restart stops the server and starts it again on the same address; with
// persistence off every key is lost, as on a restart or a failover to an
// empty replica. It skips the test for an external server.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.s.Restart(t)
}

// Stop stops the server now; clients then get connection errors.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	s.s.Stop(t)
}

// External reports whether the server came from REDISTEST_ADDR.
func (s *Server) External() bool { return s.s.External() }

// serverBinary returns redis-server, or valkey-server when only that is
// installed.
func serverBinary() string {
	if _, err := exec.LookPath("redis-server"); err != nil {
		if _, verr := exec.LookPath("valkey-server"); verr == nil {
			return "valkey-server"
		}
	}
	return "redis-server"
}
