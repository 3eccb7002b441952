package app

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

	"github.com/taskguard/taskguard/cloudlog"
	"github.com/taskguard/taskguard/locking"
)

// Functions names the functions Register registers and Handler serves. An
// empty name leaves that function out: a project that enqueues from its own
// code, with a tasks.Client, needs no Enqueue function.
type Functions struct {
	Worker, Enqueue, CleanupLocks string
}

// DefaultFunctions are the names taskguard's own deployment (deploy/) gives
// its three functions, as entry points.
var DefaultFunctions = Functions{Worker: "Worker", Enqueue: "Enqueue", CleanupLocks: "CleanupLocks"}

// each calls f with each named function's name and handler.
func (fns Functions) each(f func(name string, h func(*App) http.Handler)) {
	for _, fn := range []struct {
		name string
		h    func(*App) http.Handler
	}{{fns.Worker, (*App).Worker}, {fns.Enqueue, (*App).Enqueue}, {fns.CleanupLocks, (*App).CleanupLocks}} {
		if fn.name != "" {
			f(fn.name, fn.h)
		}
	}
}

// Register registers the functions named by fns with register, which is
// the Functions Framework's functions.HTTP:
//
//	func init() {
//		app.Register(functions.HTTP, app.Functions{Worker: "ShopWorker", CleanupLocks: "ShopCleanupLocks"},
//			app.WithJob("charge", charge))
//	}
//
// The functions share one App, built with opts on the first request from
// the environment (ConfigFromEnv) or WithConfig's Config: no network I/O
// happens before. Register reads and validates the environment at once —
// the functions' own variables (ConfigFromEnv), then the lock backends'
// (locking.CheckEnvironment: a malformed MEMCACHE_SERVERS, no Strong backend
// on Cloud Run, ...) — and logs the problems in one line at ERROR; the
// functions then answer 500 until it is fixed. Should
// the build fail for another reason (credentials or the metadata server not
// reachable yet), the functions answer 503 with Retry-After and a later
// request builds it again, after a backoff of 1 s doubling up to 1 min.
// Register itself registers nothing else and sets no global logger.
func Register(register func(name string, fn func(http.ResponseWriter, *http.Request)), fns Functions, opts ...Option) {
	l := newLazyApp(opts)
	err := locking.CheckEnvironment()
	if optionsOf(opts).cfg == nil {
		if _, cerr := ConfigFromEnv(os.Getenv); cerr != nil {
			err = cerr // the functions' own variables first
		}
	}
	if err != nil {
		l.logger().Error("taskguard: the functions cannot start until the configuration is fixed", "error", err.Error())
	}
	fns.each(func(name string, h func(*App) http.Handler) { register(name, serveFrom(l, h, name == fns.Worker)) })
}

// Handler serves the functions named by fns at /<name>, as the Functions
// Framework does when FUNCTION_TARGET is unset, sharing one App built as
// Register's is. It is for a local server that sets its own timeouts
// (cmd/taskguard-local): the Functions Framework's own local server sets
// none.
func Handler(fns Functions, opts ...Option) http.Handler {
	l := newLazyApp(opts)
	mux := http.NewServeMux()
	fns.each(func(name string, h func(*App) http.Handler) {
		mux.HandleFunc("/"+name, serveFrom(l, h, name == fns.Worker))
	})
	return mux
}

// LoggerFromEnv returns the functions' logger: JSON lines for Cloud
// Logging on standard output (package cloudlog), at TASKGUARD_LOG_LEVEL
// (debug, info, warn or error; info by default), with traces in
// GOOGLE_CLOUD_PROJECT. It is the App's logger unless WithLogger sets
// another; a program may also make it the default (slog.SetDefault).
func LoggerFromEnv() *slog.Logger {
	level, _, _ := logLevel(os.Getenv) // a bad value is reported by ConfigFromEnv (Register)
	return slog.New(cloudlog.NewHandler(os.Stdout, level, os.Getenv(EnvProject)))
}

// newLazyApp returns the App that Register and Handler build with opts.
func newLazyApp(opts []Option) *lazyApp {
	o := optionsOf(opts)
	log := o.log
	if log == nil {
		log = LoggerFromEnv()
	}
	l := &lazyApp{now: time.Now, log: log}
	if o.drain > 0 {
		l.drain = newDrainer(o.drain)
		drainAtSIGTERM(l.drain, log)
	}
	l.build = func() (*App, error) {
		if o.cfg != nil {
			return New(context.Background(), *o.cfg, log, opts...)
		}
		cfg, err := ConfigFromEnv(os.Getenv)
		if err != nil {
			return nil, err
		}
		return New(context.Background(), cfg, log, opts...)
	}
	return l
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
	drain *drainer     // DrainOnSIGTERM's; nil without it

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
	// Every bad-configuration error of the module wraps locking.ErrInvalid
	// (ErrConfig, tasks.ErrInvalidConfig, ErrNoStrongBackend, the backends').
	l.permanent = errors.Is(err, locking.ErrInvalid)
	l.backoff = min(max(2*l.backoff, minBuildBackoff), maxBuildBackoff)
	l.next = l.now().Add(l.backoff)
	log := l.logger()
	if l.permanent {
		log.Error("taskguard: cannot build the functions: fix the configuration", "error", err.Error())
	} else {
		log.Error("taskguard: cannot build the functions yet; retrying", "error", err.Error(), "retry_in", l.backoff.String())
	}
	return nil, l.next, l.failure()
}

func (l *lazyApp) logger() *slog.Logger {
	if l.log == nil {
		return slog.Default()
	}
	return l.log
}

func (l *lazyApp) failure() error {
	if l.permanent {
		return l.err
	}
	return fmt.Errorf("%w: %w", errStarting, l.err)
}

// serveFrom adapts one of the handlers of l's App. Until the App is built it
// answers 500 for a configuration error (which needs a new deployment) and
// 503 with Retry-After for a failure that may pass (Cloud Tasks and Cloud
// Scheduler retry both).
//
// With DrainOnSIGTERM, the Worker's requests (worker) are cancelled at
// SIGTERM and the other functions' run to their end within the wait.
func serveFrom(l *lazyApp, h func(*App) http.Handler, worker bool) func(http.ResponseWriter, *http.Request) {
	var (
		once    sync.Once
		handler http.Handler
	)
	serve := func(w http.ResponseWriter, r *http.Request) {
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
	switch {
	case l.drain == nil:
		return serve
	case worker:
		return func(w http.ResponseWriter, r *http.Request) { l.drain.serve(w, r, serve) }
	default:
		return func(w http.ResponseWriter, r *http.Request) { l.drain.serveToEnd(w, r, serve) }
	}
}
