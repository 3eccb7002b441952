package mclock

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
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

// TestDurationsSaturate checks the conversions at the extremes: a lease of
// any size decodes and rounds without wrapping around to a negative or tiny
// value.
func TestDurationsSaturate(t *testing.T) {
	for _, lease := range []time.Duration{1, locking.MaxLease, math.MaxInt64} {
		if d := expiryDuration(lease); d < lease {
			t.Errorf("expiryDuration(%d) = %d; want at least the lease", lease, d)
		}
	}
	for _, tc := range []struct {
		us   int64
		want time.Duration
	}{
		{-1, 0},
		{1, time.Microsecond},
		{math.MaxInt64, math.MaxInt64},
	} {
		r, ok := decodeRecord(fmt.Appendf(nil, "1 7 0 %d owner", tc.us))
		if !ok || r.lease != tc.want {
			t.Errorf("decoded lease of %d µs = %v, %v; want %v", tc.us, r.lease, ok, tc.want)
		}
	}
}

// TestRecordEncoding round-trips records with and without a known last
// release; the first form is the one earlier versions wrote and read.
func TestRecordEncoding(t *testing.T) {
	stamp := time.UnixMicro(1_800_000_000_123_456)
	for _, r := range []record{
		{token: 5, stamp: stamp, lease: locking.MaxLease, owner: "o w n e r"},
		{token: 9, stamp: stamp, lease: time.Microsecond, owner: "2 x", released: 8},
	} {
		got, ok := decodeRecord(r.encode())
		if !ok || got != r {
			t.Errorf("decode(encode(%+v)) = %+v, %v", r, got, ok)
		}
	}
	if got := string(record{token: 5, stamp: stamp, lease: time.Second, owner: "o"}.encode()); got != "1 5 1800000000123456 1000000 o" {
		t.Errorf("encoding without a release = %q; want the version 1 form", got)
	}
	for _, bad := range []string{"", "2 1 2 3 o", "3 1 2 3 4 o", "2 1 2 3 x o", "released 4"} {
		if _, ok := decodeRecord([]byte(bad)); ok {
			t.Errorf("decodeRecord(%q) accepted", bad)
		}
	}
}
