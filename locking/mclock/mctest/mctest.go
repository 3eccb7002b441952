// Package mctest starts a real memcached for tests, the way net/http/httptest
// starts an HTTP server: on a free port on 127.0.0.1, stopped by its pid when
// the test ends.
//
// It runs the memcached binary from PATH (Debian package "memcached").
// When it is missing, Start fails the test if the environment variable CI is
// "true" and skips it otherwise. When MCTEST_ADDR is set (host:port), Start
// uses that server instead of starting one; it is then shared, so tests must
// use their own keys, and Restart skips.
package mctest

import (
	"context"
	"os"
	"strconv"
	"testing"

	"github.com/taskguard/taskguard/locking/internal/serverproc"
)

// EnvAddr is the environment variable naming an external memcached to use
// instead of starting one.
const EnvAddr = "MCTEST_ADDR"

// Server is a running memcached.
type Server struct {
	// Addr is the server's host:port.
	Addr string

	s *serverproc.Server
}

// Start starts memcached (UDP off, 64 MB, loopback only) and registers its
// stop with t.Cleanup. It blocks until the server answers "version".
func Start(t testing.TB) *Server {
	t.Helper()
	s := serverproc.Start(t, serverproc.Spec{
		Name:    "memcached",
		Binary:  "memcached",
		EnvAddr: EnvAddr,
		Args: func(port int) []string {
			args := []string{"-l", "127.0.0.1", "-p", strconv.Itoa(port), "-U", "0", "-m", "64"}
			if os.Geteuid() == 0 {
				// memcached refuses to run as root unless told which user to be.
				args = append(args, "-u", "root")
			}
			return args
		},
		Ready: func(ctx context.Context, addr string) error {
			return serverproc.Probe(ctx, addr, "version\r\n", "VERSION ")
		},
	})
	return &Server{Addr: s.Addr, s: s}
}

// Restart stops memcached and starts it again on the same address, so every
// item is lost, as on a real server restart. It skips the test for an
// external server.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.s.Restart(t)
}

// Stop stops memcached now; clients then get connection errors.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	s.s.Stop(t)
}

// External reports whether the server came from MCTEST_ADDR.
func (s *Server) External() bool { return s.s.External() }
