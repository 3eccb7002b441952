package tasks

import (
	"context"
	"time"
)

// SetConnect replaces how l builds its Client, for injecting start-up
// failures; connect receives the NewClientFromEnv l would have called.
func SetConnect(l *LazyClient, connect func(ctx context.Context, real func(context.Context) (*Client, error)) (*Client, error)) {
	real := l.connect
	l.connect = func(ctx context.Context) (*Client, error) { return connect(ctx, real) }
}

// SetWaitListClock sets the clock m judges retention by.
func SetWaitListClock(m *MemoryWaitList, now func() time.Time) { m.now = now }

// RunNextBudget is the run-next budget a Worker derives (see WithRunNext).
func RunNextBudget(d *time.Duration, dispatch, jobDeadline time.Duration) time.Duration {
	return runNextBudget(d, dispatch, jobDeadline)
}

// MarkBusy makes c, parking at enqueue, take lockID as busy (as if it had
// just created a task on it), so that its next Enqueue on it parks.
func MarkBusy(c *Client, lockID string) { c.parking().busy(lockID, time.Now()) }
