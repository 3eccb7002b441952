package mclock

import (
	"testing"
)

// TestFromEnvResolvesLazily: FromEnv must do no network I/O, so host names
// are looked up on first use, not by FromEnv.
func TestFromEnvResolvesLazily(t *testing.T) {
	t.Setenv(EnvServers, "memcached.invalid:11211")
	b, ok, err := FromEnv()
	if err != nil || !ok {
		t.Fatalf("FromEnv = %v, %v, %v", b, ok, err)
	}
	sel := b.(*Backend).servers
	if sel == nil || sel.ok {
		t.Fatalf("servers resolved by FromEnv (selector %+v)", sel)
	}
	if _, err := sel.PickServer("k"); err == nil {
		t.Error("PickServer resolved memcached.invalid")
	}
}
