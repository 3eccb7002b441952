package sqlfence_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/fence/sqlfence"
	"github.com/taskguard/taskguard/locking/fence/sqlfence/pgtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// newDB starts a server with a fence table and an orders table.
func newDB(t *testing.T) *sql.DB {
	t.Helper()
	db := pgtest.Start(t).Open(t)
	if err := sqlfence.CreateTable(t.Context(), db); err != nil {
		t.Fatal(err)
	}
	if err := sqlfence.CreateTable(t.Context(), db); err != nil { // idempotent
		t.Fatal(err)
	}
	if _, err := db.ExecContext(t.Context(), `CREATE TABLE orders (id text PRIMARY KEY, writer bigint NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return db
}

// write records tok as the writer of order lockID in a transaction fenced
// with tok, the way the package documentation shows.
func write(ctx context.Context, db *sql.DB, table sqlfence.Table, lockID string, tok fence.Token) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := table.Check(ctx, tx, lockID, tok); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, writer) VALUES ($1, $2)
		ON CONFLICT (id) DO UPDATE SET writer = EXCLUDED.writer`, lockID, int64(tok.Value)); err != nil {
		return err
	}
	return tx.Commit()
}

// writer returns the writer of order id, 0 when there is none.
func writer(t *testing.T, db *sql.DB, id string) int64 {
	t.Helper()
	var w int64
	err := db.QueryRowContext(t.Context(), `SELECT writer FROM orders WHERE id = $1`, id).Scan(&w)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		t.Fatal(err)
	}
	return w
}

func TestCheck(t *testing.T) {
	db := newDB(t)
	ctx := t.Context()
	tok := func(v uint64) fence.Token { return fence.Token{LockID: "order-42", Value: v} }
	for _, step := range []struct {
		tok     fence.Token
		wantErr error
		writer  int64
	}{
		{tok(10), nil, 10},
		{tok(10), nil, 10},
		{tok(12), nil, 12},
		{tok(11), fence.ErrStale, 12},
		{tok(3), locking.ErrLockLost, 12},
		{tok(12), nil, 12},
	} {
		err := write(ctx, db, sqlfence.Table{}, "order-42", step.tok)
		if !errors.Is(err, step.wantErr) || (err == nil) != (step.wantErr == nil) {
			t.Fatalf("write with token %d: %v, want %v", step.tok.Value, err, step.wantErr)
		}
		if got := writer(t, db, "order-42"); got != step.writer {
			t.Fatalf("after token %d the order was written by %d, want %d", step.tok.Value, got, step.writer)
		}
	}
	var lockID, format string
	var token int64
	if err := db.QueryRowContext(ctx, `SELECT lock_id, token, format FROM taskguard_fence`).Scan(&lockID, &token, &format); err != nil {
		t.Fatal(err)
	}
	if lockID != "order-42" || token != 12 || format != fence.Format {
		t.Fatalf("fence row = (%q, %d, %q), want (order-42, 12, %q)", lockID, token, format, fence.Format)
	}
}

// TestRacingHolders interleaves two transactions: the next holder checks
// first and commits while the stale one is inside its check; the stale one
// is refused all the same.
func TestRacingHolders(t *testing.T) {
	db := newDB(t)
	ctx := t.Context()
	if err := write(ctx, db, sqlfence.Table{}, "o", fence.Token{LockID: "o", Value: 5}); err != nil {
		t.Fatal(err)
	}
	next, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer next.Rollback()
	if err := sqlfence.Check(ctx, next, "o", fence.Token{LockID: "o", Value: 7}); err != nil {
		t.Fatal(err)
	}
	stale := make(chan error, 1)
	go func() { stale <- write(ctx, db, sqlfence.Table{}, "o", fence.Token{LockID: "o", Value: 5}) }()
	if _, err := next.ExecContext(ctx, `UPDATE orders SET writer = 7 WHERE id = 'o'`); err != nil {
		t.Fatal(err)
	}
	if err := next.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := <-stale; !errors.Is(err, fence.ErrStale) {
		t.Fatalf("the stale holder's write: %v, want ErrStale", err)
	}
	if w := writer(t, db, "o"); w != 7 {
		t.Fatalf("order written by %d, want 7", w)
	}
}

