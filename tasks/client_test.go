package tasks_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"go.uber.org/goleak"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// afterTests holds functions TestMain runs after every test, before it
// checks for leaked goroutines (stopping shared emulators).
var afterTests []func()

func TestMain(m *testing.M) {
	workerProcess() // a re-executed Worker process never returns from here
	code := m.Run()
	for _, f := range afterTests {
		f()
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

const (
	location  = "projects/p/locations/l"
	queueName = location + "/queues/jobs"
	sa        = "worker@p.iam.gserviceaccount.com"
)

func baseConfig(url string) tasks.Config {
	return tasks.Config{Queue: queueName, WorkerURL: url, ServiceAccount: sa}
}

// deadEndpoint returns client options for an address where nothing listens:
// any RPC through them fails with a transport error.
func deadEndpoint(t *testing.T) []option.ClientOption {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close()
	return []option.ClientOption{
		option.WithEndpoint(addr),
		option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
	}
}

func TestNewClientConfig(t *testing.T) {
	tests := []struct {
		name     string
		mod      func(*tasks.Config)
		wantErr  bool
		deadline time.Duration
	}{
		{"defaults", func(*tasks.Config) {}, false, 10 * time.Minute},
		{"from worker timeout", func(c *tasks.Config) { c.WorkerTimeout = time.Minute }, false, 70 * time.Second},
		{"short worker timeout", func(c *tasks.Config) { c.WorkerTimeout = time.Second }, false, 15 * time.Second},
		{"long worker timeout", func(c *tasks.Config) { c.WorkerTimeout = time.Hour }, false, 30 * time.Minute},
		{"explicit", func(c *tasks.Config) { c.DispatchDeadline = 20 * time.Second; c.WorkerTimeout = time.Hour }, false, 20 * time.Second},
		{"deadline too short", func(c *tasks.Config) { c.DispatchDeadline = 14 * time.Second }, true, 0},
		{"deadline too long", func(c *tasks.Config) { c.DispatchDeadline = 31 * time.Minute }, true, 0},
		{"bad queue", func(c *tasks.Config) { c.Queue = "projects/p/queues/jobs" }, true, 0},
		{"queue with task", func(c *tasks.Config) { c.Queue = queueName + "/tasks/x" }, true, 0},
		{"no url", func(c *tasks.Config) { c.WorkerURL = "" }, true, 0},
		{"relative url", func(c *tasks.Config) { c.WorkerURL = "/worker" }, true, 0},
		{"no service account", func(c *tasks.Config) { c.ServiceAccount = "" }, true, 0},
		{"negative timeout", func(c *tasks.Config) { c.WorkerTimeout = -time.Second }, true, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := baseConfig("https://worker.example/Worker")
			tt.mod(&cfg)
			c, err := tasks.NewClient(t.Context(), cfg, deadEndpoint(t)...)
			if tt.wantErr {
				if !errors.Is(err, tasks.ErrInvalidConfig) {
					t.Fatalf("err = %v, want ErrInvalidConfig", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if got := c.DispatchDeadline(); got != tt.deadline {
				t.Errorf("dispatch deadline %v, want %v", got, tt.deadline)
			}
		})
	}
}

func TestEnqueueRefusesBadInputBeforeAnyRPC(t *testing.T) {
	// The client points at a dead address: an RPC would fail with a
	// transport error, never with ErrInvalidTask.
	c, err := tasks.NewClient(t.Context(), baseConfig("https://worker.example/"), deadEndpoint(t)...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ok := tasks.Task{Job: "j", LockID: "l"}
	tests := []struct {
		name   string
		mod    func(*tasks.Task)
		tooBig bool
	}{
		{"empty job", func(t *tasks.Task) { t.Job = "" }, false},
		{"long job", func(t *tasks.Task) { t.Job = strings.Repeat("j", 257) }, false},
		{"empty lock id", func(t *tasks.Task) { t.LockID = "" }, false},
		{"negative delay", func(t *tasks.Task) { t.Delay = -time.Second }, false},
		{"delay and time", func(t *tasks.Task) { t.Delay = time.Second; t.ScheduleTime = time.Now() }, false},
		{"delay over 30 days", func(t *tasks.Task) { t.Delay = 30*24*time.Hour + time.Minute }, false},
		{"time over 30 days", func(t *tasks.Task) { t.ScheduleTime = time.Now().Add(31 * 24 * time.Hour) }, false},
		{"unencodable payload", func(t *tasks.Task) { t.Payload = make(chan int) }, false},
		{"invalid raw JSON", func(t *tasks.Task) { t.Payload = json.RawMessage("{") }, false},
		{"payload over 1 MB", func(t *tasks.Task) { t.Payload = make([]byte, tasks.MaxTaskSize) }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			task := ok
			tt.mod(&task)
			_, err := c.Enqueue(t.Context(), task)
			if !errors.Is(err, tasks.ErrInvalidTask) {
				t.Fatalf("err = %v, want ErrInvalidTask", err)
			}
			if errors.Is(err, tasks.ErrTooLarge) != tt.tooBig {
				t.Errorf("errors.Is(err, ErrTooLarge) = %v, want %v", !tt.tooBig, tt.tooBig)
			}
		})
	}
	// The same client does reach the network for a valid task: the dead
	// address proves the checks above ran first.
	if _, err := c.Enqueue(t.Context(), ok); err == nil || errors.Is(err, tasks.ErrInvalidTask) {
		t.Fatalf("valid task on a dead endpoint: %v, want a transport error", err)
	}
}

// startQueue starts an emulator with the jobs queue and returns it.
func startQueue(t testing.TB, opts taskstest.Options, q *cloudtaskspb.Queue) *taskstest.Server {
	t.Helper()
	srv := taskstest.Start(t, opts)
	admin, err := srv.NewClient(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if q == nil {
		q = &cloudtaskspb.Queue{}
	}
	q.Name = queueName
	if _, err := admin.CreateQueue(t.Context(), &cloudtaskspb.CreateQueueRequest{Parent: location, Queue: q}); err != nil {
		t.Fatal(err)
	}
	return srv
}

func TestEnqueueCreatesTheTask(t *testing.T) {
	srv := startQueue(t, taskstest.Options{}, nil)
	cfg := baseConfig("https://worker.example/Worker")
	cfg.Audience = "https://worker.example"
	cfg.WorkerTimeout = 5 * time.Minute
	c, err := tasks.NewClient(t.Context(), cfg, srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	admin, err := srv.NewClient(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()

	tests := []struct {
		name    string
		payload any
		field   string // envelope field holding it
		want    string // its JSON
	}{
		{"struct", struct{ N int }{7}, "payload", `{"N":7}`},
		{"raw JSON", json.RawMessage(`[1,2]`), "payload", `[1,2]`},
		{"bytes", []byte{0, 1, 2}, "data", `"AAEC"`},
		{"none", nil, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := time.Now()
			name, err := c.Enqueue(t.Context(), tasks.Task{Job: "resize", LockID: "user-42", Payload: tt.payload, Delay: time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(name, queueName+"/tasks/") {
				t.Fatalf("name %q", name)
			}
			got, err := admin.GetTask(t.Context(), &cloudtaskspb.GetTaskRequest{Name: name, ResponseView: cloudtaskspb.Task_FULL})
			if err != nil {
				t.Fatal(err)
			}
			hr := got.GetHttpRequest()
			if hr.GetUrl() != cfg.WorkerURL || hr.GetHttpMethod() != cloudtaskspb.HttpMethod_POST ||
				hr.GetHeaders()["Content-Type"] != "application/json" {
				t.Errorf("request %v", hr)
			}
			if tok := hr.GetOidcToken(); tok.GetServiceAccountEmail() != sa || tok.GetAudience() != "https://worker.example" {
				t.Errorf("OIDC token %v", tok)
			}
			if d := got.GetDispatchDeadline().AsDuration(); d != 5*time.Minute+tasks.DeadlineMargin {
				t.Errorf("dispatch deadline %v", d)
			}
			if at := got.GetScheduleTime().AsTime(); at.Before(before.Add(time.Hour)) || at.After(time.Now().Add(time.Hour)) {
				t.Errorf("schedule time %v, want an hour from now", at)
			}
			var env map[string]json.RawMessage
			if err := json.Unmarshal(hr.GetBody(), &env); err != nil {
				t.Fatal(err)
			}
			if string(env["v"]) != "1" || string(env["job"]) != `"resize"` || string(env["lockId"]) != `"user-42"` {
				t.Errorf("envelope %s", hr.GetBody())
			}
			var at time.Time
			if err := json.Unmarshal(env["enqueuedAt"], &at); err != nil || at.Before(before.Add(-time.Second)) || at.After(time.Now()) {
				t.Errorf("enqueuedAt %s: %v", env["enqueuedAt"], err)
			}
			wantKeys := 4
			if tt.field != "" {
				wantKeys++
				if string(env[tt.field]) != tt.want {
					t.Errorf("%s = %s, want %s", tt.field, env[tt.field], tt.want)
				}
			}
			if len(env) != wantKeys {
				t.Errorf("envelope has %d fields: %s", len(env), hr.GetBody())
			}
		})
	}
}

func TestEnqueueDuplicateName(t *testing.T) {
	srv := startQueue(t, taskstest.Options{}, nil)
	c, err := tasks.NewClient(t.Context(), baseConfig("http://127.0.0.1:1/"), srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	task := tasks.Task{Job: "bill", LockID: "acct-1", Name: "invoice 2026/11 #1 ünïcode", Delay: time.Hour}
	first, err := c.Enqueue(t.Context(), task)
	if err != nil {
		t.Fatal(err)
	}
	id := first[strings.LastIndexByte(first, '/')+1:]
	if !regexp.MustCompile(`^[A-Za-z0-9_-]{1,500}$`).MatchString(id) || id != tasks.TaskID("bill", task.Name) {
		t.Errorf("task id %q", id)
	}
	second, err := c.Enqueue(t.Context(), task)
	if !errors.Is(err, tasks.ErrDuplicate) || second != first {
		t.Fatalf("second Enqueue: %q, %v; want %q, ErrDuplicate", second, err, first)
	}
	other := task
	other.Job = "refund"
	if _, err := c.Enqueue(t.Context(), other); err != nil {
		t.Errorf("same name, other job: %v", err)
	}
	unnamed := task
	unnamed.Name = ""
	a, err1 := c.Enqueue(t.Context(), unnamed)
	b, err2 := c.Enqueue(t.Context(), unnamed)
	if err1 != nil || err2 != nil || a == b {
		t.Errorf("unnamed tasks: %q %v, %q %v", a, err1, b, err2)
	}
}
