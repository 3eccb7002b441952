package mclock_test

import (
	"fmt"
	"log"
	"os"
	"time"

	"github.com/bradfitz/gomemcache/memcache"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/mclock"
)

// A client whose Weak locks live in memcached and whose Strong locks live
// elsewhere. Nothing is sent to memcached until the first lock.
func ExampleNew() {
	mc := memcache.New("10.0.0.3:11211")
	mc.Timeout = 500 * time.Millisecond
	weak, err := mclock.New(mc, mclock.Options{Prefix: "billing:"})
	if err != nil {
		log.Fatal(err)
	}
	client, err := locking.New(locking.Config{Weak: weak})
	if err != nil {
		log.Fatal(err)
	}
	_ = client // client.With(ctx, "report-7", fn, locking.Kind(locking.Weak))
	fmt.Println(weak.LockKey("report-7"))
	fmt.Println(weak.FenceKey("report-7"))
	// Output:
	// billing:lock:tb7dnV5lCMfcNWOKMcWQyWWjggM9nupQigdcmrTtzTI
	// billing:fence:tb7dnV5lCMfcNWOKMcWQyWWjggM9nupQigdcmrTtzTI
}

// FromEnv is what locking.Default calls for Weak locks; it reads the
// environment and does no network I/O.
func ExampleFromEnv() {
	os.Setenv(mclock.EnvServers, "10.0.0.3:11211,10.0.0.4:11211")
	defer os.Unsetenv(mclock.EnvServers)
	_, ok, err := mclock.FromEnv()
	fmt.Println(ok, err)

	os.Setenv(mclock.EnvServers, "10.0.0.3")
	_, ok, err = mclock.FromEnv()
	fmt.Println(ok, err)
	// Output:
	// true <nil>
	// false mclock: invalid environment: MEMCACHE_SERVERS="10.0.0.3": "10.0.0.3" is not host:port
}
