// Package pgtest starts a real PostgreSQL server for tests, the way
// mctest and redistest start memcached and redis-server: a fresh cluster
// (initdb) in a temporary directory, a postmaster on a free loopback port,
// both stopped and removed in t.Cleanup. The server trusts local
// connections (no password) and keeps nothing durable (fsync off).
//
// The binaries come from PATH or from Debian's /usr/lib/postgresql/*/bin
// (the postgresql package; make deps installs it). PostgreSQL refuses to run
// as root, so as root the server runs as the user postgres (nobody when
// there is none). When the binaries are missing, Start fails the test if the
// environment variable CI is "true" and skips it otherwise.
package pgtest

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver

	"github.com/taskguard/taskguard/locking/internal/serverproc"
)

// Driver is the database/sql driver name DSN is meant for.
const Driver = "pgx"

// Server is a running PostgreSQL server.
type Server struct {
	// DSN is the connection string of its database "postgres" as user
	// "postgres", for sql.Open(Driver, DSN).
	DSN string
	// Addr is its host:port on 127.0.0.1.
	Addr string
}

// Start initialises a cluster and starts PostgreSQL on it for t. It stops
// the server and removes its files in t.Cleanup.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := binDir()
	if err != nil {
		msg := "pgtest: " + err.Error() + " (install the Debian package postgresql: make deps)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	cred, err := credential()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) }) // after the server's stop (cleanups run last first)
	data := filepath.Join(dir, "data")
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			t.Fatalf("pgtest: %v", err)
		}
	}
	asUser := func(cmd *exec.Cmd) {
		cmd.Dir = dir
		if cred != nil {
			if cmd.SysProcAttr == nil {
				cmd.SysProcAttr = &syscall.SysProcAttr{}
			}
			cmd.SysProcAttr.Credential = cred
		}
	}
	initdb := exec.Command(filepath.Join(bin, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
	asUser(initdb)
	if out, err := initdb.CombinedOutput(); err != nil {
		t.Fatalf("pgtest: initdb: %v\n%s", err, out)
	}
	srv := serverproc.Start(t, serverproc.Spec{
		Name:   "postgres",
		Binary: filepath.Join(bin, "postgres"),
		Args: func(port int) []string {
			return []string{"-D", data, "-p", strconv.Itoa(port), "-k", "",
				"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
				"-c", "synchronous_commit=off", "-c", "full_page_writes=off"}
		},
		Ready:      ready,
		Setup:      asUser,
		StopSignal: syscall.SIGQUIT, // immediate shutdown, shared memory removed
	})
	return &Server{DSN: dsn(srv.Addr), Addr: srv.Addr}
}

// Open returns a database handle on s, closed in t.Cleanup.
func (s *Server) Open(t testing.TB) *sql.DB {
	t.Helper()
	db, err := sql.Open(Driver, s.DSN)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func dsn(addr string) string {
	return "postgres://postgres@" + addr + "/postgres?sslmode=disable"
}

// ready opens one connection and pings it: PostgreSQL accepts connections
// before it can serve them ("the database system is starting up").
func ready(ctx context.Context, addr string) error {
	db, err := sql.Open(Driver, dsn(addr))
	if err != nil {
		return err
	}
	defer db.Close()
	return db.PingContext(ctx)
}

// binDir finds the directory of initdb and postgres.
func binDir() (string, error) {
	if p, err := exec.LookPath("postgres"); err == nil {
		if _, err := exec.LookPath("initdb"); err == nil {
			return filepath.Dir(p), nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int { // highest version first
		va, _ := strconv.Atoi(filepath.Base(filepath.Dir(a)))
		vb, _ := strconv.Atoi(filepath.Base(filepath.Dir(b)))
		return vb - va
	})
	for _, d := range dirs {
		if fileExists(filepath.Join(d, "postgres")) && fileExists(filepath.Join(d, "initdb")) {
			return d, nil
		}
	}
	return "", fmt.Errorf("postgres and initdb not found in PATH or /usr/lib/postgresql/*/bin")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// credential returns the user to run the server as: nil (this process's)
// unless this process is root, which PostgreSQL refuses.
func credential() (*syscall.Credential, error) {
	if os.Getuid() != 0 {
		return nil, nil
	}
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
		gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
	}
	return nil, fmt.Errorf("running as root, and neither user postgres nor nobody exists to run the server as")
}
