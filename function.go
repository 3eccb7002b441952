// Package taskguard is the deployable: three Cloud Run functions built on
// packages locking and tasks.
//
//   - Worker, the Cloud Tasks target: runs each task's job under the task's
//     lock, answering 429 with Retry-After when the lock is busy.
//   - Enqueue, an authenticated endpoint that enqueues a task.
//   - CleanupLocks, the Cloud Scheduler target: deletes expired Datastore
//     lock entities and answers a JSON report.
//
// They are registered with the Functions Framework when the package is
// imported; deploy with --entry-point=Worker, Enqueue or CleanupLocks.
// Register your own jobs with HandleJob from an init function. The
// configuration comes from the environment (see ConfigFromEnv): it is read
// and validated at start, with no network I/O, and every problem is logged in
// one error; the functions then answer 500 until it is fixed. The App behind
// them is built on the first request.
package taskguard

import (
	"context"
	"log/slog"
	"net/http"
	"os"
	"sync"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"

	"github.com/taskguard/taskguard/internal/cloudlog"
	"github.com/taskguard/taskguard/locking"

	// Lock backends, chosen by the environment (locking.FromEnvironment).
	_ "github.com/taskguard/taskguard/locking/dslock"
	_ "github.com/taskguard/taskguard/locking/mclock"
	_ "github.com/taskguard/taskguard/locking/redislock"
)

var (
	startCfg Config
	startErr error
	logger   *slog.Logger

	appOnce sync.Once
	app     *App
	appErr  error
)

func init() {
	startCfg, startErr = ConfigFromEnv(os.Getenv)
	logger = slog.New(cloudlog.NewHandler(os.Stdout, slog.LevelInfo, os.Getenv(EnvProject)))
	slog.SetDefault(logger)
	if startErr != nil {
		logger.Error("taskguard: the functions cannot start until the configuration is fixed", "error", startErr.Error())
	}
	functions.HTTP("Worker", serve((*App).Worker))
	functions.HTTP("Enqueue", serve((*App).Enqueue))
	functions.HTTP("CleanupLocks", serve((*App).CleanupLocks))
}

// getApp builds the App on first use.
func getApp() (*App, error) {
	appOnce.Do(func() {
		if startErr != nil {
			appErr = startErr
			return
		}
		app, appErr = NewApp(context.Background(), startCfg, logger)
		if appErr != nil {
			logger.Error("taskguard: cannot build the functions", "error", appErr.Error())
			return
		}
		// Jobs that call locking.With share the App's client and its queues.
		locking.SetDefault(app.Locks())
	})
	return app, appErr
}

// serve adapts one of the App's handlers into a function.
func serve(h func(*App) http.Handler) func(http.ResponseWriter, *http.Request) {
	var (
		once    sync.Once
		handler http.Handler
	)
	return func(w http.ResponseWriter, r *http.Request) {
		a, err := getApp()
		if err != nil {
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "taskguard is misconfigured; see the function's logs"})
			return
		}
		once.Do(func() { handler = h(a) })
		handler.ServeHTTP(w, r)
	}
}
