package redislock_test

import (
	"bytes"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// TestDefaultUsesValkey: with VALKEY_ADDR set, locking.Default keeps Weak
// locks in that server and says so in its log line.
func TestDefaultUsesValkey(t *testing.T) {
	srv := redistest.Start(t)
	for _, k := range envVars {
		t.Setenv(k, "")
	}
	t.Setenv(redislock.EnvValkeyAddr, "redis://"+srv.Addr+"/0")
	t.Setenv(redislock.EnvPrefix, uniquePrefix())
	var logs bytes.Buffer
	prevLog := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&logs, nil)))
	locking.SetDefault(nil)
	t.Cleanup(func() {
		locking.SetDefault(nil)
		slog.SetDefault(prevLog)
	})

	l, err := locking.Acquire(t.Context(), "default-weak", locking.Kind(locking.Weak))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "weak_backend=valkey") {
		t.Errorf("log does not name valkey as the Weak backend: %q", logs.String())
	}
	c := newClient(t, srv.Addr, nil)
	keys, err := redislock.New(c, redislock.Options{Prefix: os.Getenv(redislock.EnvPrefix)})
	if err != nil {
		t.Fatal(err)
	}
	if n, err := c.Exists(t.Context(), keys.LockKey("default-weak")).Result(); err != nil || n != 1 {
		t.Errorf("the Weak lock is not in the server: EXISTS = %d, %v", n, err)
	}
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	// The record stays, for fencing, and reads as free.
	g, err := keys.Acquire(t.Context(), locking.Request{ID: "default-weak", Owner: "next", Lease: time.Second})
	if err != nil || !g.Acquired || g.TookOver || g.Token <= l.Token() {
		t.Errorf("Acquire after Release = %+v, %v; want acquired, no takeover, a token above %d", g, err, l.Token())
	}
}

var envVars = []string{
	redislock.EnvValkeyAddr, redislock.EnvRedisAddr, redislock.EnvValkeyPassword, redislock.EnvRedisPassword,
	redislock.EnvValkeyUsername, redislock.EnvRedisUsername, redislock.EnvTLS, redislock.EnvTLSCAFile,
	redislock.EnvCluster, redislock.EnvIAMAuth, redislock.EnvPrefix,
}
