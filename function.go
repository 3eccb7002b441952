// Package taskguard is the deployable: importing it registers taskguard's
// three Cloud Run functions with the Functions Framework, under the names
// deploy/ gives them as entry points, and makes the Cloud Logging handler
// (package cloudlog) the default logger.
//
//   - Worker, the Cloud Tasks target: runs each task's job under the task's
//     lock; a task whose lock is busy is parked and handed the lock by its
//     holder (TASKGUARD_BUSY=park, the default where the deployment can) or
//     answered 429 with Retry-After (TASKGUARD_BUSY=429). Its answers are
//     listed in one table, in the README's Cloud Tasks section.
//   - Enqueue, an authenticated endpoint that enqueues a task.
//   - CleanupLocks, the Cloud Scheduler target: deletes expired Datastore
//     lock entities and answers a JSON report.
//
// It links every lock backend (Datastore, memcached, Valkey); the
// environment chooses among them (see app.ConfigFromEnv).
//
// A project of its own does not import this package: it uses the libraries
// — locking (and locking/lockhttp to guard its HTTP functions), tasks, and
// app to register the functions it wants under names it chooses, with its
// own jobs (app.Register). Importing those registers nothing and sets no
// global logger.
package taskguard

import (
	"log/slog"
	"time"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"

	"github.com/taskguard/taskguard/app"

	// Lock backends, chosen by the environment (locking.FromEnvironment).
	_ "github.com/taskguard/taskguard/locking/dslock"
	_ "github.com/taskguard/taskguard/locking/mclock"
	_ "github.com/taskguard/taskguard/locking/redislock"
)

func init() {
	slog.SetDefault(app.LoggerFromEnv())
	// At SIGTERM, end the deliveries in flight (their locks released and
	// handed on) before the instance is killed 10 s later.
	app.Register(functions.HTTP, app.DefaultFunctions, app.DrainOnSIGTERM(8*time.Second))
}
