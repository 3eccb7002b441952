package redislock

import (
	"regexp"
	"testing"
	"time"
)

func TestLeaseArgs(t *testing.T) {
	b := &Backend{}
	for _, c := range []struct {
		d         time.Duration
		lease, px string
	}{
		{time.Nanosecond, "000000001", "86400001"},
		{30 * time.Second, "000030000", "86430000"},
		{1500 * time.Microsecond, "000000002", "86400002"},
		{24 * time.Hour, "086400000", "172800000"},
	} {
		for range 2 { // computed, then from the last call's
			la := b.leaseArgs(c.d)
			if la.lease != c.lease || la.px != c.px {
				t.Errorf("leaseArgs(%v) = %v, %v; want %s, %s", c.d, la.lease, la.px, c.lease, c.px)
			}
		}
	}
}

func TestNonce(t *testing.T) {
	re := regexp.MustCompile(`^[0-9a-z]{12}$`)
	seen := map[string]bool{}
	for range 1000 {
		n := newNonce()
		if !re.MatchString(n) {
			t.Fatalf("nonce %q: want 12 of [0-9a-z]", n)
		}
		if seen[n] {
			t.Fatalf("nonce %q drawn twice", n)
		}
		seen[n] = true
	}
}
