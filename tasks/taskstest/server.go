package taskstest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	cloudtasks "cloud.google.com/go/cloudtasks/apiv2"
	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Limits of the managed service that the emulator enforces.
const (
	// MaxTaskSize is the largest task, in bytes of its protocol buffer
	// encoding, that CreateTask accepts.
	MaxTaskSize = 1 << 20
	// MaxScheduleAhead is how far in the future a task may be scheduled.
	MaxScheduleAhead = 30 * 24 * time.Hour
	// MaxTaskIDLength is the longest task id.
	MaxTaskIDLength = 500
	// DefaultDispatchDeadline is the dispatch deadline of a task that sets
	// none.
	DefaultDispatchDeadline = 10 * time.Minute
	// MaxDispatchDeadline is the longest dispatch deadline of an HTTP task.
	MaxDispatchDeadline = 30 * time.Minute
	// DefaultDedupWindow is how long the name of a finished or deleted task
	// stays reserved.
	DefaultDedupWindow = time.Hour
	// DefaultQueueReuseDelay is how long the name of a deleted queue stays
	// reserved.
	DefaultQueueReuseDelay = 7 * 24 * time.Hour
)

// Options configures a Server. The zero value is usable.
type Options struct {
	// Addr is the address the gRPC server listens on; "127.0.0.1:0" (a free
	// loopback port) when empty.
	Addr string
	// DedupWindow is how long the name of a deleted, succeeded or abandoned
	// task stays reserved; DefaultDedupWindow when zero.
	DedupWindow time.Duration
	// AutoCreateQueues makes CreateTask create a missing queue with default
	// settings instead of answering NOT_FOUND as the service does.
	AutoCreateQueues bool
	// MinDispatchDeadline is the shortest dispatch deadline a task may ask
	// for; 15 s (the service's limit) when zero. Tests lower it to prove
	// deadlines quickly.
	MinDispatchDeadline time.Duration
	// QueueReuseDelay is how long the name of a deleted queue stays
	// reserved: creating a queue of that name, or a task in it, fails with
	// FAILED_PRECONDITION. DefaultQueueReuseDelay when zero.
	QueueReuseDelay time.Duration
	// SubsecondBackoffs keeps the sub-second part of min_backoff,
	// max_backoff and max_retry_duration. The service truncates them to
	// whole seconds, and so does the emulator unless this is set; tests set
	// it to retry in milliseconds.
	SubsecondBackoffs bool
	// NoSystemThrottling turns off the model of system throttling (see the
	// package documentation): 429 and 503 answers then delay only the task
	// that got them.
	NoSystemThrottling bool
	// MaxRetryAfter, when > 0, caps how long a Retry-After answer delays the
	// next attempt. Zero honours Retry-After in full, as the service does.
	MaxRetryAfter time.Duration
	// HTTPClient sends the dispatches; a client with its own transport when
	// nil. Its Timeout should be zero: the dispatch deadline applies.
	HTTPClient *http.Client
	// Logger receives one debug record per attempt; nothing is logged when
	// nil.
	Logger *slog.Logger
	// OnAttempt, when set, is called after every attempt finished, from the
	// dispatching goroutine.
	OnAttempt func(Attempt)
	// CreateTaskLatency, when > 0, is added to every CreateTask call: half
	// before the task is created, half before the answer, as a round trip to
	// the service would. Zero answers at once. For benchmarks that model a
	// deployment (internal/netdelay).
	CreateTaskLatency time.Duration
	// DispatchDelay and DispatchJitter, when > 0, hold every attempt's HTTP
	// request back by DispatchDelay plus a uniformly drawn part of
	// [0, DispatchJitter) after the emulator starts the attempt, as the
	// service's dispatch latency would. Attempt.Dispatched is when the
	// request was sent. Zero sends at once.
	DispatchDelay, DispatchJitter time.Duration
}

// Attempt records one dispatch of a task.
type Attempt struct {
	// Queue is the full queue name, Task the task id.
	Queue, Task string
	// Number counts the attempts of this task, from 1.
	Number int
	// Scheduled is when the attempt was due; Dispatched and Responded when it
	// started and ended.
	Scheduled, Dispatched, Responded time.Time
	// Status is the HTTP status of the answer, 0 when none came.
	Status int
	// RetryAfter is the Retry-After the answer carried, 0 when none.
	RetryAfter time.Duration
	// Err is the transport error or deadline, nil when an answer came.
	Err error
	// Header is the request header that was sent.
	Header http.Header
	// Outcome says what the emulator did next: "done", "retry", "gave-up" or
	// "deleted" (the task was deleted while the attempt ran).
	Outcome string
	// NextAttempt is when the next attempt is due, for Outcome "retry".
	NextAttempt time.Time
}

