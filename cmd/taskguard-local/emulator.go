package main

import (
	"context"
	"fmt"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"

	"github.com/taskguard/taskguard/deploy"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// startEmulator starts the in-process Cloud Tasks emulator with the queue
// deploy/04-queue.sh creates: the same retry settings and rate limits, read
// from deploy/lib.sh. The emulator behaves as the service does: backoffs in
// whole seconds, Retry-After honoured in full, and the whole queue slowed
// down after 429 and 503 answers (see package taskstest).
func startEmulator(ctx context.Context) (*taskstest.Server, error) {
	settings, err := deploy.DefaultQueue()
	if err != nil {
		return nil, err
	}
	emu, err := taskstest.New(taskstest.Options{})
	if err != nil {
		return nil, err
	}
	_, err = emu.CreateQueue(ctx, &cloudtaskspb.CreateQueueRequest{
		Parent: "projects/local-project/locations/local",
		Queue:  settings.Queue(localQueue),
	})
	if err != nil {
		emu.Close()
		return nil, fmt.Errorf("creating the local queue: %w", err)
	}
	return emu, nil
}
