package locking_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// newExampleClient returns a client on the in-memory backend, as a test of
// your own code would use.
func newExampleClient() *locking.Client {
	c, err := locking.New(locking.Config{Strong: memlock.New(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		panic(err)
	}
	return c
}

func ExampleClient_With() {
	c := newExampleClient()
	ctx := context.Background()
	err := c.With(ctx, "user-42", func(ctx context.Context) error {
		fmt.Println("refreshing the token of user 42, alone")
		return nil
	})
	fmt.Println("err:", err)
	// Output:
	// refreshing the token of user 42, alone
	// err: <nil>
}

func ExampleClient_Acquire() {
	c := newExampleClient()
	ctx := context.Background()
	l, err := c.Acquire(ctx, "nightly-report")
	if err != nil {
		fmt.Println("not acquired:", err)
		return
	}
	fmt.Println("holding", l.ID())
	if err := l.Release(ctx); err != nil {
		fmt.Println("release:", err)
	}
	fmt.Println("released; releasing again:", errors.Is(l.Release(ctx), locking.ErrNotHeld))
	// Output:
	// holding nightly-report
	// released; releasing again: true
}

func ExampleWait() {
	c := newExampleClient()
	ctx := context.Background()
	l, _ := c.Acquire(ctx, "import")
	defer l.Release(ctx)

	// Another caller skips the work instead of waiting, like djangae's
	// lock(wait=False) decorator.
	err := c.With(ctx, "import", func(context.Context) error {
		fmt.Println("not printed: the lock is held")
		return nil
	}, locking.Wait(false))
	var nae *locking.NotAcquiredError
	if errors.As(err, &nae) {
		fmt.Printf("skipped: %s is busy\n", nae.ID)
	}
	// Output:
	// skipped: import is busy
}

func ExampleLock_Token() {
	c := newExampleClient()
	ctx := context.Background()

	// The protected resource remembers the highest token it accepted and
	// refuses writes that carry a lower one.
	var highest uint64
	write := func(token uint64, v string) error {
		if token < highest {
			return fmt.Errorf("stale token %d < %d: refusing %q", token, highest, v)
		}
		highest = token
		return nil
	}

	first, _ := c.Acquire(ctx, "account-7")
	old := first.Token()
	_ = first.Release(ctx)
	second, _ := c.Acquire(ctx, "account-7")
	defer second.Release(ctx)

	fmt.Println("new token is higher:", second.Token() > old)
	fmt.Println(write(second.Token(), "from the holder"))
	fmt.Println(write(old, "from a holder that lost the lock") != nil)
	// Output:
	// new token is higher: true
	// <nil>
	// true
}
