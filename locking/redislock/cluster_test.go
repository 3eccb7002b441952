package redislock_test

import (
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockingtest"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

// TestConformanceCluster runs the conformance suite through the cluster
// protocol, as against Memorystore for Valkey in cluster mode: each
// script's two keys must share a slot, or the server answers CROSSSLOT.
func TestConformanceCluster(t *testing.T) {
	srv := redistest.StartCluster(t)
	prefix := uniquePrefix()
	lockingtest.Run(t, func(t *testing.T) locking.Backend {
		c := redis.NewClusterClient(&redis.ClusterOptions{
			Addrs:                    []string{srv.Addr},
			ContextTimeoutEnabled:    true,
			DialTimeout:              2 * time.Second,
			MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
		})
		t.Cleanup(func() { _ = c.Close() })
		b, err := redislock.New(c, redislock.Options{Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}, lockingtest.Options{})
}
