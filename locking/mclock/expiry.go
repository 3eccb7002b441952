package mclock

import (
	"math"
	"time"
)

// maxRelativeExpiry is the largest expiry memcached reads as seconds from
// now (30 days); it reads any larger value as an absolute Unix time.
const maxRelativeExpiry = 30 * 24 * 60 * 60

// expiry converts a lease into the expiry field of a memcached storage
// command, so that the item lives at least lease and at most about two
// seconds longer.
//
// memcached keeps time in whole seconds on a clock that ticks once a second,
// and an item with expiry n is gone at the n-th tick after it was stored:
// measured on memcached 1.6.18, an item stored with expiry 1 vanished after
// 0.11 to 0.96 s. So the lease is rounded up to whole seconds and one more
// second is added for the partial tick. The result is never 0 (which would
// mean "never expire") nor negative (which means "expired already"), the
// two ways the naive int(lease.Seconds()) fails for sub-second leases.
// Values above 30 days are sent as an absolute Unix time computed on this
// machine's clock (a skew of seconds does not matter at that scale), capped
// at the largest time memcached's 32-bit field holds (January 2038).
func expiry(lease time.Duration, now time.Time) int32 {
	if lease <= 0 {
		return 1 // Request.Lease is always > 0; stay safe anyway.
	}
	secs := int64(lease / time.Second)
	if lease%time.Second != 0 {
		secs++
	}
	secs++ // the partial tick
	if secs <= maxRelativeExpiry {
		return int32(secs)
	}
	abs := now.Unix() + secs
	if abs > math.MaxInt32 || abs < 0 {
		abs = math.MaxInt32
	}
	return int32(abs)
}

// expiryDuration is the longest time an item stored with expiry(lease)
// lives: used to report a holder's remaining time once its nominal lease has
// run out but the item is still there.
func expiryDuration(lease time.Duration) time.Duration {
	secs := int64(lease / time.Second)
	if lease%time.Second != 0 {
		secs++
	}
	if secs+1 > int64(math.MaxInt64/time.Second) {
		return math.MaxInt64
	}
	return time.Duration(secs+1) * time.Second
}
