// Package taskstest is a local Cloud Tasks emulator: a gRPC server that
// implements the google.cloud.tasks.v2 calls taskguard uses and dispatches
// HTTP-target tasks to their URLs with real HTTP requests, the way the
// managed service does.
//
// Use it in-process from tests ([Start] or [New]) or as a process
// (cmd/tasks-emulator). The real client, cloud.google.com/go/cloudtasks/apiv2,
// connects to it with the options returned by [Server.ClientOptions]:
// option.WithEndpoint(addr), option.WithoutAuthentication() and an insecure
// gRPC transport.
//
// # What it implements, following the documented service
//
//   - Queues: CreateQueue, GetQueue, UpdateQueue, DeleteQueue, ListQueues,
//     PauseQueue, ResumeQueue, PurgeQueue. Unset rate limits and retry
//     settings take the service's defaults (500 dispatches/s, 1000 concurrent
//     dispatches, 100 attempts, backoff 0.1 s to 3600 s, 16 doublings).
//   - Tasks: CreateTask, GetTask, ListTasks, DeleteTask. Every other method
//     answers codes.Unimplemented.
//   - Task names: an explicit name is refused with ALREADY_EXISTS while a task
//     of that name exists, and for [Options.DedupWindow] (default one hour)
//     after it was deleted, succeeded or gave up. Ids are [A-Za-z0-9_-],
//     at most 500 characters. Tasks larger than [MaxTaskSize] and schedule
//     times more than 30 days ahead are refused with INVALID_ARGUMENT, as is a
//     dispatch deadline outside 15 s to 30 min.
//   - Dispatch: an HTTP request with the task's method, URL, headers and body,
//     User-Agent "Google-Cloud-Tasks", the X-CloudTasks-QueueName, -TaskName,
//     -TaskRetryCount, -TaskExecutionCount and -TaskETA headers, and on
//     retries -TaskPreviousResponse and -TaskRetryReason. An OIDC token setting
//     becomes "Authorization: Bearer <token>" with a fake, unsigned token (see
//     [DecodeToken]); no real verifier accepts it. The attempt is cancelled
//     after the task's dispatch deadline (default 10 min).
//   - Retries: any non-2xx answer, a connection error or a deadline is
//     retried after the queue's backoff: min backoff doubled max doublings
//     times, then growing linearly, capped at max backoff. A 429 or 503 with
//     Retry-After waits at least that long. A task is dropped when both its
//     max attempts and its max retry duration are used up.
//   - Flow control: at most max concurrent dispatches in flight per queue and
//     a token bucket of max dispatches per second.
//
// # Known differences
//
//   - Backoffs are not truncated to whole seconds, so tests can use
//     millisecond backoffs; [Options.MinDispatchDeadline] and
//     [Options.MaxRetryAfter] shorten the limits tests would otherwise wait
//     for.
//   - No queue-wide throttling after 429/503 ("system backoff"); only the
//     task that got the answer waits.
//   - Only HTTP targets. State lives in memory and is lost on Close.
//   - The X-CloudTasks-TaskRetryReason values are the emulator's own words.
//   - The size limit is 1 MB ([MaxTaskSize] = 1<<20 bytes of the encoded
//     task), the limit documented for HTTP-target tasks; the API's comments
//     still say 100 KB, an App Engine-era limit.
//
// # For tests
//
// [Server.WaitIdle] blocks until a queue has no task left, and
// [Server.Attempts] (or [Options.OnAttempt]) reports every dispatch with the
// headers sent, the answer, any Retry-After, and what the emulator did next.
package taskstest
