package tasks

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/api/option"

	"github.com/taskguard/taskguard/locking"
)

// Environment variables ConfigFromEnv reads: the names deploy/ gives every
// function it deploys (and package app reads for the Enqueue function).
const (
	// EnvQueue is the full queue name,
	// projects/PROJECT/locations/LOCATION/queues/QUEUE (Config.Queue).
	EnvQueue = "TASKGUARD_QUEUE"
	// EnvWorkerURL is the Worker function's https URL, also the OIDC
	// audience (Config.WorkerURL).
	EnvWorkerURL = "TASKGUARD_WORKER_URL"
	// EnvTaskServiceAccount is the email of the account whose OIDC token
	// Cloud Tasks presents to the Worker (Config.ServiceAccount).
	EnvTaskServiceAccount = "TASKGUARD_TASK_SERVICE_ACCOUNT"
	// EnvTaskDeadline is the tasks' dispatch deadline, a Go duration within
	// [MinDispatchDeadline, MaxDispatchDeadline] (Config.DispatchDeadline);
	// deploy/ sets it from TASK_DEADLINE, the Worker function's timeout too.
	EnvTaskDeadline = "TASKGUARD_TASK_DEADLINE"
)

// DefaultEnvTaskDeadline is the dispatch deadline ConfigFromEnv uses when
// TASKGUARD_TASK_DEADLINE is unset: deploy/'s default TASK_DEADLINE, the
// Worker's timeout in a deployment that predates the variable.
const DefaultEnvTaskDeadline = MaxDispatchDeadline

// ErrNotConfigured is returned (wrapped, together with ErrInvalidConfig) by
// ConfigFromEnv and NewClientFromEnv when the environment names no queue:
// none of TASKGUARD_QUEUE, TASKGUARD_WORKER_URL and
// TASKGUARD_TASK_SERVICE_ACCOUNT is set.
var ErrNotConfigured = errors.New("tasks: the environment configures no queue")

// ConfigFromEnv reads a Client's Config from the environment through getenv
// (os.Getenv in production): Queue, WorkerURL and ServiceAccount from
// TASKGUARD_QUEUE, TASKGUARD_WORKER_URL and TASKGUARD_TASK_SERVICE_ACCOUNT,
// all three required, and DispatchDeadline from TASKGUARD_TASK_DEADLINE
// (DefaultEnvTaskDeadline, 30 min, when unset). It does no I/O. Every
// problem is reported at once, in one error wrapping ErrInvalidConfig that
// names the variables; with none of the three set the error wraps
// ErrNotConfigured too.
func ConfigFromEnv(getenv func(string) string) (Config, error) {
	cfg := Config{
		Queue:            strings.TrimSpace(getenv(EnvQueue)),
		WorkerURL:        strings.TrimSpace(getenv(EnvWorkerURL)),
		ServiceAccount:   strings.TrimSpace(getenv(EnvTaskServiceAccount)),
		DispatchDeadline: DefaultEnvTaskDeadline,
	}
	if cfg.Queue == "" && cfg.WorkerURL == "" && cfg.ServiceAccount == "" {
		return Config{}, fmt.Errorf("%w: %w: set %s, %s and %s", ErrInvalidConfig, ErrNotConfigured, EnvQueue, EnvWorkerURL, EnvTaskServiceAccount)
	}
	var problems []string
	for _, v := range []struct{ name, value string }{
		{EnvQueue, cfg.Queue}, {EnvWorkerURL, cfg.WorkerURL}, {EnvTaskServiceAccount, cfg.ServiceAccount},
	} {
		if v.value == "" {
			problems = append(problems, v.name+" is not set")
		}
	}
	if v := strings.TrimSpace(getenv(EnvTaskDeadline)); v != "" {
		d, err := time.ParseDuration(v)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s=%q is not a Go duration (e.g. 1800s, 10m)", EnvTaskDeadline, v))
		case d < MinDispatchDeadline || d > MaxDispatchDeadline:
			problems = append(problems, fmt.Sprintf("%s=%q is outside [%v, %v], the dispatch deadlines Cloud Tasks accepts", EnvTaskDeadline, v, MinDispatchDeadline, MaxDispatchDeadline))
		default:
			cfg.DispatchDeadline = d
		}
	}
	if cfg.Queue != "" && !ValidQueue(cfg.Queue) {
		problems = append(problems, fmt.Sprintf("%s=%q is not projects/PROJECT/locations/LOCATION/queues/QUEUE", EnvQueue, cfg.Queue))
	}
	if u, err := url.Parse(cfg.WorkerURL); cfg.WorkerURL != "" && (err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "") {
		problems = append(problems, fmt.Sprintf("%s=%q is not the Worker's http(s) URL", EnvWorkerURL, cfg.WorkerURL))
	}
	if len(problems) == 0 {
		if _, err := cfg.validate(); err != nil {
			problems = append(problems, strings.TrimPrefix(err.Error(), ErrInvalidConfig.Error()+": "))
		}
	}
	if len(problems) > 0 {
		return Config{}, fmt.Errorf("%w: from the environment: %s", ErrInvalidConfig, strings.Join(problems, "; "))
	}
	return cfg, nil
}

