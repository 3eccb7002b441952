package tasks

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"sync"
	"time"

	"github.com/taskguard/taskguard/internal/ident"
	"github.com/taskguard/taskguard/locking"

	cloudtasks "cloud.google.com/go/cloudtasks/apiv2"
	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Limits of Cloud Tasks that Enqueue checks before any RPC.
const (
	// MaxTaskSize is the largest task Cloud Tasks accepts, in bytes of the
	// task's protocol buffer encoding (body, URL, headers and settings).
	MaxTaskSize = 1 << 20
	// MaxScheduleAhead is how far ahead a task may be scheduled.
	MaxScheduleAhead = 30 * 24 * time.Hour
	// MinDispatchDeadline and MaxDispatchDeadline bound the dispatch deadline
	// of an HTTP task.
	MinDispatchDeadline = 15 * time.Second
	MaxDispatchDeadline = 30 * time.Minute
	// DefaultDispatchDeadline is Cloud Tasks' own default, used when Config
	// sets neither DispatchDeadline nor WorkerTimeout.
	DefaultDispatchDeadline = 10 * time.Minute
	// maxJobLength bounds a job name.
	maxJobLength = 256
)

var queueRE = regexp.MustCompile(`^projects/[A-Za-z0-9\-:.]+/locations/[A-Za-z0-9\-]+/queues/[A-Za-z0-9\-]{1,100}$`)

// ValidQueue reports whether name is a full queue name,
// "projects/PROJECT/locations/LOCATION/queues/QUEUE", as Config.Queue
// needs it: the one rule every part of taskguard checks queue names by.
func ValidQueue(name string) bool { return queueRE.MatchString(name) }

// Config configures a Client.
type Config struct {
	// Queue is the full queue name,
	// "projects/PROJECT/locations/LOCATION/queues/QUEUE". Required.
	Queue string
	// WorkerURL is the http(s) URL of the function serving the Worker.
	// Required.
	WorkerURL string
	// ServiceAccount is the email of the service account whose OIDC token
	// Cloud Tasks sends to the worker. It needs roles/run.invoker on the
	// worker, and the enqueuer needs iam.serviceAccounts.actAs on it.
	// Required: the worker must be deployed --no-allow-unauthenticated.
	ServiceAccount string
	// Audience is the OIDC token's audience; WorkerURL when empty.
	Audience string
	// WorkerTimeout is the worker's request timeout (the function's
	// --timeout). When DispatchDeadline is zero, the dispatch deadline is
	// WorkerTimeout plus DeadlineMargin, within Cloud Tasks' bounds, so Cloud
	// Tasks does not give up on an attempt the worker is still running.
	WorkerTimeout time.Duration
	// DispatchDeadline is how long Cloud Tasks waits for the worker's answer
	// before it cancels the attempt and retries. It must be within [15 s,
	// 30 min]. When zero it is derived from WorkerTimeout, or else Cloud
	// Tasks' default of 10 min. Should the worker run past it, the retry finds
	// the lock still held and is answered 429: the work never overlaps.
	DispatchDeadline time.Duration
}

// DeadlineMargin is added to Config.WorkerTimeout to derive the dispatch
// deadline: the time for the platform to answer after the function's own
// timeout.
const DeadlineMargin = 10 * time.Second

// Client enqueues tasks for a Worker. Create one per process and reuse it;
// it is safe for concurrent use. Close releases its connection.
type Client struct {
	cfg      Config
	deadline time.Duration
	tasks    *cloudtasks.Client
	now      func() time.Time

	parkMu     sync.Mutex
	park       *enqueueParking // ParkAtEnqueue's; guarded by parkMu
	coalescing map[string]bool // jobs that coalesce in park mode (nil: none yet); guarded by parkMu
}

// EnvEmulatorHost names the environment variable that points NewClient at
// a Cloud Tasks emulator (host:port), as DATASTORE_EMULATOR_HOST points the
// Datastore client at its emulator.
const EnvEmulatorHost = "CLOUD_TASKS_EMULATOR_HOST"

// EmulatorOptions are the client options that connect to a Cloud Tasks
// emulator at addr (host:port), such as package taskstest's: its endpoint,
// no authentication, and plaintext gRPC.
func EmulatorOptions(addr string) []option.ClientOption {
	return []option.ClientOption{
		option.WithEndpoint(addr),
		option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
	}
}

// An Enqueuer enqueues tasks. *Client is the production one; code that
// enqueues can take an Enqueuer so that its tests pass a fake (see
// taskstest.NewRequest to deliver what the fake received to a Worker).
type Enqueuer interface {
	Enqueue(ctx context.Context, t Task) (name string, err error)
}

var _ Enqueuer = (*Client)(nil)

