package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"time"

	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/taskguard/taskguard/tasks"
)

// Environment variables read by tasks enqueue (the same as the functions').
const (
	envQueue          = "TASKGUARD_QUEUE"
	envWorkerURL      = "TASKGUARD_WORKER_URL"
	envServiceAccount = "TASKGUARD_TASK_SERVICE_ACCOUNT"
	envTasksEmulator  = "CLOUD_TASKS_EMULATOR_HOST"
)

var cmdTasksEnqueue = &command{
	path:     "tasks enqueue",
	summary:  "enqueue one task for a taskguard worker",
	synopsis: "--job=JOB --lock-id=ID [--payload=JSON] [--name=NAME] [--delay=DELAY] [--json] [--queue=QUEUE] [--worker-url=URL] [--service-account=EMAIL] [--emulator-host=HOST:PORT]",
	desc: `Creates one task that the taskguard worker at --worker-url runs as job
JOB under the lock ID, exactly as the Enqueue function or tasks.Client does,
and prints the task's name. Use it for manual runs and to test a worker.

The task goes to Cloud Tasks with application default credentials, or to
the local emulator (cmd/tasks-emulator) when --emulator-host or
CLOUD_TASKS_EMULATOR_HOST names one. Cloud Tasks calls the worker with an
OIDC token of --service-account, which needs roles/run.invoker on the worker;
you need iam.serviceAccounts.actAs on it.

With --name the task is de-duplicated: while a task of this job and name
exists, or for about an hour after it ran, enqueueing it again creates
nothing and the command says so (exit status 0).`,
	examples: `To refresh user 42's token now:

    $ taskguard tasks enqueue --job=refresh-token --lock-id=user-42 --payload='{"user":42}'

Against the local emulator:

    $ CLOUD_TASKS_EMULATOR_HOST=127.0.0.1:8123 taskguard tasks enqueue \
        --queue=projects/p/locations/l/queues/q --worker-url=http://127.0.0.1:8080/ \
        --service-account=worker@p.iam.gserviceaccount.com --job=refresh-token --lock-id=user-42`,
	flags: func(fs *flag.FlagSet, env *environment) func(context.Context, []string) error {
		job := fs.String("job", "", "Required. Name of the `JOB` registered with the worker.")
		lockID := fs.String("lock-id", "", "Required. Lock `ID` the task runs under: two tasks with one lock id never run at once.")
		payload := fs.String("payload", "", "The job's input, as `JSON`.")
		name := fs.String("name", "", "De-duplication `NAME` (any string).")
		delay := fs.Duration("delay", 0, "Run the task after this long, a `DELAY` of at most 30 days.")
		asJSON := fs.Bool("json", false, "Print a JSON object.")
		queue := fs.String("queue", env.getenv(envQueue), "Full `QUEUE` name, projects/PROJECT/locations/LOCATION/queues/QUEUE. Default: $"+envQueue+".")
		workerURL := fs.String("worker-url", env.getenv(envWorkerURL), "`URL` of the worker function. Default: $"+envWorkerURL+".")
		sa := fs.String("service-account", env.getenv(envServiceAccount), "Service account (`EMAIL`) whose OIDC token Cloud Tasks sends to the worker. Default: $"+envServiceAccount+".")
		emulator := fs.String("emulator-host", env.getenv(envTasksEmulator), "`HOST:PORT` of a local Cloud Tasks emulator; empty for Cloud Tasks. Default: $"+envTasksEmulator+".")
		timeout := fs.Duration("timeout", 30*time.Second, "Give up after this long.")
		return func(ctx context.Context, _ []string) error {
			switch {
			case *job == "":
				return usagef("--job is required")
			case *lockID == "":
				return usagef("--lock-id is required")
			case *payload != "" && !json.Valid([]byte(*payload)):
				return usagef("--payload is not valid JSON")
			}
			var opts []option.ClientOption
			if *emulator != "" {
				opts = []option.ClientOption{
					option.WithEndpoint(*emulator),
					option.WithoutAuthentication(),
					option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
				}
			}
			ctx, cancel := context.WithTimeout(ctx, *timeout)
			defer cancel()
			c, err := tasks.NewClient(ctx, tasks.Config{Queue: *queue, WorkerURL: *workerURL, ServiceAccount: *sa}, opts...)
			if errors.Is(err, tasks.ErrInvalidConfig) {
				return usagef("%v (set --queue, --worker-url and --service-account, or %s, %s and %s)", err, envQueue, envWorkerURL, envServiceAccount)
			}
			if err != nil {
				return err
			}
			defer c.Close()
			t := tasks.Task{Job: *job, LockID: *lockID, Name: *name, Delay: *delay}
			if *payload != "" {
				t.Payload = json.RawMessage(*payload)
			}
			taskName, err := c.Enqueue(ctx, t)
			duplicate := errors.Is(err, tasks.ErrDuplicate)
			switch {
			case errors.Is(err, tasks.ErrInvalidTask):
				return usagef("%v", err)
			case err != nil && !duplicate:
				return err
			}
			if *asJSON {
				return writeJSON(env.stdout, struct {
					Name      string `json:"name"`
					Duplicate bool   `json:"duplicate"`
				}{taskName, duplicate})
			}
			if duplicate {
				fmt.Fprintf(env.stdout, "Already enqueued (duplicate name): %s\n", taskName)
				return nil
			}
			fmt.Fprintf(env.stdout, "Enqueued task %s\n", taskName)
			return nil
		}
	},
}
