package tasks_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"

	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// deployedEnv is what deploy/ gives a function, with the queue of the tests.
func deployedEnv(deadline string) map[string]string {
	return map[string]string{
		tasks.EnvQueue:              queueName,
		tasks.EnvWorkerURL:          "https://worker-123456789012.europe-west1.run.app",
		tasks.EnvTaskServiceAccount: "taskguard-tasks@proj.iam.gserviceaccount.com",
		tasks.EnvTaskDeadline:       deadline,
	}
}

func getenv(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestConfigFromEnv(t *testing.T) {
	cfg, err := tasks.ConfigFromEnv(getenv(deployedEnv("300s")))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Queue != queueName || cfg.WorkerURL != "https://worker-123456789012.europe-west1.run.app" ||
		cfg.ServiceAccount != "taskguard-tasks@proj.iam.gserviceaccount.com" || cfg.DispatchDeadline != 5*time.Minute {
		t.Errorf("config %+v", cfg)
	}
	cfg, err = tasks.ConfigFromEnv(getenv(deployedEnv("")))
	if err != nil || cfg.DispatchDeadline != tasks.DefaultEnvTaskDeadline {
		t.Errorf("without %s: %+v, %v; want the dispatch deadline %v", tasks.EnvTaskDeadline, cfg, err, tasks.DefaultEnvTaskDeadline)
	}

	with := func(kv ...string) map[string]string {
		m := deployedEnv("300s")
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	tests := []struct {
		name          string
		env           map[string]string
		says          []string
		notConfigured bool
	}{
		{"nothing", map[string]string{}, []string{tasks.EnvQueue, tasks.EnvWorkerURL, tasks.EnvTaskServiceAccount}, true},
		{"deadline only", map[string]string{tasks.EnvTaskDeadline: "60s"}, []string{tasks.EnvQueue}, true},
		{"two of three", with(tasks.EnvTaskServiceAccount, ""), []string{tasks.EnvTaskServiceAccount + " is not set"}, false},
		{"deadline not a duration", with(tasks.EnvTaskDeadline, "1800"), []string{tasks.EnvTaskDeadline + `="1800" is not a Go duration`}, false},
		{"deadline above 30 min", with(tasks.EnvTaskDeadline, "1h"), []string{tasks.EnvTaskDeadline + `="1h" is outside [15s, 30m0s]`}, false},
		{"deadline below 15 s", with(tasks.EnvTaskDeadline, "10s"), []string{"is outside [15s, 30m0s]"}, false},
		{"queue and URL wrong at once", with(tasks.EnvQueue, "jobs", tasks.EnvWorkerURL, "worker"),
			[]string{tasks.EnvQueue + `="jobs" is not projects/`, tasks.EnvWorkerURL + `="worker" is not the Worker's`}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tasks.ConfigFromEnv(getenv(tt.env))
			if !errors.Is(err, tasks.ErrInvalidConfig) {
				t.Fatalf("err %v, want ErrInvalidConfig", err)
			}
			if errors.Is(err, tasks.ErrNotConfigured) != tt.notConfigured {
				t.Errorf("errors.Is(err, ErrNotConfigured) = %v, want %v: %v", !tt.notConfigured, tt.notConfigured, err)
			}
			for _, s := range tt.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
		})
	}
}

// setDeployedEnv sets the deployed functions' variables, and the emulator's
// address for NewClient, for the rest of the test.
func setDeployedEnv(t *testing.T, srv *taskstest.Server, deadline string) {
	t.Helper()
	for k, v := range deployedEnv(deadline) {
		t.Setenv(k, v)
	}
	t.Setenv(tasks.EnvEmulatorHost, srv.Addr())
}

func TestNewClientFromEnvUsesTheDeployedDeadline(t *testing.T) {
	srv := startQueue(t, taskstest.Options{}, nil)
	setDeployedEnv(t, srv, "300s")
	c, err := tasks.NewClientFromEnv(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.DispatchDeadline() != 5*time.Minute {
		t.Errorf("DispatchDeadline() = %v, want 5m0s", c.DispatchDeadline())
	}
	name, err := c.Enqueue(t.Context(), tasks.Task{Job: "resize", LockID: "user-42", Delay: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	admin, err := srv.NewClient(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	got, err := admin.GetTask(t.Context(), &cloudtaskspb.GetTaskRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	if d := got.GetDispatchDeadline().AsDuration(); d != 5*time.Minute {
		t.Errorf("task's dispatch deadline %v, want 5m0s (TASKGUARD_TASK_DEADLINE)", d)
	}
	if u := got.GetHttpRequest().GetUrl(); u != "https://worker-123456789012.europe-west1.run.app" {
		t.Errorf("task URL %q", u)
	}
}

// TestLazyClientRetriesStartErrorsThatMayPass is the code of a function
// that enqueues from its own code, started while its credentials cannot be
// found yet: the first Enqueue fails, the next one builds the client and
// enqueues, and the client is built once.
func TestLazyClientRetriesStartErrorsThatMayPass(t *testing.T) {
	srv := startQueue(t, taskstest.Options{}, nil)
	setDeployedEnv(t, srv, "")
	l := tasks.LazyClientFromEnv()
	defer l.Close()
	var builds atomic.Int32
	transient := errors.New("google: could not find default credentials: metadata server not ready")
	tasks.SetConnect(l, func(ctx context.Context, real func(context.Context) (*tasks.Client, error)) (*tasks.Client, error) {
		if builds.Add(1) == 1 {
			return nil, transient
		}
		return real(ctx)
	})
	task := tasks.Task{Job: "send-receipt", LockID: "order-1", Delay: time.Hour}
	if _, err := l.Enqueue(t.Context(), task); !errors.Is(err, transient) {
		t.Fatalf("first Enqueue: %v, want the start-up error", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	name, err := l.Enqueue(ctx, task)
	if err != nil {
		t.Fatalf("second Enqueue: %v; a start-up error that may pass was kept", err)
	}
	cancel() // the request that built the client ends; the client stays usable
	if !strings.HasPrefix(name, queueName+"/tasks/") {
		t.Errorf("task %q", name)
	}
	if _, err := l.Enqueue(t.Context(), task); err != nil {
		t.Fatalf("third Enqueue, after the building request's context ended: %v", err)
	}
	if n := builds.Load(); n != 2 {
		t.Errorf("client built %d times, want 2 (one failure, then once)", n)
	}
	c, err := l.Client(t.Context())
	if err != nil || c.DispatchDeadline() != tasks.DefaultEnvTaskDeadline {
		t.Errorf("Client() = %v, %v; want the built client with the default deadline", c, err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Enqueue(t.Context(), task); !errors.Is(err, tasks.ErrClosed) {
		t.Errorf("Enqueue after Close: %v, want ErrClosed", err)
	}
}

// TestLazyClientKeepsConfigurationErrors: a configuration error will not pass
// until the function is redeployed, so it is not retried on every Enqueue.
func TestLazyClientKeepsConfigurationErrors(t *testing.T) {
	srv := startQueue(t, taskstest.Options{}, nil)
	setDeployedEnv(t, srv, "2h")
	l := tasks.LazyClientFromEnv()
	defer l.Close()
	var builds atomic.Int32
	tasks.SetConnect(l, func(ctx context.Context, real func(context.Context) (*tasks.Client, error)) (*tasks.Client, error) {
		builds.Add(1)
		return real(ctx)
	})
	for range 3 {
		_, err := l.Enqueue(t.Context(), tasks.Task{Job: "j", LockID: "l"})
		if !errors.Is(err, tasks.ErrInvalidConfig) || !strings.Contains(err.Error(), tasks.EnvTaskDeadline) {
			t.Fatalf("Enqueue: %v, want ErrInvalidConfig naming %s", err, tasks.EnvTaskDeadline)
		}
	}
	if n := builds.Load(); n != 1 {
		t.Errorf("built %d times, want once: a configuration error is kept", n)
	}
}
