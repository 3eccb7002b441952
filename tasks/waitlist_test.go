package tasks_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/waitlisttest"
)

func TestMemoryWaitList(t *testing.T) {
	waitlisttest.Run(t, func(t *testing.T) tasks.WaitList { return &tasks.MemoryWaitList{} })
}

func TestMemoryWaitListRetention(t *testing.T) {
	l := &tasks.MemoryWaitList{}
	now := time.Now()
	tasks.SetWaitListClock(l, func() time.Time { return now })
	waitlisttest.RunRetention(t, l, func(d time.Duration) { now = now.Add(d) })
}

// BenchmarkMemoryWaitList is a burst of n tasks on one lock id through a
// MemoryWaitList, as park mode makes its calls: each task parks, and then,
// in turn, the releasing holder arms a hand-off, the wake peeks, takes and
// claims, and the run finishes. It reports the time per task: flat in n
// when every call is bounded (a call that sweeps the lock id's records
// makes it grow with n).
func BenchmarkMemoryWaitList(b *testing.B) {
	for _, n := range []int{1_000, 10_000} {
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) {
			ctx := b.Context()
			for b.Loop() {
				l := &tasks.MemoryWaitList{}
				t0 := time.Now()
				due := t0.Add(time.Hour)
				for i := range n {
					if _, _, _, err := l.Park(ctx, "hot", tasks.Waiter{Key: fmt.Sprintf("q/%d", i), Job: "j", Arrived: t0.Add(time.Duration(i))}, due); err != nil {
						b.Fatal(err)
					}
				}
				for i := range n {
					h, err := l.Arm(ctx, "hot", tasks.Handoff, t0)
					if err != nil || h.IsZero() {
						b.Fatalf("arm %d: %+v, %v", i, h, err)
					}
					head, ok, _, _, err := l.Peek(ctx, "hot", "")
					if err != nil || !ok || head.Key != fmt.Sprintf("q/%d", i) {
						b.Fatalf("peek %d: %q, %v, %v", i, head.Key, ok, err)
					}
					runner := fmt.Sprintf("wake-%d", i)
					if _, ok, err := l.TakeClaim(ctx, "hot", h.Kind, h.Gen, head.Key, runner); err != nil || !ok {
						b.Fatalf("take and claim %d: %v, %v", i, ok, err)
					}
					if err := l.Finish(ctx, "hot", head.Key, runner); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/task")
		})
	}
}
