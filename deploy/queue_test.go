package deploy_test

import (
	"strconv"
	"testing"
	"time"

	"github.com/taskguard/taskguard/deploy"
)

// TestDefaultQueueIsWhatTheScriptCreates compares the settings Go reads from
// lib.sh with the flags 04-queue.sh passes to gcloud on its defaults.
func TestDefaultQueueIsWhatTheScriptCreates(t *testing.T) {
	q, err := deploy.DefaultQueue()
	if err != nil {
		t.Fatal(err)
	}
	var create command
	for _, c := range dryRun(t, "04-queue.sh", nil, map[string]string{"DRY_RUN": "1", "PROJECT": fakeProject}) {
		if c.is("tasks", "queues", "create") {
			create = c
		}
	}
	if create == nil {
		t.Fatal("04-queue.sh creates no queue")
	}
	secs := func(d time.Duration) string { return strconv.Itoa(int(d/time.Second)) + "s" }
	want := map[string]string{
		"max-attempts":              strconv.Itoa(int(q.MaxAttempts)),
		"max-retry-duration":        secs(q.MaxRetryDuration),
		"min-backoff":               secs(q.MinBackoff),
		"max-backoff":               secs(q.MaxBackoff),
		"max-doublings":             strconv.Itoa(int(q.MaxDoublings)),
		"max-dispatches-per-second": strconv.FormatFloat(q.MaxDispatchesPerSecond, 'g', -1, 64),
		"max-concurrent-dispatches": strconv.Itoa(int(q.MaxConcurrentDispatches)),
	}
	for flag, w := range want {
		got, ok := create.flag(flag)
		if !ok || got != w {
			t.Errorf("04-queue.sh passes --%s=%q; deploy.DefaultQueue reads %q", flag, got, w)
		}
	}
	pb := q.Queue("projects/p/locations/l/queues/q")
	if pb.GetRetryConfig().GetMinBackoff().AsDuration() != q.MinBackoff || pb.GetRateLimits().GetMaxDispatchesPerSecond() != q.MaxDispatchesPerSecond {
		t.Errorf("Queue() = %v; want the settings %+v", pb, q)
	}
}
