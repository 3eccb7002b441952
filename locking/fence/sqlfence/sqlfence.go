// Package sqlfence keeps a fence (see package fence) in a PostgreSQL table,
// inside the caller's own database/sql transaction, so that the check and
// the write it guards commit together or not at all:
//
//	tx, err := db.BeginTx(ctx, nil)
//	...
//	defer tx.Rollback()
//	if err := sqlfence.Check(ctx, tx, "order-42", fence.FromContext(ctx)); err != nil {
//		return err // errors.Is(err, fence.ErrStale): this holder lost its lock
//	}
//	_, err = tx.ExecContext(ctx, "UPDATE orders SET ... WHERE id = $1", 42)
//	...
//	return tx.Commit()
//
// The fence table keeps one row per lock id (CreateTable makes it). Check
// is one statement, one round trip: an upsert that raises the row's token to
// the caller's when it is higher, leaves it when it is not, and returns what
// the row holds. It writes and locks the row every time, so a second holder
// checking the same lock id waits for the first one's transaction to end and
// then sees its token: a stale holder is refused however the two
// transactions interleave. It works at every isolation level; at REPEATABLE
// READ and SERIALIZABLE a concurrent raise fails the later transaction with
// a serialization error (SQLSTATE 40001), to be retried as usual.
//
// It speaks PostgreSQL (the SQL of Cloud SQL for PostgreSQL and AlloyDB)
// through any database/sql driver, such as github.com/jackc/pgx/v5/stdlib.
package sqlfence

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/fence"
)

// DefaultTable is the fence table when Table.Name is empty.
const DefaultTable = "taskguard_fence"

// ErrNoTable reports a fence table that does not exist: create it with
// CreateTable (or Table.Create) before the first Check.
var ErrNoTable = errors.New("sqlfence: the fence table does not exist (create it with sqlfence.CreateTable)")

// Table names the fence table. The zero value is DefaultTable in the
// connection's search path.
type Table struct {
	// Name is the table, optionally schema-qualified ("app.fences"): one or
	// two identifiers of letters, digits and underscores, not starting with
	// a digit. Empty means DefaultTable.
	Name string
}

var identRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$`)

// quoted returns the table's name quoted for SQL, or an error wrapping
// locking.ErrInvalid.
func (t Table) quoted() (string, error) {
	name := t.Name
	if name == "" {
		name = DefaultTable
	}
	if !identRE.MatchString(name) {
		return "", fmt.Errorf("sqlfence: table name %q: want [schema.]name of letters, digits and underscores: %w", name, locking.ErrInvalid)
	}
	parts := strings.Split(name, ".")
	for i, p := range parts {
		parts[i] = `"` + p + `"`
	}
	return strings.Join(parts, "."), nil
}

// Execer is what Create needs: a *sql.DB, *sql.Conn or *sql.Tx.
type Execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// CreateTable is Table{}.Create.
func CreateTable(ctx context.Context, db Execer) error { return Table{}.Create(ctx, db) }

// Create creates the fence table if it does not exist. The table has one
// row per lock id: id_hash (the hex SHA-256 of the id, its primary key, so
// any id fits), lock_id, token (the highest accepted, a positive bigint) and
// format (fence.Format, the mark of rows this package wrote).
func (t Table) Create(ctx context.Context, db Execer) error {
	q, err := t.quoted()
	if err != nil {
		return err
	}
	_, err = db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS `+q+` (
	id_hash text PRIMARY KEY,
	lock_id text NOT NULL,
	token   bigint NOT NULL CHECK (token > 0),
	format  text NOT NULL
)`)
	if err != nil {
		return fmt.Errorf("sqlfence: create table %s: %w", q, err)
	}
	return nil
}

// Check is Table{}.Check.
func Check(ctx context.Context, tx *sql.Tx, lockID string, tok fence.Token) error {
	return Table{}.Check(ctx, tx, lockID, tok)
}

// Check admits tok for the resource guarded by lockID, in tx, by the rule of
// fence.State.Admit: it returns nil when tok is at least the highest token
// the fence table holds for lockID (raising it when tok is higher), and
// otherwise an error, leaving the row as it was: a *fence.StaleError
// (errors.Is fence.ErrStale and locking.ErrLockLost) for a lower token,
// fence.ErrInvalid for a zero token, one without a lock id, a nil tx or a
// bad table name (checked before any I/O), fence.ErrWrongLock for a token of
// another lock id than lockID, fence.ErrForeign for a row or a table that
// this package did not write, ErrNoTable when the table is missing, or the
// driver's error. On any error the caller must roll tx back (PostgreSQL has
// aborted it when the statement failed).
//
// Check is one statement (one round trip) and writes one row version.
func (t Table) Check(ctx context.Context, tx *sql.Tx, lockID string, tok fence.Token) error {
	if _, _, err := (fence.State{}).Admit(lockID, tok); err != nil {
		return err // bad input: before any I/O
	}
	if tx == nil {
		return fmt.Errorf("%w: nil transaction", fence.ErrInvalid)
	}
	q, err := t.quoted()
	if err != nil {
		return fmt.Errorf("%w: %w", fence.ErrInvalid, err)
	}
	sum := sha256.Sum256([]byte(lockID))
	// The row keeps its values unless it is ours, for this lock id, and the
	// token rises; RETURNING shows what it holds after the statement.
	var (
		format, rowID sql.NullString
		highest       sql.NullInt64
	)
	err = tx.QueryRowContext(ctx, `INSERT INTO `+q+` AS f (id_hash, lock_id, token, format)
VALUES ($1, $2, $3, $4)
ON CONFLICT (id_hash) DO UPDATE SET token =
	CASE WHEN f.format = EXCLUDED.format AND f.lock_id = EXCLUDED.lock_id
	THEN GREATEST(f.token, EXCLUDED.token) ELSE f.token END
RETURNING f.format, f.lock_id, f.token`,
		hex.EncodeToString(sum[:]), lockID, int64(tok.Value), fence.Format).Scan(&format, &rowID, &highest)
	if err != nil {
		return classify(q, lockID, err)
	}
	if !format.Valid || !rowID.Valid || !highest.Valid || highest.Int64 <= 0 {
		return fmt.Errorf("%w: row of %q in %s holds format %v, lock_id %v, token %v", fence.ErrForeign, lockID, q, format, rowID, highest)
	}
	// After the statement the row holds max(old, tok) when it is ours, so
	// it holds tok exactly when tok was admitted.
	st := fence.State{Format: format.String, LockID: rowID.String, Highest: uint64(highest.Int64)}
	if _, _, err := st.Admit(lockID, tok); err != nil {
		return fmt.Errorf("sqlfence: %s: %w", q, err)
	}
	return nil
}

// classify turns PostgreSQL's errors about the table into the package's.
func classify(table, lockID string, err error) error {
	var coded interface{ SQLState() string }
	if errors.As(err, &coded) {
		switch coded.SQLState() {
		case "42P01": // undefined_table
			return fmt.Errorf("%w: %s: %w", ErrNoTable, table, err)
		case "42703", "42P10", "42804", "23502", "23514": // undefined_column, no unique key for ON CONFLICT, datatype mismatch, not null, check
			return fmt.Errorf("%w: table %s is not a fence table: %w", fence.ErrForeign, table, err)
		}
	}
	return fmt.Errorf("sqlfence: check %q in %s: %w", lockID, table, err)
}