func TestBadInput(t *testing.T) {
	db := newDB(t)
	ctx := t.Context()
	// Rows another application wrote: another format, another lock id at
	// the hash of this one's.
	if _, err := db.ExecContext(ctx, `INSERT INTO taskguard_fence VALUES
		(encode(sha256('other-format'), 'hex'), 'other-format', 3, 'acme/2'),
		(encode(sha256('other-id'), 'hex'), 'somebody-else', 3, $1)`, fence.Format); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE not_a_fence (id_hash text PRIMARY KEY, owner text)`); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		table  sqlfence.Table
		lockID string
		tok    fence.Token
		want   error
	}{
		{"zero token", sqlfence.Table{}, "a", fence.Token{}, fence.ErrInvalid},
		{"token 0", sqlfence.Table{}, "a", fence.Token{LockID: "a"}, fence.ErrInvalid},
		{"token above MaxToken", sqlfence.Table{}, "a", fence.Token{LockID: "a", Value: fence.MaxToken + 1}, fence.ErrInvalid},
		{"token of another lock", sqlfence.Table{}, "a", fence.Token{LockID: "b", Value: 9}, fence.ErrWrongLock},
		{"row with another format", sqlfence.Table{}, "other-format", fence.Token{LockID: "other-format", Value: 9}, fence.ErrForeign},
		{"row of another lock id", sqlfence.Table{}, "other-id", fence.Token{LockID: "other-id", Value: 9}, fence.ErrWrongLock},
		{"table of another shape", sqlfence.Table{Name: "not_a_fence"}, "a", fence.Token{LockID: "a", Value: 9}, fence.ErrForeign},
		{"missing table", sqlfence.Table{Name: "nowhere"}, "a", fence.Token{LockID: "a", Value: 9}, sqlfence.ErrNoTable},
		{"bad table name", sqlfence.Table{Name: "x; DROP TABLE orders"}, "a", fence.Token{LockID: "a", Value: 9}, locking.ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := write(ctx, db, tc.table, tc.lockID, tc.tok); !errors.Is(err, tc.want) {
				t.Fatalf("write: %v, want %v", err, tc.want)
			}
			if w := writer(t, db, tc.lockID); w != 0 {
				t.Fatalf("the refused write landed: writer %d", w)
			}
		})
	}
	var rows []string
	r, err := db.QueryContext(ctx, `SELECT lock_id || ' ' || token || ' ' || format FROM taskguard_fence ORDER BY lock_id`)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for r.Next() {
		var s string
		if err := r.Scan(&s); err != nil {
			t.Fatal(err)
		}
		rows = append(rows, s)
	}
	if err := r.Err(); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprint([]string{"other-format 3 acme/2", "somebody-else 3 " + fence.Format}); fmt.Sprint(rows) != want {
		t.Fatalf("fence rows = %v, want the foreign rows unchanged and nothing else: %v", rows, want)
	}
	if err := sqlfence.Check(ctx, nil, "a", fence.Token{LockID: "a", Value: 1}); !errors.Is(err, fence.ErrInvalid) {
		t.Fatalf("Check(nil tx) = %v, want ErrInvalid", err)
	}
	if err := (sqlfence.Table{Name: "1bad"}).Create(ctx, db); !errors.Is(err, locking.ErrInvalid) {
		t.Fatalf("Create with a bad name = %v, want locking.ErrInvalid", err)
	}
}

func TestSchemaQualifiedTable(t *testing.T) {
	db := newDB(t)
	ctx := t.Context()
	if _, err := db.ExecContext(ctx, `CREATE SCHEMA app`); err != nil {
		t.Fatal(err)
	}
	table := sqlfence.Table{Name: "app.fences"}
	if err := table.Create(ctx, db); err != nil {
		t.Fatal(err)
	}
	if err := write(ctx, db, table, "s", fence.Token{LockID: "s", Value: 2}); err != nil {
		t.Fatal(err)
	}
	if err := write(ctx, db, table, "s", fence.Token{LockID: "s", Value: 1}); !errors.Is(err, fence.ErrStale) {
		t.Fatalf("write with a lower token: %v, want ErrStale", err)
	}
}
