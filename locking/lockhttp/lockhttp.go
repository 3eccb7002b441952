// Package lockhttp guards HTTP handlers with locks: a middleware that runs
// a handler while holding a lock whose id it derives from the request, so
// that at most one request per id runs at a time across every instance
// that shares the lock store. It is the Go form of djangae's @lock
// decorator.
//
//	h := lockhttp.Guard(nil, lockhttp.Query("customer", "checkout/"), checkout)
//
// A request whose lock is held elsewhere is not run: it is answered 429 Too
// Many Requests (or the status set with BusyStatus) with a Retry-After. The
// mapping from lock errors to HTTP answers (Policy) is the one the tasks
// package's Worker uses for its deliveries:
//
//   - lock held: BusyStatus (429 by default) with Retry-After, the holder's
//     remaining lease rounded up to whole seconds, at least 1 s and at most
//     MaxRetryAfter (10 s by default);
//   - lock lost (locking.ErrLockLost): 503 Service Unavailable;
//   - the lock store failed, or the request ended while the lock was taken:
//     503 Service Unavailable;
//   - the lock client cannot work as configured (locking.ErrInvalid, which
//     ErrNoBackend, ErrNoStrongBackend and every package's bad-configuration
//     error wrap; ErrReentrant): 500 Internal Server Error.
//
// For Cloud Run functions written for the Functions Framework, GuardFunc
// wraps a func(w, r):
//
//	functions.HTTP("Checkout", lockhttp.GuardFunc(nil, lockhttp.Query("customer", "checkout/"), checkout))
package lockhttp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/felixge/httpsnoop"

	"github.com/taskguard/taskguard/locking"
)

// DefaultMaxRetryAfter caps the Retry-After of a busy answer when
// Policy.MaxRetryAfter is zero.
const DefaultMaxRetryAfter = 10 * time.Second

// A Policy maps the errors of locking.Client.With and Acquire to HTTP
// answers. The zero Policy answers 429 for a busy lock, with a Retry-After
// of at most DefaultMaxRetryAfter.
type Policy struct {
	// BusyStatus is the status of a lock held elsewhere:
	// http.StatusTooManyRequests (429) when zero. 409 Conflict is the other
	// common choice.
	BusyStatus int
	// MaxRetryAfter caps the Retry-After of a busy answer;
	// DefaultMaxRetryAfter when zero. Values below one second count as one
	// second.
	MaxRetryAfter time.Duration
}

// Validate reports whether p is usable: BusyStatus 0 or a client or server
// error status (400–599), MaxRetryAfter in [0, locking.MaxLease]. The error
// wraps locking.ErrInvalid and names the field.
func (p Policy) Validate() error {
	if p.BusyStatus != 0 && (p.BusyStatus < 400 || p.BusyStatus > 599) {
		return fmt.Errorf("%w: lockhttp: BusyStatus %d is not an HTTP error status (400-599)", locking.ErrInvalid, p.BusyStatus)
	}
	if p.MaxRetryAfter < 0 || p.MaxRetryAfter > locking.MaxLease {
		return fmt.Errorf("%w: lockhttp: MaxRetryAfter %v is not in [0, %v]", locking.ErrInvalid, p.MaxRetryAfter, locking.MaxLease)
	}
	return nil
}

// An Answer is the HTTP answer for a lock error.
type Answer struct {
	// Status is the HTTP status code.
	Status int
	// RetryAfter is the Retry-After header's value in whole seconds; zero
	// means no header.
	RetryAfter int
	// Message is a short text for the body, without details of the error.
	Message string
}

// Answer returns the answer for err, an error returned by
// locking.Client.With or Acquire (see the package documentation for the
// mapping). ok is false when err is nil. A Policy that Validate refuses
// answers a busy lock 500, as a misconfigured lock.
func (p Policy) Answer(err error) (a Answer, ok bool) {
	var busy *locking.NotAcquiredError
	switch {
	case err == nil:
		return Answer{}, false
	case errors.Is(err, locking.ErrLockLost):
		return Answer{Status: http.StatusServiceUnavailable, Message: "lock lost"}, true
	case errors.As(err, &busy) && p.Validate() == nil:
		status := p.BusyStatus
		if status == 0 {
			status = http.StatusTooManyRequests
		}
		return Answer{Status: status, RetryAfter: p.RetryAfter(busy.Remaining), Message: "lock held"}, true
	case busy != nil, errors.Is(err, locking.ErrInvalid), errors.Is(err, locking.ErrReentrant):
		return Answer{Status: http.StatusInternalServerError, Message: "lock misconfigured"}, true
	default:
		return Answer{Status: http.StatusServiceUnavailable, Message: "lock unavailable"}, true
	}
}

// RetryAfter is the Retry-After, in whole seconds, for a lock whose
// holder's lease has remaining left (0 when unknown): rounded up, at least
// 1 s, at most MaxRetryAfter.
func (p Policy) RetryAfter(remaining time.Duration) int {
	maxRA := p.MaxRetryAfter
	if maxRA == 0 {
		maxRA = DefaultMaxRetryAfter
	}
	maxRA = max(maxRA, time.Second)
	d := min(max(remaining, time.Second), maxRA)
	return int(math.Ceil(d.Seconds()))
}

