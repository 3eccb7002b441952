package dsfence_test

import (
	"context"
	"errors"
	"log"

	"cloud.google.com/go/datastore"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/fence/dsfence"
	"github.com/taskguard/taskguard/tasks"
)

// A Cloud Tasks job writes through the fence of the task's lock. (Examples
// here are compiled, not run: they need a Datastore.)
func ExampleCheck() {
	ds, err := datastore.NewClient(context.Background(), "my-project")
	if err != nil {
		log.Fatal(err)
	}
	worker, err := tasks.NewWorker(locking.Default())
	if err != nil {
		log.Fatal(err)
	}
	worker.Handle("ship-order", func(ctx context.Context, d *tasks.Delivery) error {
		// A refused check (fence.ErrStale: this delivery lost its lock
		// while frozen, and a later holder has written) writes nothing;
		// the error fails the delivery, and Cloud Tasks' retry runs the
		// job again under a new token.
		_, err := ds.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
			if err := dsfence.Check(tx, d.LockID, fence.FromContext(ctx)); err != nil {
				return err
			}
			_, err := tx.Put(datastore.NameKey("Shipment", d.TaskName, nil), &struct{ Order string }{d.LockID})
			return err
		})
		return err
	})
}

type Account struct {
	Balance int64
	Fence   dsfence.Field
}

// The fence kept on the entity itself: no RPC of its own.
func ExampleField() {
	ds, err := datastore.NewClient(context.Background(), "my-project")
	if err != nil {
		log.Fatal(err)
	}
	err = locking.With(context.Background(), "account-7", func(ctx context.Context) error {
		key := datastore.NameKey("Account", "7", nil)
		_, err := ds.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
			var a Account
			if err := tx.Get(key, &a); err != nil && !errors.Is(err, datastore.ErrNoSuchEntity) {
				return err
			}
			if err := a.Fence.Admit("account-7", fence.FromContext(ctx)); err != nil {
				return err
			}
			a.Balance += 100
			_, err := tx.Put(key, &a)
			return err
		})
		return err
	})
	if err != nil {
		log.Print(err)
	}
}
