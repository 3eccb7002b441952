// Command taskguard-local serves the three functions (Worker, Enqueue,
// CleanupLocks) on this machine at /Worker, /Enqueue and /CleanupLocks, as
// the Functions Framework would, on a server with read timeouts, on embedded
// defaults: in-memory locks, an in-process Cloud Tasks
// emulator that delivers to the local Worker, and the example job
// refresh-token with a fake OAuth token endpoint. No cloud account, no
// Docker.
//
// Usage:
//
//	go run ./cmd/taskguard-local [-addr 127.0.0.1:8080] [-demo]
//
// The same binary uses real services when the environment names them:
// DATASTORE_EMULATOR_HOST (or GOOGLE_CLOUD_PROJECT) for Strong locks on
// Datastore, MEMCACHE_SERVERS or VALKEY_ADDR for Weak locks,
// TASKGUARD_QUEUE with CLOUD_TASKS_EMULATOR_HOST for an emulator of your own,
// TASKGUARD_TOKEN_URL for the example job's token endpoint.
//
// With -demo it enqueues a burst of tasks through the Enqueue function — six
// on one lock id, six on distinct ids, five token refreshes for one user —,
// waits for them, prints a timeline showing at most one task at a time per
// lock id with increasing fencing tokens and the burst's span beside its
// ideal, calls CleanupLocks, and exits 0 only if every check held. Busy
// tasks are parked and handed the lock (the functions' default; no 429 or
// 503 answered); TASKGUARD_BUSY=429 shows the 429 mode, whose burst waits
// for the queue's backoffs (minutes).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/taskguard/taskguard/app"
	"github.com/taskguard/taskguard/cloudlog"
	"github.com/taskguard/taskguard/internal/oauthdemo"
	"github.com/taskguard/taskguard/tasks/taskstest"

	// Lock backends, chosen by the environment (locking.FromEnvironment).
	_ "github.com/taskguard/taskguard/locking/dslock"
	_ "github.com/taskguard/taskguard/locking/mclock"
	_ "github.com/taskguard/taskguard/locking/redislock"
)

// localQueue is the queue the embedded emulator serves.
const localQueue = "projects/local-project/locations/local/queues/taskguard"

func main() {
	log.SetFlags(0)
	log.SetPrefix("taskguard-local: ")
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

func run() error {
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	addr := flag.String("addr", "127.0.0.1:"+port, "address to serve the functions on")
	demo := flag.Bool("demo", false, "enqueue a burst of tasks, print the timeline and exit")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	base := "http://" + ln.Addr().String()

	// The environment's configuration, completed below with the embedded
	// defaults and passed to the functions as a Config.
	cfg, err := app.ConfigFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	var (
		rec  *recorder
		opts []app.Option
	)
	// The functions' logs, and the lock client's, as Cloud Logging reads
	// them; the demo prints its own timeline, so only warnings by default.
	level := slog.LevelInfo
	if *demo {
		level = slog.LevelWarn
		var job app.Option
		rec, job = demoJobOption()
		opts = append(opts, job)
		if cfg.Lease == 0 {
			cfg.Lease = demoLease
		}
	}
	if cfg.LogLevel != nil { // TASKGUARD_LOG_LEVEL, checked by ConfigFromEnv
		level = cfg.LogLevel.Level()
	}
	log := slog.New(cloudlog.NewHandler(os.Stdout, level, cfg.ProjectID))
	slog.SetDefault(log)
	opts = append(opts, app.WithLogger(log))

	var emu *taskstest.Server
	if cfg.Queue == "" {
		emu, err = startEmulator(ctx)
		if err != nil {
			return err
		}
		defer emu.Close()
		cfg.TasksEmulator = emu.Addr()
		cfg.Queue = localQueue
		cfg.WorkerURL = base + "/Worker"
		cfg.TaskServiceAccount = "worker@local-project.iam.gserviceaccount.com"
	}
	var endpoint *oauthdemo.Endpoint
	tokenURL := os.Getenv(envTokenURL)
	if tokenURL == "" {
		endpoint = oauthdemo.NewEndpoint()
		var closeTokens func()
		tokenURL, closeTokens, err = serveLoopback(endpoint)
		if err != nil {
			return err
		}
		defer closeTokens()
	} else if u, err := url.Parse(tokenURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("%s=%q: want an http(s) URL", envTokenURL, tokenURL)
	}
	opts = append(opts, app.WithJob(exampleJob, refreshTokenJob(tokenURL)), app.WithConfig(cfg))

	// Every function at /<Name>, as the Functions Framework serves them
	// when FUNCTION_TARGET is unset, but on a server with read timeouts
	// (the framework's own sets none).
	srv := newServer(app.Handler(app.DefaultFunctions, opts...), defaultTimeouts)
	defer srv.Close()
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	if err := waitListening(ctx, ln.Addr().String(), serveErr); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "taskguard-local: serving %s/Worker, %s/Enqueue and %s/CleanupLocks\n", base, base, base)
	if emu != nil {
		fmt.Fprintf(os.Stderr, "taskguard-local: Cloud Tasks emulator at %s, queue %s\n", emu.Addr(), localQueue)
	}

	if *demo {
		return runDemo(ctx, os.Stdout, base, rec, emu, endpoint, cfg.Busy != app.Busy429)
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-serveErr:
		return err
	}
}

// serverTimeouts bound how long a client may take to send a request.
type serverTimeouts struct {
	// header bounds reading a request's headers; read, its headers and
	// body; idle, the wait for the next request on a kept-alive connection.
	header, read, idle time.Duration
}

// defaultTimeouts: a task body is at most 1 MB, over loopback or a LAN.
// There is no write timeout: a Worker's job may run for 30 minutes.
var defaultTimeouts = serverTimeouts{header: 10 * time.Second, read: time.Minute, idle: 2 * time.Minute}

// newServer returns a server of h whose reads are bounded by t: a client
// that stalls in its headers or body is cut off, and the handler's read
// fails, when the timeout passes.
func newServer(h http.Handler, t serverTimeouts) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: t.header,
		ReadTimeout:       t.read,
		IdleTimeout:       t.idle,
		MaxHeaderBytes:    64 << 10,
	}
}

// serveLoopback serves h on a free loopback port.
func serveLoopback(h http.Handler) (string, func(), error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	srv := newServer(h, defaultTimeouts)
	go srv.Serve(ln)
	return "http://" + ln.Addr().String(), func() { srv.Close() }, nil
}

func waitListening(ctx context.Context, addr string, serveErr <-chan error) error {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case err := <-serveErr:
			return fmt.Errorf("functions framework: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return errors.New("functions framework did not start listening within 30s")
}
