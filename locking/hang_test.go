package locking_test

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// hanging is a backend whose Renew, once hang is set, blocks for a long
// time whatever its context says, as a client library without context
// support (gomemcache) or with context deadlines off (go-redis by default)
// does on a connection whose packets vanish.
type hanging struct {
	locking.Backend
	hang bool // set before the first renewal; read only by the renewer
}

func (h *hanging) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if h.hang {
		time.Sleep(2 * time.Minute)
		return locking.Grant{}, errUnavailable
	}
	return h.Backend.Renew(ctx, r)
}

// TestLossWhileRenewalHangs checks that the loss is declared a tenth of a
// lease before the lease could run out even when the backend's Renew does
// not return by then. Found by internal/torture: against redis-server
// through a blackholing proxy, with a go-redis client that ignores context
// deadlines, Done closed only when the stuck renewal gave up, about 0.7 s
// after another owner had taken the lock. Before the fix this test saw the
// cancellation at 2m10s instead of 27s.
func TestLossWhileRenewalHangs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := &hanging{Backend: memlock.New(), hang: true}
		c := newClient(t, b, locking.Config{})
		const lease = 30 * time.Second
		start := time.Now()
		var cancelledAt time.Time
		err := c.With(t.Context(), "job", func(ctx context.Context) error {
			<-ctx.Done()
			cancelledAt = time.Now()
			if !errors.Is(context.Cause(ctx), locking.ErrLockLost) {
				t.Errorf("cause %v; want ErrLockLost", context.Cause(ctx))
			}
			return nil
		}, locking.Lease(lease))
		if !errors.Is(err, locking.ErrLockLost) {
			t.Fatalf("With = %v; want ErrLockLost", err)
		}
		if got, want := cancelledAt.Sub(start), lease-lease/10; got != want {
			t.Errorf("fn cancelled after %v; want %v (lease minus a tenth), whether or not the renewal returned", got, want)
		}
		time.Sleep(3 * time.Minute) // let the stuck renewal return inside the bubble
	})
}
