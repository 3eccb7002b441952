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
//     max_burst_size is output only: one second's worth of the rate, at most
//     100 (a default queue reports 100, as the service's sample does). A
//     deleted queue's name stays reserved for [Options.QueueReuseDelay]
//     (default 7 days): creating a queue of that name, or a task in it,
//     fails with FAILED_PRECONDITION.
//   - Backoffs: min_backoff, max_backoff and max_retry_duration, of a queue
//     or of a task, are truncated to whole seconds, as the service does
//     (what GetQueue reports, and when retries come). Tests that want
//     millisecond retries set [Options.SubsecondBackoffs].
//   - Tasks: CreateTask, GetTask, ListTasks, DeleteTask. Every other method
//     answers codes.Unimplemented.
//   - Task names: an explicit name is refused with ALREADY_EXISTS while a task
//     of that name exists, and for [Options.DedupWindow] (default one hour)
//     after it was deleted, succeeded or gave up. Ids are [A-Za-z0-9_-],
//     at most 500 characters. Tasks larger than [MaxTaskSize] and schedule
//     times more than 30 days ahead are refused with INVALID_ARGUMENT, as is a
//     dispatch deadline outside 15 s to 30 min. A schedule time in the past
//     is set to the time of CreateTask.
//   - URLs: a URL the service would encode is encoded, not refused: a '%'
//     that starts no %XX escape becomes %25; spaces, control characters and
//     non-ASCII bytes after the host are %-escaped. The task reports the
//     encoded URL and is delivered to it.
//   - Dispatch: an HTTP request with the task's method, URL, headers and body,
//     User-Agent "Google-Cloud-Tasks", the X-CloudTasks-QueueName, -TaskName,
//     -TaskRetryCount, -TaskExecutionCount and -TaskETA headers, and on
//     retries -TaskPreviousResponse and -TaskRetryReason. An OIDC token setting
//     becomes "Authorization: Bearer <token>" with a fake, unsigned token (see
//     [DecodeToken]); an OAuth token setting becomes "Authorization: Bearer
//     <access token>" with a fake access token naming the account and the
//     scope ([DefaultOAuthScope] when unset; see [DecodeAccessToken]). No real
//     verifier accepts either. The attempt is cancelled after the task's
//     dispatch deadline (default 10 min).
//   - Retries: any non-2xx answer, a connection error or a deadline is
//     retried after the queue's backoff: min backoff doubled max doublings
//     times, then growing linearly, capped at max backoff. A 429 or 503 with
//     Retry-After waits at least that long. A task is dropped when both its
//     max attempts and its max retry duration are used up.
//   - Flow control: at most max concurrent dispatches in flight per queue and
//     a token bucket of max dispatches per second, holding at most
//     max_burst_size tokens.
//
// # System throttling
//
// The service documents that a 429 or 503 answer slows the whole queue, not
// only the task that got it: "Cloud Tasks reacts to these errors by slowing
// down execution until errors stop" ("Issues and limitations"), and a queue's
// actual rate is its rate limits lowered by "system throttling due to 429
// (Too Many Requests) or 503 (Service Unavailable) responses from the
// worker" (RateLimits in queue.proto). The user's settings do not change.
// It documents no numbers, so the emulator models it this way:
//
//   - Every 429 or 503 answer halves the queue's dispatch rate, down to 1
//     dispatch per second (or the queue's own rate, if lower); while the
//     queue is throttled it allows no burst (a bucket of one token).
//   - For every second without a 429 or 503 answer the rate doubles again,
//     back to max_dispatches_per_second.
//   - Every task of the queue is paced by the lowered rate; GetQueue still
//     reports the queue's settings. [Server.DispatchRate] reports the rate
//     in force.
//
// Why this model: it has the documented properties (queue-wide, triggered by
// 429 and 503 only, lasting until the errors stop, settings unchanged), and
// its multiplicative decrease is the usual reaction to back-pressure (as in
// TCP congestion control), so that a steady stream of busy answers keeps a
// queue near the floor, as a worker that keeps answering 429 would in
// production. The halving per answer, the floor and the one-second recovery
// are the emulator's choices, not the service's figures: code that is fast
// only when throttling is mild is wrong in production too, so the model
// errs on the severe side. [Options.NoSystemThrottling] turns it off.
//
// # Known differences
//
//   - The numbers of the throttling model are the emulator's own (see
//     above). The service also throttles on high error rates of other kinds
//     and ramps a new or idle queue up slowly; the emulator does neither.
//   - Retry-After on a 429 or 503 is honoured as a lower bound on the next
//     attempt; the service only says it is "considered".
//   - [Options.MinDispatchDeadline], [Options.MaxRetryAfter],
//     [Options.SubsecondBackoffs] and [Options.QueueReuseDelay] shorten the
//     limits tests would otherwise wait for.
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
// [Options.CreateTaskLatency] and [Options.DispatchDelay] (with
// [Options.DispatchJitter]) add the service's latencies, which the emulator
// otherwise does not have, for benchmarks that model a deployment.
package taskstest
