package redislock_test

import (
	"fmt"
	"log"
	"os"

	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/redislock"
)

// A client whose Weak locks live in Valkey. Nothing is sent to the server
// until the first lock.
func ExampleNew() {
	rc := redis.NewClient(&redis.Options{Addr: "10.0.0.5:6379", ContextTimeoutEnabled: true})
	defer rc.Close()
	weak, err := redislock.New(rc, redislock.Options{Prefix: "billing:"})
	if err != nil {
		log.Fatal(err)
	}
	client, err := locking.New(locking.Config{Weak: weak})
	if err != nil {
		log.Fatal(err)
	}
	_ = client // client.With(ctx, "report-7", fn, locking.Kind(locking.Weak))
	fmt.Println(weak.LockKey("report-7"))
	// Output:
	// billing:{tb7dnV5lCMfcNWOKMcWQyWWjggM9nupQigdcmrTtzTI}:lock
}

// FromEnv is what locking.Default calls for Weak locks; it reads the
// environment and does no network I/O. Here: Memorystore for Valkey in
// cluster mode, with TLS and a password.
func ExampleFromEnv() {
	os.Setenv(redislock.EnvValkeyAddr, "rediss://10.0.0.5:6378")
	os.Setenv(redislock.EnvValkeyPassword, "auth-token")
	os.Setenv(redislock.EnvCluster, "true")
	defer func() {
		for _, k := range []string{redislock.EnvValkeyAddr, redislock.EnvValkeyPassword, redislock.EnvCluster} {
			os.Unsetenv(k)
		}
	}()
	_, ok, err := redislock.FromEnv()
	fmt.Println(ok, err)
	// Output:
	// true <nil>
}
