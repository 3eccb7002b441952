package memstore

import (
	"math"
	"testing"
	"time"
)

// maxLease mirrors locking.MaxLease, which this package cannot import.
const maxLease = 24 * time.Hour

// fakeClock is a clock tests move by hand; it starts from a reading of the
// real clock so that it carries a monotonic reading, as time.Now does.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

// TestDurationExtremes takes locks with leases and StealAfter at the ends of
// their range, on a clock with a monotonic reading and on one without: the
// lease arithmetic must neither wrap around (a huge lease turning expired)
// nor round a tiny one to "never".
func TestDurationExtremes(t *testing.T) {
	for name, start := range map[string]time.Time{
		"monotonic": time.Now(),
		"wall only": time.Now().Round(0),
		"late wall": time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC),
	} {
		t.Run(name, func(t *testing.T) {
			for _, lease := range []time.Duration{maxLease, math.MaxInt64} {
				c := &fakeClock{t: start}
				s := New(c.now)
				if r := s.Acquire("x", "a", lease, 0); !r.Acquired {
					t.Fatalf("lease %v: Acquire = %+v", lease, r)
				}
				c.advance(maxLease - time.Second)
				r := s.Acquire("x", "b", time.Minute, 0)
				if r.Acquired {
					t.Fatalf("lease %v: another owner took the lock a second before MaxLease", lease)
				}
				if r.Remaining < time.Second || r.Remaining > lease {
					t.Errorf("lease %v: Remaining = %v; want in [1s, %v]", lease, r.Remaining, lease)
				}
				if r := s.Acquire("x", "b", time.Minute, maxLease); r.Acquired {
					t.Errorf("lease %v: stolen with StealAfter MaxLease after MaxLease-1s", lease)
				}
				if tok, ok := s.Renew("x", "a", lease); !ok || tok == 0 {
					t.Errorf("lease %v: Renew = %d, %v", lease, tok, ok)
				}
				if n := s.Held(); n != 1 {
					t.Errorf("lease %v: Held = %d; want 1", lease, n)
				}
			}

			c := &fakeClock{t: start}
			s := New(c.now)
			if r := s.Acquire("tiny", "a", time.Nanosecond, 0); !r.Acquired {
				t.Fatalf("1ns lease: Acquire = %+v", r)
			}
			if r := s.Acquire("tiny", "b", time.Minute, 0); r.Acquired || r.Remaining != time.Nanosecond {
				t.Errorf("1ns lease, same instant: Acquire by another = %+v; want busy for 1ns", r)
			}
			c.advance(time.Nanosecond)
			if r := s.Acquire("tiny", "b", time.Minute, 0); !r.Acquired || !r.TookOver {
				t.Errorf("1ns lease, 1ns later: Acquire by another = %+v; want a takeover", r)
			}

			if r := s.Acquire("steal", "a", time.Minute, 0); !r.Acquired {
				t.Fatalf("Acquire = %+v", r)
			}
			if r := s.Acquire("steal", "b", time.Minute, time.Nanosecond); r.Acquired {
				t.Errorf("StealAfter 1ns, same instant: stolen (%+v); want busy", r)
			}
			c.advance(time.Nanosecond)
			if r := s.Acquire("steal", "b", time.Minute, time.Nanosecond); !r.Acquired || !r.TookOver {
				t.Errorf("StealAfter 1ns, 1ns later: %+v; want stolen", r)
			}
		})
	}
}