// Write writes the answer: the Retry-After header when set, the status, and
// Message as a plain-text body.
func (a Answer) Write(w http.ResponseWriter) {
	if a.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(a.RetryAfter))
	}
	http.Error(w, a.Message, a.Status)
}

// A KeyFunc derives the lock id of a request. An error, or an empty id,
// answers 400 Bad Request with the error's text: the request is not run.
type KeyFunc func(*http.Request) (string, error)

// Query derives the lock id from the query parameter name: prefix followed
// by its value. A request without the parameter, or with an empty value, is
// answered 400.
func Query(name, prefix string) KeyFunc {
	return func(r *http.Request) (string, error) {
		v := r.URL.Query().Get(name)
		if v == "" {
			return "", fmt.Errorf("query parameter %q is required", name)
		}
		return prefix + v, nil
	}
}

// Header derives the lock id from the request header name: prefix followed
// by its value. A request without the header is answered 400.
func Header(name, prefix string) KeyFunc {
	return func(r *http.Request) (string, error) {
		v := r.Header.Get(name)
		if v == "" {
			return "", fmt.Errorf("header %q is required", name)
		}
		return prefix + v, nil
	}
}

// PathValue derives the lock id from the wildcard name of the request's
// http.ServeMux pattern (Request.PathValue): prefix followed by its value.
// A request without it is answered 400.
func PathValue(name, prefix string) KeyFunc {
	return func(r *http.Request) (string, error) {
		v := r.PathValue(name)
		if v == "" {
			return "", fmt.Errorf("path value %q is required", name)
		}
		return prefix + v, nil
	}
}

// An Option configures New, Guard and GuardFunc. Each is checked when the
// handler is built (see New).
type Option func(*guard)

// BusyStatus sets the status of a request whose lock is held elsewhere:
// 429 by default, 409 Conflict the other common choice. It must be an HTTP
// error status (400–599).
func BusyStatus(status int) Option {
	return func(g *guard) { g.policy.BusyStatus = status }
}

// MaxRetryAfter caps the Retry-After of a busy answer; DefaultMaxRetryAfter
// by default. It must be in [0, locking.MaxLease]; values below one second
// count as one second.
func MaxRetryAfter(d time.Duration) Option {
	return func(g *guard) { g.policy.MaxRetryAfter = d }
}

// MaxWait makes a request wait up to d for a held lock before it is
// answered busy, instead of being answered at once. The wait counts against
// the request's own deadline. As locking.MaxWait, d must be positive and at
// most locking.MaxLease.
func MaxWait(d time.Duration) Option {
	return func(g *guard) {
		if d <= 0 || d > locking.MaxLease {
			g.fail(fmt.Errorf("%w: lockhttp: MaxWait(%v): must be positive and at most locking.MaxLease (%v)", locking.ErrInvalid, d, locking.MaxLease))
		}
		g.maxWait = d
	}
}

// LockOptions adds locking options (Lease, Kind, StealAfter) to every
// request's lock. Wait and MaxWait are set by the guard (see MaxWait).
func LockOptions(opts ...locking.Option) Option {
	return func(g *guard) { g.lockOpts = append(g.lockOpts, opts...) }
}

// Logger sets the logger of the guard's rare lines (a lock error other than
// busy, a lock lost after the response began, a failed release);
// slog.Default() by default.
func Logger(l *slog.Logger) Option {
	return func(g *guard) { g.log = l }
}

type guard struct {
	client   *locking.Client
	key      KeyFunc
	next     http.Handler
	policy   Policy
	maxWait  time.Duration
	lockOpts []locking.Option
	log      *slog.Logger
	err      error // the first invalid option
}

func (g *guard) fail(err error) {
	if g.err == nil {
		g.err = err
	}
}

// Guard returns a handler that runs next while holding the lock whose id
// key derives from the request, taken from client (the process's
// locking.Default() client, looked up at each request, when nil). next's
// request context carries the held lock (locking.FromContext, for its
// fencing token) and is cancelled, with cause locking.ErrLockLost, if the
// lock is lost; the lock is released when next returns. A request that
// cannot take its lock is not run and is answered by Policy (see the
// package documentation); a request whose lock is lost while next runs is
// answered 503 unless next has already begun its response. The
// ResponseWriter next receives has the same optional interfaces
// (http.Flusher, ...) as the server's.
//
// The response ends only after the lock is released: on Cloud Run an
// instance's CPU may be throttled once its response is complete, and a
// release after that would wait for the instance's next request, leaving
// the lock held up to a lease. So when next declares a Content-Length, the
// last byte of its body is sent after the release, and a Flush of a
// response with nothing left to send (a 204, a HEAD request, a body written
// whole) is made after the release; a streamed response (no declared
// length) is flushed as next asks, and ends after the release as always.
//
// Guard panics, with the error New would return, if key or next is nil or
// an option is invalid: handlers are built at start-up (often in init, for
// functions.HTTP), so a bad setting stops the program there instead of
// failing its requests. Use New to get the error instead.
func Guard(client *locking.Client, key KeyFunc, next http.Handler, opts ...Option) http.Handler {
	h, err := New(client, key, next, opts...)
	if err != nil {
		panic(err)
	}
	return h
}