// Server is a running emulator. Its methods are safe for concurrent use.
type Server struct {
	cloudtaskspb.UnimplementedCloudTasksServer

	opts     Options
	lis      net.Listener
	grpc     *grpc.Server
	http     *http.Client
	ownHTTP  *http.Transport // closed on Close when the emulator made it
	ctx      context.Context // cancelled by Close; parent of every dispatch
	cancel   context.CancelFunc
	wg       sync.WaitGroup // serve loop, queue loops and dispatches
	serveErr chan error

	mu       sync.Mutex
	queues   map[string]*queue    // by full name
	tombs    map[string]time.Time // deleted queue's name -> end of its reuse delay
	attempts []Attempt
	changed  chan struct{} // closed and replaced on every state change
	closed   bool
}

// New starts an emulator listening on opts.Addr. Close stops it.
func New(opts Options) (*Server, error) {
	if opts.Addr == "" {
		opts.Addr = "127.0.0.1:0"
	}
	if opts.DedupWindow <= 0 {
		opts.DedupWindow = DefaultDedupWindow
	}
	if opts.QueueReuseDelay <= 0 {
		opts.QueueReuseDelay = DefaultQueueReuseDelay
	}
	if opts.MinDispatchDeadline <= 0 {
		opts.MinDispatchDeadline = 15 * time.Second
	}
	lis, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("taskstest: listen: %w", err)
	}
	s := &Server{
		opts:     opts,
		lis:      lis,
		grpc:     grpc.NewServer(),
		queues:   map[string]*queue{},
		tombs:    map[string]time.Time{},
		changed:  make(chan struct{}),
		serveErr: make(chan error, 1),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.http = opts.HTTPClient
	if s.http == nil {
		s.ownHTTP = &http.Transport{
			Proxy:               nil,
			MaxIdleConnsPerHost: 100,
			IdleConnTimeout:     30 * time.Second,
		}
		s.http = &http.Client{Transport: s.ownHTTP}
	}
	cloudtaskspb.RegisterCloudTasksServer(s.grpc, s)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.serveErr <- s.grpc.Serve(lis)
	}()
	return s, nil
}

// Start starts an emulator for the test and stops it when the test ends.
// It fails the test when the emulator cannot start.
func Start(tb testing.TB, opts Options) *Server {
	tb.Helper()
	s, err := New(opts)
	if err != nil {
		tb.Fatalf("taskstest: %v", err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("taskstest: close: %v", err)
		}
	})
	return s
}

// Addr is the host:port the gRPC server listens on.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// ClientOptions are the options that connect the real Cloud Tasks client to
// this server: its endpoint, no authentication, and plaintext gRPC.
func (s *Server) ClientOptions() []option.ClientOption {
	return []option.ClientOption{
		option.WithEndpoint(s.Addr()),
		option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
	}
}

// NewClient returns a real Cloud Tasks client connected to this server. The
// caller closes it.
func (s *Server) NewClient(ctx context.Context) (*cloudtasks.Client, error) {
	return cloudtasks.NewClient(ctx, s.ClientOptions()...)
}

// Close stops the gRPC server, cancels every dispatch in flight and waits
// for all of the emulator's goroutines to end. Tasks still queued are lost.
// Close is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for _, q := range s.queues {
		q.stop()
	}
	s.notifyLocked()
	s.mu.Unlock()

	s.grpc.Stop()
	s.cancel()
	s.wg.Wait()
	if s.ownHTTP != nil {
		s.ownHTTP.CloseIdleConnections()
	}
	if err := <-s.serveErr; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("taskstest: serve: %w", err)
	}
	return nil
}

// Attempts returns a copy of every attempt made so far, in the order they
// finished.
func (s *Server) Attempts() []Attempt {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Attempt(nil), s.attempts...)
}

// WaitIdle blocks until the queue named queueName holds no task (every task
// succeeded, gave up or was deleted) or ctx is done, and then returns
// ctx.Err(). A queue that does not exist counts as idle.
func (s *Server) WaitIdle(ctx context.Context, queueName string) error {
	for {
		s.mu.Lock()
		q := s.queues[queueName]
		idle := q == nil || len(q.tasks) == 0
		ch := s.changed
		s.mu.Unlock()
		if idle {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("taskstest: wait idle: %w", ctx.Err())
		}
	}
}

// DispatchRate is the rate, in dispatches per second, at which the queue
// named queueName may dispatch now: its max_dispatches_per_second, lowered
// while system throttling lasts. It is 0 for a queue that does not exist.
func (s *Server) DispatchRate(queueName string) float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.queues[queueName]
	if q == nil {
		return 0
	}
	rate, _ := q.limits(time.Now())
	return rate
}

// notifyLocked wakes WaitIdle callers. s.mu must be held.
func (s *Server) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Server) logf(msg string, args ...any) {
	if s.opts.Logger != nil {
		s.opts.Logger.Debug(msg, args...)
	}
}

// drain reads and discards at most 1 MB of an answer so the connection can
// be reused.
func drain(r io.Reader) {
	_, _ = io.Copy(io.Discard, io.LimitReader(r, 1<<20))
}
