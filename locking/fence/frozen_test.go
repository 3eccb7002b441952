//go:build unix

package fence_test

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"cloud.google.com/go/datastore"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/fence/dsfence"
	"github.com/taskguard/taskguard/locking/fence/sqlfence"
	"github.com/taskguard/taskguard/locking/fence/sqlfence/pgtest"
)

// Environment of the holder process (the test binary re-executed).
const (
	holderEnv  = "FENCE_TEST_HOLDER" // the store written to: datastore or postgres
	hostEnv    = "FENCE_TEST_DATASTORE_HOST"
	projectEnv = "FENCE_TEST_DATASTORE_PROJECT"
	dsnEnv     = "FENCE_TEST_POSTGRES_DSN"
)

const (
	// frozenTrials is how many times the holder is frozen past its lease,
	// per store.
	frozenTrials = 20
	// frozenLease is the lease of the locks in the frozen-holder test: the
	// holder stays stopped a little longer.
	frozenLease = 400 * time.Millisecond
	frozenID    = "order-frozen"
	// takerLease is the lease of the process that takes the lock over.
	takerLease = 10 * time.Second
)

// store is where both processes write the order: a Datastore entity or a
// PostgreSQL row, each fenced, each recording the token of its writer.
type store interface {
	// write records tok as the order's writer, fenced with tok.
	write(ctx context.Context, tok fence.Token) error
	// writer returns the token of the order's last writer.
	writer(ctx context.Context) (int64, error)
}

type dsStore struct{ c *datastore.Client }

type orderEntity struct{ Writer int64 }

func (s dsStore) write(ctx context.Context, tok fence.Token) error {
	_, err := s.c.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
		if err := dsfence.Check(tx, frozenID, tok); err != nil {
			return err
		}
		_, err := tx.Put(datastore.NameKey("Order", frozenID, nil), &orderEntity{Writer: int64(tok.Value)})
		return err
	})
	return err
}

func (s dsStore) writer(ctx context.Context) (int64, error) {
	var o orderEntity
	err := s.c.Get(ctx, datastore.NameKey("Order", frozenID, nil), &o)
	return o.Writer, err
}

type sqlStore struct{ db *sql.DB }

