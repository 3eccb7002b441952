package shop

import (
	"context"
	"os"
	"sync"
	"time"

	"cloud.google.com/go/datastore"
	"github.com/GoogleCloudPlatform/functions-framework-go/functions"

	"github.com/taskguard/taskguard/app"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/tasks"

	// Strong locks on Datastore when GOOGLE_CLOUD_PROJECT (or
	// DATASTORE_EMULATOR_HOST) is set.
	_ "github.com/taskguard/taskguard/locking/dslock"
)

// The deployed shop: one Shop, its Checkout function, and taskguard's
// Worker and CleanupLocks under the shop's own names, with the shop's job.
// Enqueue is left out: the shop enqueues from its own code.
func init() {
	// The queue comes from the environment deploy/ gives every function
	// (TASKGUARD_QUEUE, TASKGUARD_WORKER_URL, TASKGUARD_TASK_SERVICE_ACCOUNT,
	// TASKGUARD_TASK_DEADLINE; CLOUD_TASKS_EMULATOR_HOST locally). The client
	// is built on the first checkout, and built again after a start-up error
	// that may pass (credentials not found yet) instead of keeping it.
	s := &Shop{Tasks: tasks.LazyClientFromEnv(), Work: workFromEnv(), Orders: ordersFromEnv()}
	functions.HTTP("Checkout", s.Checkout())
	app.Register(functions.HTTP, app.Functions{Worker: "ShopWorker", CleanupLocks: "ShopCleanupLocks"},
		app.WithJob(ReceiptJob, s.SendReceipt), app.DrainOnSIGTERM(8*time.Second))
}

// workFromEnv reads SHOP_CHECKOUT_WORK, how long a checkout's payment takes
// (a Go duration, 100ms by default).
func workFromEnv() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("SHOP_CHECKOUT_WORK")); err == nil && d >= 0 {
		return d
	}
	return 100 * time.Millisecond
}

// ordersFromEnv keeps the orders in Datastore, beside the locks, when
// GOOGLE_CLOUD_PROJECT or DATASTORE_EMULATOR_HOST is set, and in memory
// otherwise.
func ordersFromEnv() Orders {
	if os.Getenv("GOOGLE_CLOUD_PROJECT") == "" && os.Getenv("DATASTORE_EMULATOR_HOST") == "" {
		return &MemoryOrders{}
	}
	return &lazyOrders{}
}

// lazyOrders is DatastoreOrders on a client made on first use (for the
// project DATASTORE_PROJECT_ID, GOOGLE_CLOUD_PROJECT or the credentials
// name), so that a cold start does no I/O before the first checkout.
type lazyOrders struct {
	once sync.Once
	d    DatastoreOrders
	err  error
}

func (l *lazyOrders) get() (DatastoreOrders, error) {
	l.once.Do(func() {
		project := os.Getenv("DATASTORE_PROJECT_ID")
		if project == "" {
			project = os.Getenv("GOOGLE_CLOUD_PROJECT")
		}
		if project == "" {
			project = datastore.DetectProjectID
		}
		l.d.Client, l.err = datastore.NewClient(context.Background(), project)
	})
	return l.d, l.err
}

func (l *lazyOrders) Charge(ctx context.Context, o Order, tok fence.Token) error {
	d, err := l.get()
	if err != nil {
		return err
	}
	return d.Charge(ctx, o, tok)
}

func (l *lazyOrders) Charged(ctx context.Context, id string) (uint64, bool, error) {
	d, err := l.get()
	if err != nil {
		return 0, false, err
	}
	return d.Charged(ctx, id)
}
