package mclock_test

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/bradfitz/gomemcache/memcache"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/mclock"
	"github.com/taskguard/taskguard/locking/mclock/mctest"
)

func TestFromEnv(t *testing.T) {
	for _, tc := range []struct {
		name    string
		env     map[string]string
		ok      bool
		invalid bool
	}{
		{"unset", nil, false, false},
		{"blank", map[string]string{mclock.EnvServers: "  "}, false, false},
		{"one", map[string]string{mclock.EnvServers: "10.0.0.3:11211"}, true, false},
		{"several", map[string]string{mclock.EnvServers: "10.0.0.3:11211, 10.0.0.4:11211"}, true, false},
		{"host name, not resolved now", map[string]string{mclock.EnvServers: "memcached.invalid:11211"}, true, false},
		{"with timeout and prefix", map[string]string{mclock.EnvServers: "10.0.0.3:11211", mclock.EnvTimeout: "250ms", mclock.EnvPrefix: "app:"}, true, false},
		{"no port", map[string]string{mclock.EnvServers: "10.0.0.3"}, false, true},
		{"no host", map[string]string{mclock.EnvServers: ":11211"}, false, true},
		{"empty entry", map[string]string{mclock.EnvServers: "10.0.0.3:11211,"}, false, true},
		{"bad timeout", map[string]string{mclock.EnvServers: "10.0.0.3:11211", mclock.EnvTimeout: "soon"}, false, true},
		{"negative timeout", map[string]string{mclock.EnvServers: "10.0.0.3:11211", mclock.EnvTimeout: "-1s"}, false, true},
		{"bad prefix", map[string]string{mclock.EnvServers: "10.0.0.3:11211", mclock.EnvPrefix: "a b"}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, k := range []string{mclock.EnvServers, mclock.EnvTimeout, mclock.EnvPrefix} {
				t.Setenv(k, tc.env[k])
			}
			b, ok, err := mclock.FromEnv()
			if ok != tc.ok || (err != nil) != tc.invalid || (b != nil) != tc.ok {
				t.Fatalf("FromEnv = %v, %v, %v; want ok=%v, error=%v", b, ok, err, tc.ok, tc.invalid)
			}
			if tc.invalid && !errors.Is(err, mclock.ErrInvalidEnv) {
				t.Errorf("error %v is not ErrInvalidEnv", err)
			}
		})
	}
}

// TestDefaultUsesMemcached: with MEMCACHE_SERVERS set, locking.Default keeps
// Weak locks in that memcached and says so in its log line.
func TestDefaultUsesMemcached(t *testing.T) {
	srv := mctest.Start(t)
	t.Setenv(mclock.EnvServers, srv.Addr)
	t.Setenv(mclock.EnvPrefix, uniquePrefix())
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
	if !strings.Contains(logs.String(), "weak_backend=memcached") {
		t.Errorf("log does not name memcached as the Weak backend: %q", logs.String())
	}
	keys, err := mclock.New(memcache.New(srv.Addr), mclock.Options{Prefix: os.Getenv(mclock.EnvPrefix)})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := serverTTL(t, srv.Addr, keys.LockKey("default-weak")); !ok {
		t.Error("the Weak lock is not in memcached")
	}
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
}
