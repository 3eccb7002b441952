package app

import (
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/tasks"
)

// Environment variables the functions read. Empty means unset.
const (
	EnvProject            = "GOOGLE_CLOUD_PROJECT"
	EnvDatastoreEmulator  = "DATASTORE_EMULATOR_HOST"
	EnvDatastoreDatabase  = dslock.EnvDatabase // package dslock reads these three for the locks
	EnvDatastoreNamespace = dslock.EnvNamespace
	EnvDatastoreKind      = dslock.EnvKind
	EnvMemcache           = "MEMCACHE_SERVERS"
	EnvValkey             = "VALKEY_ADDR"
	EnvQueue              = tasks.EnvQueue
	EnvWorkerURL          = tasks.EnvWorkerURL
	EnvTaskServiceAccount = tasks.EnvTaskServiceAccount
	EnvTaskDeadline       = tasks.EnvTaskDeadline
	EnvLease              = "TASKGUARD_LEASE"
	EnvCleanupGrace       = "TASKGUARD_CLEANUP_GRACE"
	EnvTasksEmulator      = "CLOUD_TASKS_EMULATOR_HOST"
	EnvLogLevel           = "TASKGUARD_LOG_LEVEL"
	EnvBusy               = "TASKGUARD_BUSY"
	EnvDatastoreProject   = "DATASTORE_PROJECT_ID"
)

// What the Worker does with a delivery whose lock is busy (Config.Busy,
// TASKGUARD_BUSY).
const (
	// BusyPark parks the delivery in a wait list and answers 202; the
	// lock's holder hands the lock to the oldest waiter through a
	// continuation task when it ends (see package tasks). It needs the
	// queue (TASKGUARD_QUEUE and its two companions) and a wait list that
	// every instance shares: Strong locks on Datastore, or in this
	// process's memory (local runs, one instance).
	BusyPark = "park"
	// Busy429 answers 429 with Retry-After and lets Cloud Tasks retry. In
	// production that costs the queue's retry ladder (5, 15, 35, 75, 155,
	// 315 s with deploy/'s queue), slows the whole queue (429 and 503
	// trigger Cloud Tasks' system throttling) and spends an attempt per
	// answer (see README).
	Busy429 = "429"
)

// ErrConfig marks an invalid configuration. It wraps locking.ErrInvalid, as
// every bad-configuration error of this module does.
var ErrConfig = locking.NewInvalid("taskguard: invalid configuration")

// Config is the functions' configuration, read from the environment by
// ConfigFromEnv. The lock backends themselves are chosen, and their
// variables read and checked, by the backend packages the program imports
// (see locking.FromEnvironment and locking.CheckEnvironment): Datastore when
// GOOGLE_CLOUD_PROJECT or DATASTORE_EMULATOR_HOST is set, memcached for Weak
// locks when MEMCACHE_SERVERS is, Valkey when VALKEY_ADDR is.
type Config struct {
	// ProjectID is the Google Cloud project, for trace correlation in logs.
	ProjectID string
	// Lease is the lease of the Worker's task locks (TASKGUARD_LEASE, a Go
	// duration); the lock client's default lease when zero.
	Lease time.Duration
	// CleanupGrace is how long after its lease ended a lock entity is kept
	// before CleanupLocks deletes it (TASKGUARD_CLEANUP_GRACE); the Datastore
	// backend's default when zero.
	CleanupGrace time.Duration
	// LogLevel is TASKGUARD_LOG_LEVEL's level; nil when it is unset (info).
	LogLevel slog.Leveler
	// Queue, WorkerURL and TaskServiceAccount configure the Enqueue function:
	// the full queue name, the Worker function's URL, and the service account
	// whose OIDC token Cloud Tasks presents to the worker. All three or none.
	Queue, WorkerURL, TaskServiceAccount string
	// TaskDeadline is the dispatch deadline of the tasks the functions create
	// (Enqueue's, park mode's continuations): TASKGUARD_TASK_DEADLINE, a Go
	// duration within [15s, 30m], which deploy/ sets from TASK_DEADLINE, the
	// Worker function's timeout too. Zero when unset: then
	// tasks.DefaultEnvTaskDeadline (30 min), deploy/'s default.
	TaskDeadline time.Duration
	// TasksEmulator is the host:port of a local Cloud Tasks emulator
	// (CLOUD_TASKS_EMULATOR_HOST); empty in production.
	TasksEmulator string
	// Busy is what the Worker does with a delivery whose lock is busy
	// (TASKGUARD_BUSY): BusyPark, Busy429, or empty for the default, park
	// where the deployment can (see New) and 429 elsewhere.
	Busy string
	// DatastoreProject, DatastoreDatabase and DatastoreNamespace place the
	// park mode's wait list beside Strong locks on Datastore, as the lock
	// backend places its entities: DATASTORE_PROJECT_ID, else
	// GOOGLE_CLOUD_PROJECT; TASKGUARD_DATASTORE_DATABASE;
	// TASKGUARD_DATASTORE_NAMESPACE.
	DatastoreProject, DatastoreDatabase, DatastoreNamespace string
}