func (s sqlStore) write(ctx context.Context, tok fence.Token) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := sqlfence.Check(ctx, tx, frozenID, tok); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, writer) VALUES ($1, $2)
		ON CONFLICT (id) DO UPDATE SET writer = EXCLUDED.writer`, frozenID, int64(tok.Value)); err != nil {
		return err
	}
	return tx.Commit()
}

func (s sqlStore) writer(ctx context.Context) (int64, error) {
	var w int64
	err := s.db.QueryRowContext(ctx, `SELECT writer FROM orders WHERE id = $1`, frozenID).Scan(&w)
	return w, err
}

// locksOn returns a locking client on the Firestore emulator at host, with
// the frozen test's lease, and a Datastore client on the same emulator.
func locksOn(ctx context.Context, host, project string) (*locking.Client, *datastore.Client, func(), error) {
	cc, err := grpc.NewClient(host, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, nil, err
	}
	b, err := dslock.New(ctx, dslock.Options{ProjectID: project, Conn: cc, ClockSkew: 10 * time.Millisecond})
	if err != nil {
		cc.Close()
		return nil, nil, nil, err
	}
	c, err := locking.New(locking.Config{Strong: b, Lease: frozenLease, MaxBackoff: 100 * time.Millisecond})
	if err != nil {
		cc.Close()
		return nil, nil, nil, err
	}
	dc, err := datastore.NewClient(ctx, project, option.WithGRPCConn(cc))
	if err != nil {
		cc.Close()
		return nil, nil, nil, err
	}
	return c, dc, func() { dc.Close(); cc.Close() }, nil
}

// holder is the frozen process. It reads commands on standard input:
// "acquire" takes the lock and answers "held <token>"; "write" writes the
// order with that token and answers "write <landed|stale|error> lost=<bool>
// <detail>", where lost says whether the write's error and then the lock
// itself (Done, Err, within 5 s) told it that it lost the lock.
func holder() int {
	ctx := context.Background()
	c, dc, closeAll, err := locksOn(ctx, os.Getenv(hostEnv), os.Getenv(projectEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer closeAll()
	var st store = dsStore{dc}
	if os.Getenv(holderEnv) == "postgres" {
		db, err := sql.Open(pgtest.Driver, os.Getenv(dsnEnv))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer db.Close()
		st = sqlStore{db}
	}
	var l *locking.Lock
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch in.Text() {
		case "acquire":
			var err error
			if l, err = c.Acquire(ctx, frozenID, locking.MaxWait(10*time.Second)); err != nil {
				fmt.Println("error", err)
				continue
			}
			fmt.Println("held", l.Token())
		case "write":
			err := st.write(ctx, fence.Of(l))
			outcome := "landed"
			switch {
			case errors.Is(err, fence.ErrStale):
				outcome = "stale"
			case err != nil:
				outcome = "error"
			}
			lost := errors.Is(err, locking.ErrLockLost)
			select {
			case <-l.Done():
				lost = lost && errors.Is(l.Err(), locking.ErrLockLost)
			case <-time.After(5 * time.Second):
				lost = false
			}
			rerr := l.Release(ctx) // refused: wraps ErrNotHeld
			fmt.Printf("write %s lost=%v %v; release: %v\n", outcome, lost, err, rerr)
		}
	}
	return 0
}

// TestFrozenHolder freezes a real holder process with SIGSTOP past its
// lease, frozenTrials times per store. Each time this process takes the lock
// over and writes the order through the fence; then the holder is resumed
// with SIGCONT and writes with its old token: the write must be refused as
// stale, the order must keep this process's write, and the holder must learn
// from the refusal and from its lock that it lost the lock.
func TestFrozenHolder(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test skipped in -short mode")
	}
	e := emulators.Get(t, dstest.Firestore, true)
	ctx := t.Context()
	c, dc, closeAll, err := locksOn(ctx, e.Host, e.ProjectID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeAll)
	t.Run("datastore", func(t *testing.T) {
		frozenTrialsOn(t, c, dsStore{dc}, e, "")
	})
	t.Run("postgres", func(t *testing.T) {
		pg := pgtest.Start(t)
		db := pg.Open(t)
		if err := sqlfence.CreateTable(ctx, db); err != nil {
			t.Fatal(err)
		}
		if _, err := db.ExecContext(ctx, `CREATE TABLE orders (id text PRIMARY KEY, writer bigint NOT NULL)`); err != nil {
			t.Fatal(err)
		}
		frozenTrialsOn(t, c, sqlStore{db}, e, pg.DSN)
	})
}

func frozenTrialsOn(t *testing.T, c *locking.Client, st store, e *dstest.Emulator, dsn string) {
	ctx := t.Context()
	kind := "datastore"
	if dsn != "" {
		kind = "postgres"
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), holderEnv+"="+kind, hostEnv+"="+e.Host, projectEnv+"="+e.ProjectID, dsnEnv+"="+dsn)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		// A holder left stopped by a failed trial is resumed; closing its
		// input ends it.
		_ = syscall.Kill(pid, syscall.SIGCONT)
		stdin.Close()
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("holder: %v; stderr:\n%s", err, stderr.String())
			}
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			t.Errorf("holder did not exit when its input closed; stderr:\n%s", stderr.String())
		}
	})
	out := bufio.NewReader(stdout)
	ask := func(cmd string) string {
		t.Helper()
		if _, err := io.WriteString(stdin, cmd+"\n"); err != nil {
			t.Fatal(err)
		}
		line, err := out.ReadString('\n')
		if err != nil {
			t.Fatalf("holder: %v; stderr:\n%s", err, stderr.String())
		}
		return strings.TrimSpace(line)
	}

	landed, refused := 0, 0
	for trial := range frozenTrials {
		held := ask("acquire")
		tokA, err := strconv.ParseUint(strings.TrimPrefix(held, "held "), 10, 64)
		if err != nil {
			t.Fatalf("trial %d: holder answered %q", trial, held)
		}
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		// The holder's lease runs out while it is stopped; this process
		// then takes the lock over and writes. Its own lease is long: a
		// loaded machine must not make it lose the lock too.
		l, err := c.Acquire(ctx, frozenID, locking.MaxWait(10*time.Second), locking.Lease(takerLease))
		if err != nil {
			t.Fatalf("trial %d: take over: %v", trial, err)
		}
		tokB := l.Token()
		if tokB <= tokA {
			t.Fatalf("trial %d: took over with token %d, not above the frozen holder's %d", trial, tokB, tokA)
		}
		if err := st.write(ctx, fence.Of(l)); err != nil {
			t.Fatalf("trial %d: the new holder's write: %v", trial, err)
		}
		if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		res := ask("write")
		w, err := st.writer(ctx)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case w != int64(tokB):
			landed++
			t.Errorf("trial %d: the order was written by token %d after the frozen holder (token %d) resumed, want the new holder's %d; holder: %s", trial, w, tokA, tokB, res)
		case !strings.HasPrefix(res, "write stale lost=true "):
			t.Errorf("trial %d: the frozen holder (token %d, new holder %d) answered %q, want a stale refusal and the loss learnt", trial, tokA, tokB, res)
		default:
			refused++
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%s: %d frozen-holder trials: %d stale writes refused, %d landed", kind, frozenTrials, refused, landed)
}
