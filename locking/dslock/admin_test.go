package dslock

import (
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// TestListAndInspect checks that List and Inspect report what Acquire wrote:
// held and expired locks, prefix and held-only filters, and paging past one
// query batch.
func TestListAndInspect(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		a := newBackend(t, e, Options{})
		const short = 100 * time.Millisecond
		r1, r2, r3 := req("job/1", time.Minute), req("job/2", short), req("other", time.Minute)
		g1, g2, g3 := mustAcquire(t, a, r1), mustAcquire(t, a, r2), mustAcquire(t, a, r3)
		time.Sleep(short + 3*testSkew + 20*time.Millisecond) // job/2 expires
		insertStale(t, a, "page", listPage+20)               // more than one query batch

		all, err := a.List(t.Context(), ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(all.Locks) != listPage+23 || all.Read != listPage+23 || all.Next != "" {
			t.Fatalf("List read %d, returned %d locks, next %q; want %d, all, no next", all.Read, len(all.Locks), all.Next, listPage+23)
		}

		// Bounded: pages of at most Limit entities, resumed by cursor, read
		// every lock exactly once.
		seen := map[string]int{}
		calls := 0
		for cursor := ""; ; calls++ {
			l, err := a.List(t.Context(), ListOptions{Limit: 100, Cursor: cursor})
			if err != nil {
				t.Fatal(err)
			}
			if l.Read > 100 || len(l.Locks) != l.Read {
				t.Fatalf("List with Limit 100 read %d, returned %d", l.Read, len(l.Locks))
			}
			for _, in := range l.Locks {
				seen[in.ID]++
			}
			if l.Next == "" {
				break
			}
			cursor = l.Next
		}
		if len(seen) != listPage+23 || calls < (listPage+23)/100 {
			t.Errorf("paging by 100 saw %d locks in %d calls; want all %d, each once", len(seen), calls+1, listPage+23)
		}
		for id, n := range seen {
			if n != 1 {
				t.Errorf("lock %q listed %d times", id, n)
			}
		}
		for _, o := range []ListOptions{{Limit: -1}, {Cursor: "not base64!"}} {
			if _, err := a.List(t.Context(), o); !errors.Is(err, ErrBadOptions) {
				t.Errorf("List(%+v) = %v; want ErrBadOptions", o, err)
			}
		}
		tests := []struct {
			name string
			opts ListOptions
			want []string // "id owner token held"
		}{
			{"prefix", ListOptions{Prefix: "job/"}, []string{
				fmt.Sprintf("job/1 %s %d true", r1.Owner, g1.Token),
				fmt.Sprintf("job/2 %s %d false", r2.Owner, g2.Token),
			}},
			{"held only", ListOptions{HeldOnly: true}, []string{
				fmt.Sprintf("job/1 %s %d true", r1.Owner, g1.Token),
				fmt.Sprintf("other %s %d true", r3.Owner, g3.Token),
			}},
			{"no match", ListOptions{Prefix: "nothing"}, nil},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				got, err := a.List(t.Context(), tt.opts)
				if err != nil {
					t.Fatal(err)
				}
				var lines []string
				for _, in := range got.Locks {
					lines = append(lines, fmt.Sprintf("%s %s %d %t", in.ID, in.Owner, in.Token, in.Held))
				}
				if fmt.Sprint(lines) != fmt.Sprint(tt.want) {
					t.Errorf("List(%+v) = %q; want %q", tt.opts, lines, tt.want)
				}
			})
		}

		in, err := a.Inspect(t.Context(), "job/1")
		if err != nil {
			t.Fatal(err)
		}
		if in.KeyName != KeyName("job/1") || in.Lease != time.Minute || in.Remaining <= 50*time.Second || in.Remaining > time.Minute ||
			!in.ExpiresAt.Equal(in.RenewedAt.Add(time.Minute)) || in.Token != g1.Token || !in.Held {
			t.Errorf("Inspect(job/1) = %+v", in)
		}
		in, err = a.Inspect(t.Context(), "job/2")
		if err != nil || in.Held || in.Remaining > 0 {
			t.Errorf("Inspect(job/2) = %+v, %v; want expired", in, err)
		}
		if _, err := a.Inspect(t.Context(), "missing"); !errors.Is(err, ErrNotFound) {
			t.Errorf("Inspect(missing) error = %v; want ErrNotFound", err)
		}
	})
}

// TestForceRelease removes a live holder's lock: the holder's Done closes at
// its next renewal, the deletion's fence lies above the removed token, and the
// next holder's token above both.
func TestForceRelease(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		holderB, otherB, admin := newBackend(t, e, Options{}), newBackend(t, e, Options{}), newBackend(t, e, Options{})
		holder, err := locking.New(locking.Config{Strong: holderB, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		const lease = 900 * time.Millisecond // renewed every 300 ms
		l, err := holder.Acquire(t.Context(), "stuck", locking.Lease(lease))
		if err != nil {
			t.Fatal(err)
		}
		defer l.Release(t.Context())

		if _, err := admin.ForceRelease(t.Context(), "stuck", l.Token()+1); !errors.Is(err, ErrTokenMismatch) {
			t.Fatalf("ForceRelease with a wrong token: %v; want ErrTokenMismatch", err)
		}
		if _, found := stored(t, admin, "stuck"); !found {
			t.Fatal("ForceRelease with a wrong token removed the lock")
		}
		rel, err := admin.ForceRelease(t.Context(), "stuck", l.Token())
		if err != nil {
			t.Fatal(err)
		}
		if rel.Lock.Token != l.Token() || rel.Lock.ID != "stuck" || !rel.Lock.Held {
			t.Errorf("Released.Lock = %+v; want the holder's live lock, token %d", rel.Lock, l.Token())
		}
		if rel.Fence <= l.Token() {
			t.Errorf("Released.Fence = %d; want above the removed token %d", rel.Fence, l.Token())
		}
		if _, err := admin.Inspect(t.Context(), "stuck"); !errors.Is(err, ErrNotFound) {
			t.Errorf("Inspect after ForceRelease: %v; want ErrNotFound", err)
		}
		select {
		case <-l.Done():
			if !errors.Is(l.Err(), locking.ErrLockLost) {
				t.Errorf("holder's Err() = %v; want ErrLockLost", l.Err())
			}
		case <-time.After(lease):
			t.Fatal("the holder's Done did not close within a lease of the force release")
		}
		g := mustAcquire(t, otherB, req("stuck", time.Minute))
		if g.Token <= rel.Fence {
			t.Errorf("next token %d; want above the fence %d (removed token %d)", g.Token, rel.Fence, l.Token())
		}
		t.Logf("removed token %d, fence %d, next token %d", l.Token(), rel.Fence, g.Token)
		if _, err := admin.ForceRelease(t.Context(), "never-held", 0); !errors.Is(err, ErrNotFound) {
			t.Errorf("ForceRelease(never-held): %v; want ErrNotFound", err)
		}
	})
}