// NewClientFromEnv is NewClient with ConfigFromEnv(os.Getenv): the client
// of the queue the deployed functions are configured with, connected to
// CLOUD_TASKS_EMULATOR_HOST when that is set. opts are passed to NewClient.
// A configuration error wraps ErrInvalidConfig (and ErrNotConfigured when
// no queue is named) and will not pass until the environment changes; any
// other error comes from connecting (finding credentials, for example) and
// may pass on a later try. Called in a function's init, it does no network
// I/O; LazyClientFromEnv builds the client on first use instead and tries
// again after an error that may pass.
func NewClientFromEnv(ctx context.Context, opts ...option.ClientOption) (*Client, error) {
	cfg, err := ConfigFromEnv(os.Getenv)
	if err != nil {
		return nil, err
	}
	return NewClient(ctx, cfg, opts...)
}

// LazyClient is an Enqueuer whose Client is built from the environment
// (NewClientFromEnv) on its first Enqueue, for a function that enqueues
// from its own code and must not fail at start. It keeps the client once
// built, and a configuration error (ErrInvalidConfig) for good; any other
// error of the build is returned to that Enqueue only, and the next
// Enqueue tries again. Safe for concurrent use; Close releases the client.
type LazyClient struct {
	opts    []option.ClientOption
	connect func(context.Context) (*Client, error) // NewClientFromEnv with opts

	mu     sync.Mutex
	c      *Client             // guarded by mu; nil until built
	err    error               // guarded by mu; a configuration error, kept
	closed bool                // guarded by mu
	park   func(*Client) error // ParkAtEnqueue's, applied when c is built; guarded by mu
}

var _ Enqueuer = (*LazyClient)(nil)

// ErrClosed is returned by LazyClient.Enqueue after Close.
var ErrClosed = errors.New("tasks: client closed")

// LazyClientFromEnv returns a LazyClient that builds its Client with
// NewClientFromEnv(ctx, opts...) on first use. It does nothing else: no
// environment is read until then.
func LazyClientFromEnv(opts ...option.ClientOption) *LazyClient {
	l := &LazyClient{opts: opts}
	l.connect = func(ctx context.Context) (*Client, error) { return NewClientFromEnv(ctx, l.opts...) }
	return l
}

// Client returns the built Client, building it first if needed, with the
// errors Enqueue returns for a build that fails.
func (l *LazyClient) Client(ctx context.Context) (*Client, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.closed:
		return nil, ErrClosed
	case l.c != nil:
		return l.c, nil
	case l.err != nil:
		return nil, l.err
	}
	// The connection outlives the request that happens to build it.
	c, err := l.connect(context.WithoutCancel(ctx))
	if err == nil && l.park != nil {
		// Its arguments were checked by ParkAtEnqueue: it does not fail.
		if err = l.park(c); err != nil {
			_ = c.Close()
			c = nil
		}
	}
	switch {
	case err == nil:
		l.c = c
	case errors.Is(err, ErrInvalidConfig):
		l.err = err
	}
	return c, err
}

// ParkAtEnqueue makes the Client park bursts on one lock id at enqueue
// (Client.ParkAtEnqueue, which see): when it is built, or at once if it is
// built already. It checks its arguments as Client.ParkAtEnqueue does
// (ErrInvalidConfig), and does no I/O and builds nothing. Call it before
// the first Enqueue.
func (l *LazyClient) ParkAtEnqueue(list WaitList, locks *locking.Client, coalescing ...string) error {
	if err := checkParkAtEnqueue(list, locks); err != nil {
		return err
	}
	coalescing = slices.Clone(coalescing)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.park = func(c *Client) error { return c.ParkAtEnqueue(list, locks, coalescing...) }
	if l.c != nil {
		return l.park(l.c)
	}
	return nil
}

// Enqueue builds the Client if it is not built yet (see LazyClient) and
// enqueues t with it; its errors are Client.Enqueue's, or the build's.
func (l *LazyClient) Enqueue(ctx context.Context, t Task) (string, error) {
	c, err := l.Client(ctx)
	if err != nil {
		return "", err
	}
	return c.Enqueue(ctx, t)
}

// Close closes the Client if one was built; Enqueue fails with ErrClosed
// afterwards.
func (l *LazyClient) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	if l.c == nil {
		return nil
	}
	c := l.c
	l.c = nil
	return c.Close()
}
