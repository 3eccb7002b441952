package shop

import (
	"os"
	"time"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"

	"github.com/taskguard/taskguard/app"
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
	s := &Shop{Tasks: tasks.LazyClientFromEnv(), Work: workFromEnv()}
	functions.HTTP("Checkout", s.Checkout())
	app.Register(functions.HTTP, app.Functions{Worker: "ShopWorker", CleanupLocks: "ShopCleanupLocks"},
		app.WithJob(ReceiptJob, s.SendReceipt))
}

// workFromEnv reads SHOP_CHECKOUT_WORK, how long a checkout's payment takes
// (a Go duration, 100ms by default).
func workFromEnv() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("SHOP_CHECKOUT_WORK")); err == nil && d >= 0 {
		return d
	}
	return 100 * time.Millisecond
}
