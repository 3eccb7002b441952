package mclock

import (
	"math"
	"testing"
	"time"
)

func TestExpiry(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	day := 24 * time.Hour
	for _, tc := range []struct {
		lease time.Duration
		want  int64
	}{
		{time.Nanosecond, 2},
		{time.Millisecond, 2},
		{999 * time.Millisecond, 2},
		{time.Second, 2},
		{1001 * time.Millisecond, 3},
		{1500 * time.Millisecond, 3},
		{time.Minute, 61},
		{30*day - time.Second, maxRelativeExpiry},              // the largest relative value
		{30 * day, now.Unix() + maxRelativeExpiry + 1},         // absolute from here on
		{31 * day, now.Unix() + int64(31*day/time.Second) + 1}, // absolute
		{100 * 365 * day, math.MaxInt32},                       // capped in 2038
		{time.Duration(math.MaxInt64), math.MaxInt32},          // no overflow
	} {
		got := int64(expiry(tc.lease, now))
		if got != tc.want {
			t.Errorf("expiry(%v) = %d, want %d", tc.lease, got, tc.want)
		}
		if got <= 0 {
			t.Errorf("expiry(%v) = %d: 0 never expires, negative is expired", tc.lease, got)
		}
		if got <= maxRelativeExpiry && time.Duration(got-1)*time.Second < tc.lease {
			t.Errorf("expiry(%v) = %d s: shorter than the lease after a partial tick", tc.lease, got)
		}
	}
}
