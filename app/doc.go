// Package app is taskguard's three Cloud Run functions as a library, for a
// functions project of its own:
//
//   - Worker, the Cloud Tasks target: runs each task's job under the task's
//     lock. A task whose lock is busy is parked and handed the lock by its
//     holder (park mode, the default where the deployment can; see New), or
//     answered 429 with Retry-After (TASKGUARD_BUSY=429; see tasks.Worker).
//   - Enqueue, an authenticated endpoint that enqueues a task.
//   - CleanupLocks, the Cloud Scheduler target: deletes expired Datastore
//     lock entities and answers a JSON CleanupReport.
//
// Register registers the ones a project chooses, under the names it
// chooses, with the Functions Framework:
//
//	func init() {
//		app.Register(functions.HTTP, app.Functions{Worker: "ShopWorker", CleanupLocks: "ShopCleanupLocks"},
//			app.WithJob("send-receipt", sendReceipt))
//	}
//
// Importing the package registers nothing, sets no global logger and links
// no lock backend but Datastore's (for CleanupLocks): the program imports the
// backends it wants (locking/dslock, locking/mclock, locking/redislock). The
// functions take their locks from the client given with WithLocks or else
// locking.Default(), the client the rest of the program shares, and read
// their configuration from the environment (ConfigFromEnv) at the first
// request; New builds an App from a Config directly, for tests and servers
// of one's own. The module's root package is taskguard's own deployable,
// which registers all three under DefaultFunctions.
package app
