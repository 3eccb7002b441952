package taskstest

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/taskguard/taskguard/tasks"
)

// DefaultRequestQueue is the queue NewRequest's tasks come from unless
// RequestQueue names another.
const DefaultRequestQueue = "projects/test-project/locations/here/queues/jobs"

// A RequestOption configures NewRequest.
type RequestOption func(*requestConfig)

type requestConfig struct {
	queue            string
	taskID           string
	retry, execution int
	workerURL        string
}

// RequestQueue sets the full name of the queue the delivery comes from;
// DefaultRequestQueue otherwise. The Worker sees its id (the last element).
func RequestQueue(name string) RequestOption {
	return func(c *requestConfig) { c.queue = name }
}

// RequestTaskID sets the task id of the delivery (X-CloudTasks-TaskName);
// a random one otherwise, or the id Enqueue derives from the task's Name.
func RequestTaskID(id string) RequestOption {
	return func(c *requestConfig) { c.taskID = id }
}

// RequestAttempt makes the delivery a retry: retryCount earlier attempts
// (X-CloudTasks-TaskRetryCount), executionCount of them answered below 500
// (X-CloudTasks-TaskExecutionCount). The first attempt by default.
func RequestAttempt(retryCount, executionCount int) RequestOption {
	return func(c *requestConfig) { c.retry, c.execution = retryCount, executionCount }
}

// RequestWorkerURL sets the request's URL, the Worker's; http://worker.test/
// otherwise. It matters only to a handler that reads it.
func RequestWorkerURL(u string) RequestOption {
	return func(c *requestConfig) { c.workerURL = u }
}

// NewRequest returns the HTTP request Cloud Tasks (or this package's
// emulator) delivers to a tasks.Worker for t, as tasks.Client.Enqueue would
// have enqueued it: the same body, and the headers the service sets
// (X-CloudTasks-QueueName, -TaskName, -TaskRetryCount, -TaskExecutionCount,
// -TaskETA, an Authorization header with a fake OIDC token). Serve it with
// the Worker directly (worker.ServeHTTP(httptest.NewRecorder(), req)) or
// send it to a server. It fails as Enqueue does for a task Enqueue would
// refuse (tasks.ErrInvalidTask), and with tasks.ErrInvalidConfig for a bad
// option.
func NewRequest(t tasks.Task, opts ...RequestOption) (*http.Request, error) {
	c := requestConfig{queue: DefaultRequestQueue, workerURL: "http://worker.test/"}
	for _, o := range opts {
		o(&c)
	}
	ct, err := tasks.BuildRequest(tasks.Config{
		Queue: c.queue, WorkerURL: c.workerURL, ServiceAccount: "worker@test-project.iam.gserviceaccount.com",
	}, t)
	if err != nil {
		return nil, err
	}
	pb := ct.GetTask()
	hr := pb.GetHttpRequest()
	req, err := http.NewRequest(methodOf(hr.GetHttpMethod()), hr.GetUrl(), bytes.NewReader(hr.GetBody()))
	if err != nil {
		return nil, fmt.Errorf("taskstest: %w", err)
	}
	for k, v := range hr.GetHeaders() {
		if !reservedHeader(k) {
			req.Header.Set(k, v)
		}
	}
	id := c.taskID
	switch {
	case id != "":
	case pb.GetName() != "":
		id = pb.GetName()[strings.LastIndex(pb.GetName(), "/")+1:]
	default:
		id = "task-" + rand.Text()
	}
	eta := time.Now()
	if st := pb.GetScheduleTime(); st != nil {
		eta = st.AsTime()
	}
	req.Header.Set("User-Agent", userAgent)
	req.Header.Set(HeaderQueueName, c.queue[strings.LastIndex(c.queue, "/")+1:])
	req.Header.Set(HeaderTaskName, id)
	req.Header.Set(HeaderRetryCount, strconv.Itoa(c.retry))
	req.Header.Set(HeaderExecutionCount, strconv.Itoa(c.execution))
	req.Header.Set(HeaderETA, formatETA(eta))
	if tok := hr.GetOidcToken(); tok != nil {
		req.Header.Set("Authorization", "Bearer "+fakeToken(tok.GetServiceAccountEmail(), tok.GetAudience(), time.Now()))
	}
	return req, nil
}
