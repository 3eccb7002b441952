package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

// ErrShutdown is the cause (context.Cause) of the request context of every
// request in flight when the instance shuts down, with DrainOnSIGTERM.
var ErrShutdown = errors.New("app: the instance is shutting down (SIGTERM)")

// MaxDrain bounds DrainOnSIGTERM's wait: Cloud Run kills an instance 10 s
// after its SIGTERM.
const MaxDrain = 9 * time.Second

// DrainOnSIGTERM makes the functions end their requests in flight before
// the process exits, when it receives SIGTERM (Cloud Run sends it before
// shutting an instance down, and SIGKILL 10 s later). At SIGTERM every
// Worker request in flight has its context cancelled with cause ErrShutdown, so
// that a job stops and the Worker answers, releases its lock and hands it
// on (a parked task behind it runs elsewhere at once, instead of after the
// lock's lease and its safety wake); Enqueue's and CleanupLocks' requests,
// which are short, run to their end within the wait instead (an Enqueue
// cancelled after its task was created would answer an error, and its
// caller enqueue the task again); requests that arrive afterwards are
// answered 503 with Retry-After: 1. Once none is in flight, or wait (at
// most MaxDrain) has passed, the process exits with status 0. Only the
// functions registered with this option are waited for: other handlers of
// the process are cut off at the exit, as they would be without it.
//
// Without it the process ends at SIGTERM as Go's default does: the
// requests in flight are cut off and retried by their callers, and the
// locks they held stay held until their lease runs out. It installs a
// signal handler (os/signal) for SIGTERM, so a program with a SIGTERM
// handler of its own should not use it. Like WithJob it panics, at once,
// when wait is not in (0, MaxDrain].
func DrainOnSIGTERM(wait time.Duration) Option {
	if wait <= 0 || wait > MaxDrain {
		panic(fmt.Sprintf("app: DrainOnSIGTERM(%v): the wait must be in (0, %v]", wait, MaxDrain))
	}
	return func(o *options) { o.drain = wait }
}

// drainer tracks the requests in flight of one set of functions.
type drainer struct {
	wait   time.Duration
	ctx    context.Context // cancelled, with cause ErrShutdown, at SIGTERM
	cancel context.CancelCauseFunc

	mu      sync.Mutex
	closing bool           // guarded by mu
	flight  sync.WaitGroup // Add only under mu, while !closing
	n       int            // requests in flight; guarded by mu
}

func newDrainer(wait time.Duration) *drainer {
	ctx, cancel := context.WithCancelCause(context.Background())
	return &drainer{wait: wait, ctx: ctx, cancel: cancel}
}

// serve runs next unless the instance is shutting down, with a context
// that ends, with cause ErrShutdown, at the shutdown: for the Worker, whose
// jobs may run for minutes and must stop to release their locks.
func (d *drainer) serve(w http.ResponseWriter, r *http.Request, next func(http.ResponseWriter, *http.Request)) {
	d.run(w, r, next, true)
}

// serveToEnd runs next unless the instance is shutting down, and lets it
// run to its end within the drain's wait: for the short requests of Enqueue
// and CleanupLocks, whose cancelled answer would hide work already done
// (a task created, then answered 502: its caller enqueues it again).
func (d *drainer) serveToEnd(w http.ResponseWriter, r *http.Request, next func(http.ResponseWriter, *http.Request)) {
	d.run(w, r, next, false)
}

func (d *drainer) run(w http.ResponseWriter, r *http.Request, next func(http.ResponseWriter, *http.Request), cancelAtShutdown bool) {
	d.mu.Lock()
	if d.closing {
		d.mu.Unlock()
		w.Header().Set("Retry-After", "1")
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "this instance is shutting down"})
		return
	}
	d.flight.Add(1)
	d.n++
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		d.n--
		d.mu.Unlock()
		d.flight.Done()
	}()
	if cancelAtShutdown {
		ctx, cancel := context.WithCancelCause(r.Context())
		defer cancel(nil)
		stop := context.AfterFunc(d.ctx, func() { cancel(ErrShutdown) })
		defer stop()
		r = r.WithContext(ctx)
	}
	next(w, r)
	// The answer goes on the wire before the request counts as done: the
	// process may exit as soon as none is in flight.
	_ = http.NewResponseController(w).Flush()
}

// drain ends the requests in flight and waits for them, at most d.wait; it
// reports how many it stopped and how many were still running at the end.
func (d *drainer) drain() (stopped, left int) {
	d.mu.Lock()
	d.closing = true
	stopped = d.n
	d.mu.Unlock()
	d.cancel(ErrShutdown)
	done := make(chan struct{})
	go func() { d.flight.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d.wait):
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return stopped, d.n
}

// The drainers of the process, drained together at SIGTERM.
var drains struct {
	sync.Mutex
	list []*drainer
	once sync.Once
}

// exit ends the process after a drain; a variable for tests.
var exit = os.Exit

// drainAtSIGTERM registers d and, once per process, the SIGTERM handler
// that drains every registered drainer and exits.
func drainAtSIGTERM(d *drainer, log *slog.Logger) {
	drains.Lock()
	drains.list = append(drains.list, d)
	drains.Unlock()
	drains.once.Do(func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM)
		go func() {
			<-ch
			start := time.Now()
			drains.Lock()
			list := drains.list
			drains.Unlock()
			var mu sync.Mutex
			var wg sync.WaitGroup
			stopped, left := 0, 0
			for _, d := range list {
				wg.Go(func() {
					s, l := d.drain()
					mu.Lock()
					stopped, left = stopped+s, left+l
					mu.Unlock()
				})
			}
			wg.Wait()
			if left > 0 {
				log.Warn("taskguard: SIGTERM: exiting with requests still running; their locks end with their lease", "stopped", stopped, "still_running", left, "waited", time.Since(start).String())
			} else {
				log.Info("taskguard: SIGTERM: every request in flight ended; exiting", "stopped", stopped, "waited", time.Since(start).String())
			}
			exit(0)
		}()
	})
}
