// Command tasks-emulator runs the local Cloud Tasks emulator of package
// taskstest as a process, for local runs of a worker.
//
// Usage:
//
//	tasks-emulator [-addr 127.0.0.1:8123] [-queue projects/P/locations/L/queues/Q]...
//
// Set CLOUD_TASKS_EMULATOR_HOST=addr for tasks.NewClient, or point the Go
// client at it with option.WithEndpoint(addr),
// option.WithoutAuthentication() and an insecure gRPC transport. It stops on
// SIGINT or SIGTERM; every task still queued is lost.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"

	"github.com/taskguard/taskguard/tasks/taskstest"
)

type queueList []string

func (q *queueList) String() string     { return strings.Join(*q, ",") }
func (q *queueList) Set(v string) error { *q = append(*q, v); return nil }

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "tasks-emulator:", err)
		os.Exit(1)
	}
}

func run() error {
	var queues queueList
	addr := flag.String("addr", "127.0.0.1:8123", "gRPC listen address")
	dedup := flag.Duration("dedup-window", taskstest.DefaultDedupWindow, "how long a finished or deleted task's name stays reserved")
	auto := flag.Bool("auto-create-queues", false, "create a missing queue on CreateTask instead of answering NOT_FOUND")
	minDeadline := flag.Duration("min-dispatch-deadline", 0, "shortest dispatch deadline a task may ask for (default 15s, the service's)")
	maxRetryAfter := flag.Duration("max-retry-after", 0, "cap on how long a Retry-After answer delays a retry (default: honoured in full)")
	subsecond := flag.Bool("subsecond-backoffs", false, "keep sub-second backoffs (the service truncates them to whole seconds)")
	noThrottling := flag.Bool("no-system-throttling", false, "do not slow the queue after 429 and 503 answers (the service does)")
	reuse := flag.Duration("queue-reuse-delay", taskstest.DefaultQueueReuseDelay, "how long a deleted queue's name stays reserved")
	createLatency := flag.Duration("create-task-latency", 0, "added to every CreateTask call, like the service's (e.g. 50ms)")
	dispatchDelay := flag.Duration("dispatch-delay", 0, "delay before every attempt is sent, like the service's dispatch latency (e.g. 50ms)")
	dispatchJitter := flag.Duration("dispatch-jitter", 0, "up to this much more, drawn per attempt (e.g. 50ms)")
	verbose := flag.Bool("v", false, "log every attempt")
	flag.Var(&queues, "queue", "create this queue (full name) at start with default settings; repeatable")
	flag.Parse()

	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	srv, err := taskstest.New(taskstest.Options{
		Addr:                *addr,
		DedupWindow:         *dedup,
		AutoCreateQueues:    *auto,
		MinDispatchDeadline: *minDeadline,
		MaxRetryAfter:       *maxRetryAfter,
		SubsecondBackoffs:   *subsecond,
		NoSystemThrottling:  *noThrottling,
		QueueReuseDelay:     *reuse,
		CreateTaskLatency:   *createLatency,
		DispatchDelay:       *dispatchDelay,
		DispatchJitter:      *dispatchJitter,
		Logger:              logger,
	})
	if err != nil {
		return err
	}
	defer srv.Close()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	for _, name := range queues {
		i := strings.Index(name, "/queues/")
		if i < 0 {
			return fmt.Errorf("queue %q is not a full queue name", name)
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := srv.CreateQueue(cctx, &cloudtaskspb.CreateQueueRequest{Parent: name[:i], Queue: &cloudtaskspb.Queue{Name: name}})
		cancel()
		if err != nil {
			return fmt.Errorf("create queue %q: %w", name, err)
		}
	}
	logger.Info("Cloud Tasks emulator listening", "addr", srv.Addr(), "queues", queues.String())
	<-ctx.Done()
	logger.Info("stopping")
	return srv.Close()
}
