package badinput_test

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/mclock"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/locking/redislock"
)

var (
	hexName  = regexp.MustCompile(`^[0-9a-f]{64}$`)
	hashPart = `[A-Za-z0-9_-]{43}`
	mcKey    = regexp.MustCompile(`^taskguard:(lock|fence):` + hashPart + `$`)
	redisKey = regexp.MustCompile(`^taskguard:\{` + hashPart + `\}:(lock|fence)$`)
)

// seeds are ids that have broken key mappings elsewhere: empty, spaces,
// control characters, invalid UTF-8, braces (Redis hash tags), separators,
// Datastore's reserved __names__, and huge ids.
func seeds(f *testing.F) {
	for _, id := range []string{
		"", "user-42", " ", "a b", "\x00", "\r\nset x 0 0 1\r\n", "\xff\xfe", "{tag}", "}{", "__key__", "__",
		"lock:x", "ünïcödé", "\u2028", strings.Repeat("x", 250), strings.Repeat("é", 1000), strings.Repeat("\x00", 1<<16),
	} {
		f.Add(id)
	}
}

// FuzzLockKeys maps arbitrary ids to each backend's keys: Datastore key
// names are 64 lower-case hex digits (never a reserved __name__, within
// the 1500-byte limit); memcached keys are at most 250 bytes of printable
// ASCII without spaces; Redis keys carry exactly one hash tag, shared by the
// lock and its fence so that both live in one cluster slot. Distinct ids
// map to distinct keys (checked against a fixed other id).
func FuzzLockKeys(f *testing.F) {
	seeds(f)
	mc, err := mclock.New(memcache.New("127.0.0.1:1"), mclock.Options{})
	if err != nil {
		f.Fatal(err)
	}
	rc := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	f.Cleanup(func() { rc.Close() })
	rl, err := redislock.New(rc, redislock.Options{})
	if err != nil {
		f.Fatal(err)
	}
	const other = "some other id"
	f.Fuzz(func(t *testing.T, id string) {
		name := dslock.KeyName(id)
		if !hexName.MatchString(name) {
			t.Errorf("dslock.KeyName(%q) = %q; want 64 hex digits", id, name)
		}
		for _, k := range []string{mc.LockKey(id), mc.FenceKey(id)} {
			if len(k) > 250 || !mcKey.MatchString(k) {
				t.Errorf("memcached key %q for %q: want at most 250 bytes of printable ASCII", k, id)
			}
		}
		lk, fk := rl.LockKey(id), rl.FenceKey(id)
		for _, k := range []string{lk, fk} {
			if !redisKey.MatchString(k) || strings.Count(k, "{") != 1 || !utf8.ValidString(k) {
				t.Errorf("redis key %q for %q: want one hash tag", k, id)
			}
		}
		if tag := func(k string) string { return k[strings.Index(k, "{"):strings.Index(k, "}")] }; tag(lk) != tag(fk) {
			t.Errorf("lock %q and fence %q of %q are in different hash slots", lk, fk, id)
		}
		if id != other && (name == dslock.KeyName(other) || mc.LockKey(id) == mc.LockKey(other) || lk == rl.LockKey(other)) {
			t.Errorf("%q and %q map to the same key", id, other)
		}
	})
}

// FuzzWith takes and releases a lock with an arbitrary id through the
// locking client on the in-memory backend: a non-empty id is acquired,
// renewed and released, and nothing stays held; an empty one fails with
// ErrInvalid before touching the backend.
func FuzzWith(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, id string) {
		b := memlock.New()
		c, err := locking.New(locking.Config{Strong: b})
		if err != nil {
			t.Fatal(err)
		}
		ran := false
		err = c.With(context.Background(), id, func(ctx context.Context) error {
			ran = true
			if l := locking.FromContext(ctx); l == nil || l.ID() != id || l.Token() == 0 {
				t.Errorf("held lock for %q: %+v", id, l)
			}
			if b.Held() != 1 {
				t.Errorf("Held() = %d inside With; want 1", b.Held())
			}
			return nil
		}, locking.Lease(time.Minute))
		switch {
		case id == "":
			if !errors.Is(err, locking.ErrInvalid) || ran {
				t.Errorf("With(\"\") = %v, ran=%v; want ErrInvalid and not run", err, ran)
			}
		case err != nil || !ran:
			t.Errorf("With(%q) = %v, ran=%v", id, err, ran)
		}
		if n := b.Held(); n != 0 {
			t.Errorf("%d locks left held after With(%q)", n, id)
		}
	})
}