// NewClient validates cfg and connects to Cloud Tasks with opts (none in
// production). When CLOUD_TASKS_EMULATOR_HOST is set it connects to that
// emulator instead (EmulatorOptions), unless opts say otherwise: opts are
// applied after, and win. It returns an error wrapping ErrInvalidConfig,
// before any I/O, for a bad cfg. Creating the client does no network I/O;
// the connection is made on the first Enqueue.
func NewClient(ctx context.Context, cfg Config, opts ...option.ClientOption) (*Client, error) {
	deadline, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	if addr := os.Getenv(EnvEmulatorHost); addr != "" {
		opts = append(EmulatorOptions(addr), opts...)
	}
	tc, err := cloudtasks.NewClient(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("tasks: connect to Cloud Tasks: %w", err)
	}
	return &Client{cfg: cfg, deadline: deadline, tasks: tc, now: time.Now}, nil
}

func (cfg *Config) validate() (time.Duration, error) {
	bad := func(format string, args ...any) (time.Duration, error) {
		return 0, fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, args...)...)
	}
	if !queueRE.MatchString(cfg.Queue) {
		return bad("Queue %q is not projects/P/locations/L/queues/Q", cfg.Queue)
	}
	u, err := url.Parse(cfg.WorkerURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return bad("WorkerURL %q is not an absolute http(s) URL", cfg.WorkerURL)
	}
	if cfg.ServiceAccount == "" {
		return bad("ServiceAccount is required (the worker must check OIDC tokens)")
	}
	if cfg.Audience == "" {
		cfg.Audience = cfg.WorkerURL
	}
	if cfg.WorkerTimeout < 0 {
		return bad("WorkerTimeout %v is negative", cfg.WorkerTimeout)
	}
	d := cfg.DispatchDeadline
	switch {
	case d != 0 && (d < MinDispatchDeadline || d > MaxDispatchDeadline):
		return bad("DispatchDeadline %v outside [%v, %v]", d, MinDispatchDeadline, MaxDispatchDeadline)
	case d == 0 && cfg.WorkerTimeout > 0:
		d = min(max(cfg.WorkerTimeout+DeadlineMargin, MinDispatchDeadline), MaxDispatchDeadline)
	case d == 0:
		d = DefaultDispatchDeadline
	}
	return d, nil
}

// Close closes the connection to Cloud Tasks.
func (c *Client) Close() error { return c.tasks.Close() }

// DispatchDeadline is the dispatch deadline of the tasks this client
// creates.
func (c *Client) DispatchDeadline() time.Duration { return c.deadline }

// Task is one unit of work to enqueue.
type Task struct {
	// Job names the function registered with Worker.Handle that runs the
	// task. Required; valid UTF-8, at most 256 bytes.
	Job string
	// LockID is the lock the task runs under: two tasks with the same LockID
	// never run at the same time. Required; valid UTF-8. The worker takes
	// the lock of exactly these bytes.
	LockID string
	// Payload is the job's input: []byte is delivered as these bytes,
	// json.RawMessage as this JSON, anything else as its encoding/json
	// encoding. Nil for none.
	Payload any
	// Delay postpones the first attempt by this much; ScheduleTime sets it
	// instead. At most one of them may be set, at most 30 days ahead.
	Delay        time.Duration
	ScheduleTime time.Time
	// Name, when set, de-duplicates the task: while a task of this job and
	// name exists in the queue, or for about an hour after it ran or was
	// deleted, Enqueue of another one fails with ErrDuplicate (a Client
	// that parks at enqueue runs it once all the same, but may return nil:
	// see ParkAtEnqueue). The name is hashed (with the job) into the task
	// id, so it may be any string.
	Name string
}

// Enqueue creates the task in the queue and returns its full task name.
//
// Bad input fails before any RPC with an error wrapping ErrInvalidTask: an
// empty job or lock id, a job or lock id that is not valid UTF-8 (the task's
// JSON body cannot carry it byte for byte; the error quotes it), both Delay and ScheduleTime, a negative delay, a
// schedule more than 30 days ahead, a payload that does not encode, or a
// task over MaxTaskSize (that error wraps ErrTooLarge too). When a task of
// the same Name exists or ran recently, Enqueue returns the name and an error
// wrapping ErrDuplicate: the task is already, or was, enqueued, and callers
// may treat that as success. Other errors are Cloud Tasks' (a gRPC status);
// a timeout may leave the task created, so retry with a Name when a duplicate
// would matter.
func (c *Client) Enqueue(ctx context.Context, t Task) (string, error) {
	req, err := c.request(t)
	if err != nil {
		return "", err
	}
	p := c.parking()
	now := c.now()
	if p != nil && req.Task.ScheduleTime == nil && c.mayPark(t) && !p.direct(t.LockID, now) {
		return c.parkTask(ctx, p, t, req, now)
	}
	created, err := c.tasks.CreateTask(ctx, req)
	if err != nil {
		if status.Code(err) == codes.AlreadyExists && req.Task.Name != "" {
			return req.Task.Name, fmt.Errorf("%w: %s: %w", ErrDuplicate, req.Task.Name, err)
		}
		return "", fmt.Errorf("tasks: create task for job %q: %w", t.Job, err)
	}
	return created.GetName(), nil
}

