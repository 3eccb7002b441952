package mclock

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// record is the value of a lock item: who holds it, the fencing token of the
// holding, when and for how long it was last acquired or renewed, on the
// writer's clock, and the token of the last release before the holding.
//
// Encoding: "1 <token> <stamp µs since epoch> <lease µs> <owner>" when no
// release is known, else "2 <token> <stamp> <lease> <released> <owner>";
// owner last so that it may contain any byte.
type record struct {
	token uint64
	stamp time.Time
	lease time.Duration
	owner string
	// released is the token of the last holding released (by a tombstone)
	// before this one; 0 when unknown. Acquire copies it from the tombstone
	// it replaces, a steal and Renew keep it. Release reads it back to learn
	// that its own tombstone landed when a new holder replaced it before the
	// release saw it.
	released uint64
}

func (r record) encode() []byte {
	if r.released == 0 {
		return fmt.Appendf(nil, "1 %d %d %d %s", r.token, r.stamp.UnixMicro(), r.lease.Microseconds(), r.owner)
	}
	return fmt.Appendf(nil, "2 %d %d %d %d %s", r.token, r.stamp.UnixMicro(), r.lease.Microseconds(), r.released, r.owner)
}

// decodeRecord parses a lock item. It reports false for a value this package
// did not write.
func decodeRecord(b []byte) (record, bool) {
	n := 5
	if strings.HasPrefix(string(b), "2 ") {
		n = 6
	}
	f := strings.SplitN(string(b), " ", n)
	if len(f) != n || (f[0] != "1" && f[0] != "2") {
		return record{}, false
	}
	tok, err1 := strconv.ParseUint(f[1], 10, 64)
	stamp, err2 := strconv.ParseInt(f[2], 10, 64)
	lease, err3 := strconv.ParseInt(f[3], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return record{}, false
	}
	r := record{token: tok, stamp: time.UnixMicro(stamp), lease: micros(lease), owner: f[n-1]}
	if n == 6 {
		rel, err := strconv.ParseUint(f[4], 10, 64)
		if err != nil {
			return record{}, false
		}
		r.released = rel
	}
	return r, true
}

// micros converts a stored lease in microseconds: negative is 0, and beyond
// what a Duration holds is the longest Duration, never a wrapped-around one.
func micros(us int64) time.Duration {
	switch {
	case us <= 0:
		return 0
	case us > int64(math.MaxInt64/time.Microsecond):
		return math.MaxInt64
	}
	return time.Duration(us) * time.Microsecond
}

// remaining estimates how long the holder of r still holds the lock at now:
// its nominal lease end, or, past that, the end of memcached's rounding. It
// compares clocks of two machines, so it is a hint for retry scheduling only.
func (r record) remaining(now time.Time) time.Duration {
	if d := r.stamp.Add(r.lease).Sub(now); d > 0 {
		return d
	}
	if d := r.stamp.Add(expiryDuration(r.lease)).Sub(now); d > 0 {
		return d
	}
	return 0
}

// tombstonePrefix starts the value Release leaves in place of a lock item.
const tombstonePrefix = "released "

// tombstone is the value that marks a lock as released, naming the token of
// the released holding.
func tombstone(token uint64) []byte {
	return strconv.AppendUint([]byte(tombstonePrefix), token, 10)
}

func isTombstone(b []byte) bool { return strings.HasPrefix(string(b), tombstonePrefix) }

// tombstoneToken returns the token a tombstone names; ok is false when b is
// not a tombstone.
func tombstoneToken(b []byte) (uint64, bool) {
	rest, ok := strings.CutPrefix(string(b), tombstonePrefix)
	if !ok {
		return 0, false
	}
	tok, err := strconv.ParseUint(rest, 10, 64)
	return tok, err == nil
}
