package mclock

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// record is the value of a lock item: who holds it, the fencing token of the
// holding, and when and for how long it was last acquired or renewed, on the
// writer's clock.
//
// Encoding: "1 <token> <stamp µs since epoch> <lease µs> <owner>", owner last
// so that it may contain any byte.
type record struct {
	token uint64
	stamp time.Time
	lease time.Duration
	owner string
}

const recordVersion = "1"

func (r record) encode() []byte {
	return fmt.Appendf(nil, "%s %d %d %d %s", recordVersion, r.token, r.stamp.UnixMicro(), r.lease.Microseconds(), r.owner)
}

// decodeRecord parses a lock item. It reports false for a value this package
// did not write.
func decodeRecord(b []byte) (record, bool) {
	f := strings.SplitN(string(b), " ", 5)
	if len(f) != 5 || f[0] != recordVersion {
		return record{}, false
	}
	tok, err1 := strconv.ParseUint(f[1], 10, 64)
	stamp, err2 := strconv.ParseInt(f[2], 10, 64)
	lease, err3 := strconv.ParseInt(f[3], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return record{}, false
	}
	return record{token: tok, stamp: time.UnixMicro(stamp), lease: time.Duration(lease) * time.Microsecond, owner: f[4]}, true
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
