package sqlfence_test

import (
	"context"
	"database/sql"
	"log"

	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/fence/sqlfence"
)

// A write to Cloud SQL for PostgreSQL, fenced by the lock that guards it.
// (Compiled, not run: it needs a server.)
func ExampleCheck() {
	ctx := context.Background()
	db, err := sql.Open("pgx", "postgres://app@10.0.0.3/shop")
	if err != nil {
		log.Fatal(err)
	}
	if err := sqlfence.CreateTable(ctx, db); err != nil { // once, at deploy time
		log.Fatal(err)
	}
	err = locking.With(ctx, "order-42", func(ctx context.Context) error {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if err := sqlfence.Check(ctx, tx, "order-42", fence.FromContext(ctx)); err != nil {
			return err // errors.Is(err, fence.ErrStale): the lock was lost
		}
		if _, err := tx.ExecContext(ctx, `UPDATE orders SET state = 'shipped' WHERE id = 42`); err != nil {
			return err
		}
		return tx.Commit()
	})
	if err != nil {
		log.Print(err)
	}
}