var (
	hostPort  = regexp.MustCompile(`^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$`)
	saEmailRE = regexp.MustCompile(`^[^@\s]+@[^@\s]+\.[^@\s]+$`)
)

// ConfigFromEnv reads and validates the configuration. getenv is os.Getenv
// in production. Every problem is reported at once, in one error wrapping
// ErrConfig, one line per variable.
func ConfigFromEnv(getenv func(string) string) (Config, error) {
	var (
		cfg      Config
		problems []string
	)
	bad := func(name, format string, args ...any) {
		problems = append(problems, fmt.Sprintf("%s=%q: %s", name, getenv(name), fmt.Sprintf(format, args...)))
	}
	cfg.ProjectID = getenv(EnvProject)
	cfg.DatastoreProject = getenv(EnvDatastoreProject)
	if cfg.DatastoreProject == "" {
		cfg.DatastoreProject = cfg.ProjectID
	}
	cfg.DatastoreDatabase, cfg.DatastoreNamespace = getenv(EnvDatastoreDatabase), getenv(EnvDatastoreNamespace)
	switch cfg.Busy = getenv(EnvBusy); cfg.Busy {
	case "", BusyPark, Busy429:
	default:
		bad(EnvBusy, "want %s or %s (empty: %s where the deployment can)", BusyPark, Busy429, BusyPark)
	}

	duration := func(name string) time.Duration {
		v := getenv(name)
		if v == "" {
			return 0
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			bad(name, "want a positive Go duration such as 30s or 5m")
			return 0
		}
		return d
	}
	cfg.Lease = duration(EnvLease)
	if cfg.TaskDeadline = duration(EnvTaskDeadline); cfg.TaskDeadline != 0 &&
		(cfg.TaskDeadline < tasks.MinDispatchDeadline || cfg.TaskDeadline > tasks.MaxDispatchDeadline) {
		bad(EnvTaskDeadline, "want a dispatch deadline within [%v, %v]", tasks.MinDispatchDeadline, tasks.MaxDispatchDeadline)
		cfg.TaskDeadline = 0
	}
	cfg.CleanupGrace = duration(EnvCleanupGrace)
	if level, set, err := logLevel(getenv); err != nil {
		bad(EnvLogLevel, "want DEBUG, INFO, WARN or ERROR (optionally +N or -N)")
	} else if set {
		cfg.LogLevel = level
	}

	// Names Datastore would refuse: every lock call would fail.
	for _, c := range []struct {
		name  string
		check func(string) error
	}{
		{EnvDatastoreDatabase, dslock.CheckDatabaseID},
		{EnvDatastoreNamespace, dslock.CheckNamespace},
		{EnvDatastoreKind, dslock.CheckKind},
	} {
		if err := c.check(getenv(c.name)); err != nil {
			bad(c.name, "%s", strings.TrimPrefix(err.Error(), dslock.ErrBadOptions.Error()+": "))
		}
	}
	// MEMCACHE_SERVERS, VALKEY_ADDR and the rest of the Weak backends'
	// variables are their packages' to read and check (see Register).
	for _, name := range []string{EnvDatastoreEmulator, EnvTasksEmulator} {
		if v := getenv(name); v != "" && !hostPort.MatchString(v) && !strings.Contains(v, "://") {
			bad(name, "want host:port")
		}
	}

	cfg.Queue, cfg.WorkerURL, cfg.TaskServiceAccount = getenv(EnvQueue), getenv(EnvWorkerURL), getenv(EnvTaskServiceAccount)
	cfg.TasksEmulator = getenv(EnvTasksEmulator)
	if cfg.Queue != "" || cfg.WorkerURL != "" || cfg.TaskServiceAccount != "" {
		if !tasks.ValidQueue(cfg.Queue) {
			bad(EnvQueue, "want projects/PROJECT/locations/LOCATION/queues/QUEUE (set it with %s and %s, or none of them)", EnvWorkerURL, EnvTaskServiceAccount)
		}
		if u, err := url.Parse(cfg.WorkerURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			bad(EnvWorkerURL, "want the Worker function's http(s) URL")
		} else if u.Scheme == "http" && cfg.TasksEmulator == "" {
			bad(EnvWorkerURL, "Cloud Tasks sends OIDC tokens only over https")
		}
		if !saEmailRE.MatchString(cfg.TaskServiceAccount) {
			bad(EnvTaskServiceAccount, "want a service account email")
		}
	}
	if len(problems) > 0 {
		return Config{}, fmt.Errorf("%w:\n  %s", ErrConfig, strings.Join(problems, "\n  "))
	}
	return cfg, nil
}

// EnqueueEnabled reports whether the Enqueue function is configured.
func (c Config) EnqueueEnabled() bool { return c.Queue != "" }

// logLevel parses TASKGUARD_LOG_LEVEL, the one parser of it (ConfigFromEnv,
// LoggerFromEnv): set is false when it is unset.
func logLevel(getenv func(string) string) (level slog.Level, set bool, err error) {
	v := getenv(EnvLogLevel)
	if v == "" {
		return slog.LevelInfo, false, nil
	}
	if err := level.UnmarshalText([]byte(v)); err != nil {
		return slog.LevelInfo, false, err
	}
	return level, true, nil
}
