package redisfence_test

import (
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/fence/redisfence"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func client(t *testing.T) *redis.Client {
	t.Helper()
	s := redistest.Start(t)
	c := redis.NewClient(&redis.Options{Addr: s.Addr})
	t.Cleanup(func() { c.Close() })
	return c
}

func TestSet(t *testing.T) {
	c := client(t)
	ctx := t.Context()
	const key = "{cart-7}:total"
	tok := func(v uint64) fence.Token { return fence.Token{LockID: "cart-7", Value: v} }
	for _, step := range []struct {
		tok   fence.Token
		value string
		want  error
		after string // the key's value after the step
	}{
		{tok(9), "a", nil, "a"},
		{tok(9), "b", nil, "b"},
		{tok(10), "c", nil, "c"},
		{tok(8), "stale", fence.ErrStale, "c"},
		{tok(2), "stale", locking.ErrLockLost, "c"},
		{tok(100), "d", nil, "d"}, // a longer decimal: compared as a number
		{tok(99), "stale", fence.ErrStale, "d"},
	} {
		err := redisfence.Set(ctx, c, "cart-7", step.tok, key, step.value, 0)
		if !errors.Is(err, step.want) || (err == nil) != (step.want == nil) {
			t.Fatalf("Set with token %d: %v, want %v", step.tok.Value, err, step.want)
		}
		if got := c.Get(ctx, key).Val(); got != step.after {
			t.Fatalf("after token %d the key holds %q, want %q", step.tok.Value, got, step.after)
		}
	}
	var se *fence.StaleError
	if err := redisfence.Set(ctx, c, "cart-7", tok(50), key, "x", 0); !errors.As(err, &se) || se.Highest != 100 || se.Token != 50 {
		t.Fatalf("stale Set = %v, want a StaleError with highest 100", err)
	}
	if err := redisfence.Set(ctx, c, "cart-7", tok(100), key, "e", 1500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if ttl := c.PTTL(ctx, key).Val(); ttl <= 0 || ttl > 1500*time.Millisecond {
		t.Fatalf("ttl = %v, want in (0, 1.5s]", ttl)
	}
	got := c.HGetAll(ctx, redisfence.FenceKey("cart-7")).Val()
	if fmt.Sprint(got) != fmt.Sprint(map[string]string{"format": fence.Format, "lock": "cart-7", "token": "100"}) {
		t.Fatalf("fence hash = %v", got)
	}
}

func TestSetBadInput(t *testing.T) {
	c := client(t)
	ctx := t.Context()
	// What another application left at the fence keys of some lock ids.
	c.Set(ctx, redisfence.FenceKey("a-string"), "x", 0)
	c.HSet(ctx, redisfence.FenceKey("no-marker"), "lock", "no-marker", "token", "1")
	c.HSet(ctx, redisfence.FenceKey("other-marker"), "format", "acme/1", "lock", "other-marker", "token", "1")
	c.HSet(ctx, redisfence.FenceKey("bad-token"), "format", fence.Format, "lock", "bad-token", "token", "-1")
	c.HSet(ctx, redisfence.FenceKey("extra"), "format", fence.Format, "lock", "extra", "token", "1", "owner", "x")
	c.HSet(ctx, redisfence.FenceKey("other-lock"), "format", fence.Format, "lock", "somebody-else", "token", "1")
	for _, tc := range []struct {
		name, lockID string
		tok          fence.Token
		ttl          time.Duration
		want         error
	}{
		{"zero token", "a", fence.Token{}, 0, fence.ErrInvalid},
		{"token 0", "a", fence.Token{LockID: "a"}, 0, fence.ErrInvalid},
		{"negative ttl", "a", fence.Token{LockID: "a", Value: 1}, -time.Second, fence.ErrInvalid},
		{"token of another lock", "a", fence.Token{LockID: "b", Value: 1}, 0, fence.ErrWrongLock},
		{"a string at the fence key", "a-string", fence.Token{LockID: "a-string", Value: 5}, 0, fence.ErrForeign},
		{"no marker", "no-marker", fence.Token{LockID: "no-marker", Value: 5}, 0, fence.ErrForeign},
		{"another marker", "other-marker", fence.Token{LockID: "other-marker", Value: 5}, 0, fence.ErrForeign},
		{"a bad token", "bad-token", fence.Token{LockID: "bad-token", Value: 5}, 0, fence.ErrForeign},
		{"an extra field", "extra", fence.Token{LockID: "extra", Value: 5}, 0, fence.ErrForeign},
		{"a fence of another lock", "other-lock", fence.Token{LockID: "other-lock", Value: 5}, 0, fence.ErrWrongLock},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := "{" + tc.lockID + "}:v"
			if err := redisfence.Set(ctx, c, tc.lockID, tc.tok, key, "landed", tc.ttl); !errors.Is(err, tc.want) {
				t.Fatalf("Set = %v, want %v", err, tc.want)
			}
			if n := c.Exists(ctx, key).Val(); n != 0 {
				t.Fatalf("the refused write landed")
			}
		})
	}
	if v := c.HGet(ctx, redisfence.FenceKey("other-marker"), "token").Val(); v != "1" {
		t.Fatalf("a foreign fence was changed: token %q", v)
	}
}

// TestSetCluster: on a cluster-mode server a key with the fence's hash tag
// is set in one slot with its fence; one without is refused with CROSSSLOT
// and nothing is set.
func TestSetCluster(t *testing.T) {
	s := redistest.StartCluster(t)
	c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{s.Addr}})
	t.Cleanup(func() { c.Close() })
	ctx := t.Context()
	tok := fence.Token{LockID: "cart-8", Value: 3}
	if err := redisfence.Set(ctx, c, "cart-8", tok, "{cart-8}:total", "v", 0); err != nil {
		t.Fatal(err)
	}
	if err := redisfence.Set(ctx, c, "cart-8", tok, "total-without-tag", "v", 0); err == nil {
		t.Fatal("Set of a key outside the fence's slot succeeded in cluster mode")
	}
	if n := c.Exists(ctx, "total-without-tag").Val(); n != 0 {
		t.Fatal("the key outside the fence's slot was set")
	}
}
