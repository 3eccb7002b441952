package tasks_test

import (
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
