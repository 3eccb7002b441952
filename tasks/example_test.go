package tasks_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"net/http/httptest"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// A task enqueued with a lock id runs in the worker under that lock. Here
// the queue is the local emulator and the lock store is in memory; in
// production the Client talks to Cloud Tasks and the Worker is served by a
// Cloud Run function with a Datastore-backed locking.Client.
func Example() {
	ctx := context.Background()

	// The worker side: one job, run under the task's lock.
	locker, err := locking.New(locking.Config{Strong: memlock.New()})
	if err != nil {
		log.Fatal(err)
	}
	worker, err := tasks.NewWorker(locker, tasks.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		log.Fatal(err)
	}
	done := make(chan string, 1)
	worker.Handle("resize", func(ctx context.Context, d *tasks.Delivery) error {
		var p struct{ Width int }
		if err := d.Decode(&p); err != nil {
			return tasks.Permanent(err) // retrying cannot fix a bad payload
		}
		done <- fmt.Sprintf("resized for %s to %d px under token %d", d.LockID, p.Width, d.Token)
		return nil
	})
	server := httptest.NewServer(worker)
	defer server.Close()

	// A local Cloud Tasks with one queue.
	emu, err := taskstest.New(taskstest.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer emu.Close()
	admin, err := emu.NewClient(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer admin.Close()
	queue := "projects/demo/locations/local/queues/jobs"
	if _, err := admin.CreateQueue(ctx, &cloudtaskspb.CreateQueueRequest{
		Parent: "projects/demo/locations/local",
		Queue:  &cloudtaskspb.Queue{Name: queue},
	}); err != nil {
		log.Fatal(err)
	}

	// The enqueue side.
	client, err := tasks.NewClient(ctx, tasks.Config{
		Queue:          queue,
		WorkerURL:      server.URL,
		ServiceAccount: "tasks@demo.iam.gserviceaccount.com",
		WorkerTimeout:  5 * time.Minute,
	}, emu.ClientOptions()...)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	if _, err := client.Enqueue(ctx, tasks.Task{Job: "resize", LockID: "user-42", Payload: map[string]int{"Width": 640}}); err != nil {
		log.Fatal(err)
	}
	fmt.Println(<-done)
	// Output: resized for user-42 to 640 px under token 1
}