// BuildRequest returns the CreateTaskRequest that a Client of cfg would
// send for t, without connecting to Cloud Tasks or sending anything. It
// fails as NewClient does for a bad cfg (ErrInvalidConfig) and as Enqueue
// does for a bad t (ErrInvalidTask). Its task's HTTP request is what Cloud
// Tasks delivers to the Worker; taskstest.NewRequest turns it into that
// *http.Request.
func BuildRequest(cfg Config, t Task) (*cloudtaskspb.CreateTaskRequest, error) {
	deadline, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	c := &Client{cfg: cfg, deadline: deadline, now: time.Now}
	return c.request(t)
}

// request builds and checks the CreateTaskRequest for t.
func (c *Client) request(t Task) (*cloudtaskspb.CreateTaskRequest, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidTask}, args...)...)
	}
	switch {
	case t.Job == "":
		return nil, bad("empty job")
	case len(t.Job) > maxJobLength:
		return nil, bad("job name longer than %d bytes", maxJobLength)
	case t.LockID == "":
		return nil, bad("empty lock id (job %q)", t.Job)
	case ident.Check("job", t.Job) != nil:
		return nil, bad("%v", ident.Check("job", t.Job))
	case ident.Check("lock id", t.LockID) != nil:
		return nil, bad("%v", ident.Check("lock id", t.LockID))
	case t.Delay < 0:
		return nil, bad("negative delay %v", t.Delay)
	case t.Delay > 0 && !t.ScheduleTime.IsZero():
		return nil, bad("both Delay and ScheduleTime set")
	}
	now := c.now()
	var when time.Time
	switch {
	case t.Delay > 0:
		when = now.Add(t.Delay)
	case !t.ScheduleTime.IsZero():
		when = t.ScheduleTime
	}
	if !when.IsZero() && when.Sub(now) > MaxScheduleAhead {
		return nil, bad("scheduled %v ahead, more than 30 days", when.Sub(now).Round(time.Second))
	}

	env := envelope{V: envelopeVersion, Job: ident.String(t.Job), LockID: ident.String(t.LockID), EnqueuedAt: now.UTC()}
	if err := env.encodePayload(t.Payload); err != nil {
		return nil, err
	}
	body, err := json.Marshal(env)
	if err != nil {
		return nil, bad("encode envelope: %v", err)
	}
	task := &cloudtaskspb.Task{
		DispatchDeadline: durationpb.New(c.deadline),
		MessageType: &cloudtaskspb.Task_HttpRequest{HttpRequest: &cloudtaskspb.HttpRequest{
			Url:        c.cfg.WorkerURL,
			HttpMethod: cloudtaskspb.HttpMethod_POST,
			Headers:    map[string]string{"Content-Type": "application/json"},
			Body:       body,
			AuthorizationHeader: &cloudtaskspb.HttpRequest_OidcToken{OidcToken: &cloudtaskspb.OidcToken{
				ServiceAccountEmail: c.cfg.ServiceAccount,
				Audience:            c.cfg.Audience,
			}},
		}},
	}
	if !when.IsZero() {
		task.ScheduleTime = timestamppb.New(when)
	}
	if t.Name != "" {
		task.Name = c.cfg.Queue + "/tasks/" + TaskID(t.Job, t.Name)
	}
	if size := proto.Size(task); size > MaxTaskSize {
		return nil, fmt.Errorf("%w: %w: %d bytes, limit %d", ErrInvalidTask, ErrTooLarge, size, MaxTaskSize)
	}
	return &cloudtaskspb.CreateTaskRequest{Parent: c.cfg.Queue, Task: task}, nil
}

// TaskID is the task id Enqueue gives a task of job with the dedup name
// name: a hex SHA-256 of both, a valid id of uniformly spread names (Cloud
// Tasks advises against sequential ids).
func TaskID(job, name string) string {
	h := sha256.New()
	h.Write([]byte(job))
	h.Write([]byte{0})
	h.Write([]byte(name))
	return hex.EncodeToString(h.Sum(nil))
}

// Errors of the tasks package.
var (
	// ErrInvalidConfig reports an unusable Config or worker option. It
	// wraps locking.ErrInvalid, as every bad-configuration error of this
	// module does.
	ErrInvalidConfig = locking.NewInvalid("tasks: invalid configuration")
	// ErrInvalidTask reports a task Enqueue refused before any RPC. It wraps
	// locking.ErrInvalid.
	ErrInvalidTask = locking.NewInvalid("tasks: invalid task")
	// ErrTooLarge reports a task over MaxTaskSize; it comes wrapped together
	// with ErrInvalidTask.
	ErrTooLarge = errors.New("tasks: task too large")
	// ErrDuplicate reports that a task of the same job and Name exists or
	// ran recently (Cloud Tasks' ALREADY_EXISTS).
	ErrDuplicate = errors.New("tasks: duplicate task name")
)
