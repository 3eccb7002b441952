package tasks_test

import (
	"testing"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"

	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// TestNewClientHonoursEmulatorHost: with CLOUD_TASKS_EMULATOR_HOST set,
// NewClient without options enqueues into that emulator, as the Datastore
// client honours DATASTORE_EMULATOR_HOST.
func TestNewClientHonoursEmulatorHost(t *testing.T) {
	srv := startQueue(t, taskstest.Options{}, &cloudtaskspb.Queue{State: cloudtaskspb.Queue_PAUSED})
	t.Setenv(tasks.EnvEmulatorHost, srv.Addr())
	c, err := tasks.NewClient(t.Context(), baseConfig("http://127.0.0.1:1/Worker"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	name, err := c.Enqueue(t.Context(), tasks.Task{Job: "charge", LockID: "customer-z"})
	if err != nil {
		t.Fatalf("Enqueue through %s=%s: %v", tasks.EnvEmulatorHost, srv.Addr(), err)
	}
	admin, err := srv.NewClient(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.GetTask(t.Context(), &cloudtaskspb.GetTaskRequest{Name: name}); err != nil {
		t.Errorf("the emulator does not have task %s: %v", name, err)
	}
}
