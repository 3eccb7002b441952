package app

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// TestDrainLetsAnEnqueueFinish: at SIGTERM DrainOnSIGTERM lets an Enqueue
// in flight run to its end within the wait (serveToEnd, what Register and
// Handler give every function but the Worker). Its CreateTask has created
// the task but not yet answered (CreateTask takes 2 s here, the task is made
// after its first half); cancelled, it answered 502 though the drain had
// 5 s, and its caller, told it failed, enqueued again: the task (no name)
// ran twice. It must answer 200 with the task's name.
func TestDrainLetsAnEnqueueFinish(t *testing.T) {
	emu := taskstest.Start(t, taskstest.Options{SubsecondBackoffs: true, CreateTaskLatency: 2 * time.Second})
	if _, err := emu.CreateQueue(t.Context(), &cloudtaskspb.CreateQueueRequest{
		Parent: "projects/test-project/locations/here",
		Queue: &cloudtaskspb.Queue{Name: testQueue, RetryConfig: &cloudtaskspb.RetryConfig{
			MaxAttempts: -1, MinBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(time.Second),
		}},
	}); err != nil {
		t.Fatal(err)
	}
	d := newDrainer(5 * time.Second)
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	cfg, err := ConfigFromEnv(env(map[string]string{
		EnvQueue: testQueue, EnvWorkerURL: srv.URL + "/Worker", EnvTaskServiceAccount: "w@test-project.iam.gserviceaccount.com",
		EnvTasksEmulator: emu.Addr(),
	}))
	if err != nil {
		t.Fatal(err)
	}
	freshDefault(t)
	a, err := New(t.Context(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	ran := make(chan struct{}, 4)
	a.worker.Handle("echo", func(context.Context, *tasks.Delivery) error { ran <- struct{}{}; return nil })
	mux.Handle("/Worker", a.Worker())
	enqueue := a.Enqueue()
	mux.HandleFunc("/Enqueue", func(w http.ResponseWriter, r *http.Request) { d.serveToEnd(w, r, enqueue.ServeHTTP) })

	codes := make(chan int, 1)
	go func() {
		resp, err := http.Post(srv.URL+"/Enqueue", "application/json", strings.NewReader(`{"job":"echo","lockId":"user-1"}`))
		if err != nil {
			codes <- 0
			return
		}
		resp.Body.Close()
		codes <- resp.StatusCode
	}()
	select {
	case <-ran: // the task was created (and delivered): CreateTask's answer is on its way
	case <-time.After(10 * time.Second):
		t.Fatal("the enqueued task was not created")
	}
	d.drain() // SIGTERM
	if code := <-codes; code != http.StatusOK {
		t.Errorf("Enqueue answered %d at SIGTERM after its task was created; want 200 (the drain waits 5 s, the CreateTask needed 1 s more): its caller enqueues again and the task runs twice", code)
	}
	if err := emu.WaitIdle(t.Context(), testQueue); err != nil {
		t.Fatal(err)
	}
}
