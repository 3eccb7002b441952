package locking_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// TestOnRelease: the hooks run before Release, With and a context's end
// return from releasing a lock, once per release the store confirmed, and
// not for a lock that was lost.
func TestOnRelease(t *testing.T) {
	store := memlock.New()
	c := newClient(t, store, locking.Config{Lease: time.Second})
	var (
		mu    sync.Mutex
		calls []string
	)
	c.OnRelease(func(ctx context.Context, k locking.LockKind, id string) {
		if ctx.Err() != nil {
			t.Errorf("OnRelease(%q) got an ended context", id)
		}
		mu.Lock()
		calls = append(calls, id)
		mu.Unlock()
	})
	seen := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), calls...)
	}

	l, err := c.Acquire(t.Context(), "a")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := seen(); len(got) != 1 || got[0] != "a" {
		t.Fatalf("after Release: hooks saw %q, want [a] before Release returned", got)
	}
	if err := c.With(t.Context(), "b", func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if got := seen(); len(got) != 2 || got[1] != "b" {
		t.Fatalf("after With: hooks saw %q, want [a b] before With returned", got)
	}
	ctx, cancel := context.WithCancel(t.Context())
	l, err = c.Acquire(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	<-l.Done()
	deadline := time.Now().Add(5 * time.Second)
	for len(seen()) < 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := seen(); len(got) != 3 || got[2] != "c" {
		t.Fatalf("after the context ended: hooks saw %q, want [a b c]", got)
	}

	// A lock taken over by another owner is lost: its Release calls no hook.
	l, err = c.Acquire(t.Context(), "d", locking.Lease(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.Acquire(t.Context(), locking.Request{ID: "d", Owner: "thief", Lease: time.Minute, StealAfter: time.Nanosecond}); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(t.Context()); !errors.Is(err, locking.ErrLockLost) && !errors.Is(err, locking.ErrNotHeld) {
		t.Fatalf("Release of a stolen lock: %v", err)
	}
	if got := seen(); len(got) != 3 {
		t.Errorf("a lost lock's Release called the hooks: %q", got)
	}
}