// New is Guard returning an error instead of panicking: an error wrapping
// locking.ErrInvalid, naming the bad argument, when key or next is nil or an
// option is invalid (a BusyStatus that is not 400–599, a MaxRetryAfter or
// MaxWait out of range, a nil Option). It does no I/O.
func New(client *locking.Client, key KeyFunc, next http.Handler, opts ...Option) (http.Handler, error) {
	if key == nil || next == nil {
		return nil, fmt.Errorf("%w: lockhttp: nil key or handler", locking.ErrInvalid)
	}
	g := &guard{client: client, key: key, next: next}
	for _, o := range opts {
		if o == nil {
			g.fail(fmt.Errorf("%w: lockhttp: nil Option", locking.ErrInvalid))
			continue
		}
		o(g)
	}
	if g.err == nil {
		g.fail(g.policy.Validate())
	}
	if g.err != nil {
		return nil, g.err
	}
	return g, nil
}

// GuardFunc is Guard for a handler function, the form the Functions
// Framework registers (functions.HTTP). It panics as Guard does.
func GuardFunc(client *locking.Client, key KeyFunc, next func(http.ResponseWriter, *http.Request), opts ...Option) func(http.ResponseWriter, *http.Request) {
	if next == nil {
		panic(fmt.Errorf("%w: lockhttp: GuardFunc with a nil handler", locking.ErrInvalid))
	}
	return Guard(client, key, http.HandlerFunc(next), opts...).ServeHTTP
}

func (g *guard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	log := g.log
	if log == nil {
		log = slog.Default()
	}
	id, err := g.key(r)
	if err == nil && id == "" {
		err = errors.New("empty lock id")
	}
	if err != nil {
		http.Error(w, "lock id: "+err.Error(), http.StatusBadRequest)
		return
	}
	client := g.client
	if client == nil {
		client = locking.Default()
	}
	opts := append([]locking.Option{locking.Wait(false)}, g.lockOpts...)
	if g.maxWait > 0 {
		opts = append(opts, locking.Wait(true), locking.MaxWait(g.maxWait))
	}
	var began atomic.Bool
	t := newTail(w, r)
	defer t.finish() // after the release: see tail
	ww := httpsnoop.Wrap(w, httpsnoop.Hooks{
		WriteHeader: func(next httpsnoop.WriteHeaderFunc) httpsnoop.WriteHeaderFunc {
			h := t.writeHeader(next)
			return func(code int) {
				if code >= 200 || code == http.StatusSwitchingProtocols {
					began.Store(true) // a 1xx such as 103 Early Hints is not the response
				}
				h(code)
			}
		},
		Write: func(next httpsnoop.WriteFunc) httpsnoop.WriteFunc {
			wr := t.write(next)
			return func(b []byte) (int, error) { began.Store(true); return wr(b) }
		},
		WriteString: func(next httpsnoop.WriteStringFunc) httpsnoop.WriteStringFunc {
			ws := t.writeString(t.w.Write)
			return func(s string) (int, error) { began.Store(true); return ws(s) }
		},
		ReadFrom: func(next httpsnoop.ReadFromFunc) httpsnoop.ReadFromFunc {
			rf := t.readFrom(next)
			return func(src io.Reader) (int64, error) { began.Store(true); return rf(src) }
		},
		Flush: func(next httpsnoop.FlushFunc) httpsnoop.FlushFunc {
			f := t.flusher(next)
			return func() { began.Store(true); f() }
		},
	})
	ran := false
	err = client.With(r.Context(), id, func(ctx context.Context) error {
		ran = true
		g.next.ServeHTTP(ww, r.WithContext(ctx))
		return nil
	}, opts...)
	switch {
	case err == nil:
		return
	case ran && !errors.Is(err, locking.ErrLockLost):
		// The handler ran and answered; only the release failed, and the
		// lock expires with its lease.
		log.WarnContext(r.Context(), "lockhttp: request done, but releasing its lock failed", "lock_id", id, "error", err)
		return
	case ran && began.Load():
		log.ErrorContext(r.Context(), "lockhttp: lock lost after the response began", "lock_id", id, "error", err)
		return
	}
	a, _ := g.policy.Answer(err)
	switch {
	case a.RetryAfter > 0:
		log.DebugContext(r.Context(), "lockhttp: lock held; asking the client to retry later", "lock_id", id, "retry_after_s", a.RetryAfter)
	default:
		log.ErrorContext(r.Context(), "lockhttp: could not run the request under its lock", "lock_id", id, "status", a.Status, "error", err)
	}
	a.Write(w)
}
