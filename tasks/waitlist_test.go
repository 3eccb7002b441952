package tasks_test

import (
	"testing"

	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/waitlisttest"
)

func TestMemoryWaitList(t *testing.T) {
	waitlisttest.Run(t, func(t *testing.T) tasks.WaitList { return &tasks.MemoryWaitList{} })
}
