package app

import (
	"context"
	"net/http"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"

	"github.com/taskguard/taskguard/tasks"
)

// TestTasksCarryTheDeployedDeadline: the tasks Enqueue creates carry the
// dispatch deadline deploy/ sets (TASKGUARD_TASK_DEADLINE, the Worker's
// timeout too), not a constant: with a Worker timeout of 300 s, Cloud Tasks
// must not wait 30 min.
func TestTasksCarryTheDeployedDeadline(t *testing.T) {
	for _, tt := range []struct {
		env  string
		want time.Duration
	}{
		{"300s", 5 * time.Minute},
		{"", tasks.DefaultEnvTaskDeadline},
	} {
		t.Run("deadline="+tt.env, func(t *testing.T) {
			a, srv, emu := newTestApp(t, map[string]string{EnvTaskDeadline: tt.env})
			a.worker.Handle("noop", func(context.Context, *tasks.Delivery) error { return nil })
			code, out := post(t, srv.URL+"/Enqueue", `{"job":"noop","lockId":"user-1","delaySeconds":3600}`)
			if code != http.StatusOK {
				t.Fatalf("enqueue = %d %v", code, out)
			}
			admin, err := emu.NewClient(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			defer admin.Close()
			task, err := admin.GetTask(t.Context(), &cloudtaskspb.GetTaskRequest{Name: out["task"].(string)})
			if err != nil {
				t.Fatal(err)
			}
			if d := task.GetDispatchDeadline().AsDuration(); d != tt.want {
				t.Errorf("dispatch deadline %v, want %v", d, tt.want)
			}
		})
	}
}
