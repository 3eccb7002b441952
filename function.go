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
// them is built on the first request; should that fail for another reason
// (credentials or the metadata server not reachable yet), the functions
// answer 503 with Retry-After and a later request builds it again, after a
// backoff of 1 s doubling up to 1 min.
package taskguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"

	"github.com/taskguard/taskguard/cloudlog"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/tasks"

	// Lock backends, chosen by the environment (locking.FromEnvironment).
	_ "github.com/taskguard/taskguard/locking/dslock"
	_ "github.com/taskguard/taskguard/locking/mclock"
	_ "github.com/taskguard/taskguard/locking/redislock"
)

// theApp is the functions' App, built from the environment on first use.
var theApp = &lazyApp{build: buildFromEnv, now: time.Now}

func init() {
	// Validate at start so that a bad deployment says what is wrong in its
	// first log line; the App itself is built on the first request.
	if _, err := ConfigFromEnv(os.Getenv); err != nil {
		newLogger().Error("taskguard: the functions cannot start until the configuration is fixed", "error", err.Error())
	}
	functions.HTTP("Worker", serve((*App).Worker))
	functions.HTTP("Enqueue", serve((*App).Enqueue))
	functions.HTTP("CleanupLocks", serve((*App).CleanupLocks))
}

// newLogger returns the functions' logger: JSON lines for Cloud Logging on
// standard output, at TASKGUARD_LOG_LEVEL (debug, info, warn or error;
// info by default).
func newLogger() *slog.Logger {
	var level slog.Level
	if err := level.UnmarshalText([]byte(os.Getenv(EnvLogLevel))); err != nil {
		level = slog.LevelInfo
	}
	return slog.New(cloudlog.NewHandler(os.Stdout, level, os.Getenv(EnvProject)))
}

// buildFromEnv builds the App from the environment: what the deployed
// functions run. It makes the Cloud Logging handler the default logger
// first, so that the default lock client, built then unless the program used
// it before, logs in the same form.
func buildFromEnv() (*App, error) {
	log := newLogger()
	slog.SetDefault(log)
	cfg, err := ConfigFromEnv(os.Getenv)
	if err != nil {
		return nil, err
	}
	return NewApp(context.Background(), cfg, log)
}

// Bounds of the wait between two attempts to build the App after a failure
// that may pass (it doubles from the first to the second).
const (
	minBuildBackoff = time.Second
	maxBuildBackoff = time.Minute
)

// lazyApp builds the App on first use and keeps it. A configuration error
// (ErrConfig, locking.ErrInvalid, tasks.ErrInvalidConfig) can never fix
// itself and is kept too; any other failure (credentials or metadata not yet
// reachable, ...) is retried by a later request once a backoff has passed,
// so that the instance recovers when the cause is gone.
type lazyApp struct {
	build func() (*App, error)
	now   func() time.Time
	log   *slog.Logger // slog.Default() when nil

	mu        sync.Mutex
	app       *App          // guarded by mu; set once
	err       error         // the last failure; guarded by mu
	permanent bool          // err is a configuration error; guarded by mu
	backoff   time.Duration // the last wait; guarded by mu
	next      time.Time     // no attempt before then; guarded by mu
}

// errStarting is wrapped by get's error while a passing failure waits for
// its retry.
var errStarting = errors.New("taskguard: starting")

// get returns the App, building it when it is not yet built and no failure
// is kept or waiting out its backoff. It returns the kept or new failure
// otherwise: a configuration error as is, any other wrapped in errStarting
// with the time of the next attempt. Concurrent callers wait for one build.
func (l *lazyApp) get() (*App, time.Time, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.app != nil {
		return l.app, time.Time{}, nil
	}
	if l.err != nil && (l.permanent || l.now().Before(l.next)) {
		return nil, l.next, l.failure()
	}
	a, err := l.build()
	if err == nil {
		l.app, l.err = a, nil
		return a, time.Time{}, nil
	}
	l.err = err
	l.permanent = errors.Is(err, ErrConfig) || errors.Is(err, locking.ErrInvalid) ||
		errors.Is(err, locking.ErrNoStrongBackend) || errors.Is(err, tasks.ErrInvalidConfig)
	l.backoff = min(max(2*l.backoff, minBuildBackoff), maxBuildBackoff)
	l.next = l.now().Add(l.backoff)
	log := l.log
	if log == nil {
		log = slog.Default()
	}
	if l.permanent {
		log.Error("taskguard: cannot build the functions: fix the configuration", "error", err.Error())
	} else {
		log.Error("taskguard: cannot build the functions yet; retrying", "error", err.Error(), "retry_in", l.backoff.String())
	}
	return nil, l.next, l.failure()
}

func (l *lazyApp) failure() error {
	if l.permanent {
		return l.err
	}
	return fmt.Errorf("%w: %w", errStarting, l.err)
}

// Handler serves the three functions at /Worker, /Enqueue and
// /CleanupLocks, as the Functions Framework does when FUNCTION_TARGET is
// unset, sharing the App the registered functions build. It is for a local
// server that sets its own timeouts (cmd/taskguard-local): the Functions
// Framework's own local server sets none.
func Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/Worker", serve((*App).Worker))
	mux.HandleFunc("/Enqueue", serve((*App).Enqueue))
	mux.HandleFunc("/CleanupLocks", serve((*App).CleanupLocks))
	return mux
}

// serve adapts one of the App's handlers into a function.
func serve(h func(*App) http.Handler) func(http.ResponseWriter, *http.Request) {
	return serveFrom(theApp, h)
}

// serveFrom adapts one of the handlers of l's App. Until the App is built it
// answers 500 for a configuration error (which needs a new deployment) and
// 503 with Retry-After for a failure that may pass (Cloud Tasks and Cloud
// Scheduler retry both).
func serveFrom(l *lazyApp, h func(*App) http.Handler) func(http.ResponseWriter, *http.Request) {
	var (
		once    sync.Once
		handler http.Handler
	)
	return func(w http.ResponseWriter, r *http.Request) {
		a, next, err := l.get()
		switch {
		case errors.Is(err, errStarting):
			secs := max(int(math.Ceil(next.Sub(l.now()).Seconds())), 1)
			w.Header().Set("Retry-After", strconv.Itoa(secs))
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "taskguard is starting and could not build the functions yet; see the function's logs"})
			return
		case err != nil:
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "taskguard is misconfigured; see the function's logs"})
			return
		}
		once.Do(func() { handler = h(a) })
		handler.ServeHTTP(w, r)
	}
}
