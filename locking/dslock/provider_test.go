package dslock

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// TestProvider checks when the environment makes locking.Default use this
// backend, and that the backend it builds works against the emulator.
func TestProvider(t *testing.T) {
	for _, v := range []string{"GOOGLE_CLOUD_PROJECT", "DATASTORE_EMULATOR_HOST", "DATASTORE_PROJECT_ID", EnvKind, EnvNamespace, EnvDatabase} {
		t.Setenv(v, "")
	}
	t.Run("nothing named", func(t *testing.T) {
		if b, ok, err := provide(); ok || err != nil || b != nil {
			t.Errorf("provide() = %v, %v, %v; want not ok", b, ok, err)
		}
	})
	t.Run("project named, no credentials needed before first use", func(t *testing.T) {
		t.Setenv("GOOGLE_CLOUD_PROJECT", "some-project")
		t.Setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/credentials.json")
		b, ok, err := provide()
		if !ok || err != nil || b == nil {
			t.Fatalf("provide() = %v, %v, %v; want ok", b, ok, err)
		}
		defer b.(*Backend).Close()
		// The credentials are looked up on first use, and missing ones fail it.
		_, err = b.Acquire(t.Context(), req("x", 1e9))
		if err == nil {
			t.Errorf("Acquire without credentials succeeded")
		}
	})
	t.Run("emulator named", func(t *testing.T) {
		e := emulator(t, dstest.Legacy)
		t.Setenv("DATASTORE_EMULATOR_HOST", e.Host)
		t.Setenv("DATASTORE_PROJECT_ID", e.ProjectID)
		t.Setenv(EnvKind, "CustomLock")
		t.Setenv(EnvNamespace, "ns1")
		p, ok, err := provide()
		if !ok || err != nil {
			t.Fatalf("provide() = %v, %v, %v; want ok", p, ok, err)
		}
		b := p.(*Backend)
		defer b.Close()
		if b.Kind() != "CustomLock" || b.namespace != "ns1" {
			t.Errorf("kind %q namespace %q; want them from the environment", b.Kind(), b.namespace)
		}
		c, err := locking.New(locking.Config{Strong: b})
		if err != nil {
			t.Fatal(err)
		}
		l, err := c.Acquire(t.Context(), "provided")
		if err != nil {
			t.Fatal(err)
		}
		other := newBackend(t, e, Options{Kind: "CustomLock", Namespace: "ns1"})
		if rec, found := stored(t, other, "provided"); !found || rec.fencing() != l.Token() {
			t.Errorf("lock not stored where the environment says (found=%v)", found)
		}
		if err := l.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("emulator named without a project", func(t *testing.T) {
		t.Setenv("DATASTORE_EMULATOR_HOST", "127.0.0.1:1")
		if _, ok, err := provide(); !ok || !errors.Is(err, ErrBadOptions) {
			t.Errorf("provide() ok=%v err=%v; want ok with ErrBadOptions", ok, err)
		}
	})
}

func TestNewValidates(t *testing.T) {
	t.Setenv("DATASTORE_PROJECT_ID", "")
	t.Setenv("GOOGLE_CLOUD_PROJECT", "")
	for name, o := range map[string]Options{
		"no project":                {},
		"reserved kind":             {ProjectID: "p", Kind: "__kind__"},
		"kind over 1500 bytes":      {ProjectID: "p", Kind: strings.Repeat("k", MaxKindBytes+1)},
		"kind with NUL":             {ProjectID: "p", Kind: "Lock\x00"},
		"reserved namespace":        {ProjectID: "p", Namespace: "__x__"},
		"namespace with a slash":    {ProjectID: "p", Namespace: "a/b"},
		"database id with capitals": {ProjectID: "p", DatabaseID: "Locks"},
		"database id like a UUID":   {ProjectID: "p", DatabaseID: "a0000000-0000-0000-0000-000000000000"},
		"negative skew":             {ProjectID: "p", ClockSkew: -1},
		"negative rpc":              {ProjectID: "p", RPCTimeout: -1},
	} {
		if _, err := New(t.Context(), o); !errors.Is(err, ErrBadOptions) || !errors.Is(err, locking.ErrInvalid) {
			t.Errorf("%s: New = %v; want ErrBadOptions", name, err)
		}
	}
	// Every problem in the one error.
	_, err := New(t.Context(), Options{ProjectID: "p", Namespace: "__x__", Kind: "a\x00", DatabaseID: "X", ClockSkew: -1})
	for _, want := range []string{`namespace "__x__"`, `kind "a\x00"`, `database id "X"`, "ClockSkew"} {
		if !strings.Contains(fmt.Sprint(err), want) {
			t.Errorf("New with four problems: %v; want %s named", err, want)
		}
	}
	for _, o := range []Options{
		{ProjectID: "p", Namespace: "tenant-a", Kind: "Lock", DatabaseID: "locks-db"},
		{ProjectID: "p", DatabaseID: "(default)"},
	} {
		b, err := New(t.Context(), o)
		if err != nil {
			t.Errorf("New(%+v) = %v; want valid", o, err)
			continue
		}
		_ = b.Close()
	}
}

func TestRequestValidation(t *testing.T) {
	b, err := New(t.Context(), Options{ProjectID: "p", Conn: nil})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for name, r := range map[string]locking.Request{
		"empty id":       {Owner: "o", Lease: 1e9},
		"empty owner":    {ID: "x", Lease: 1e9},
		"owner not utf8": {ID: "x", Owner: "\xff", Lease: 1e9},
		"zero lease":     {ID: "x", Owner: "o"},
		"negative steal": {ID: "x", Owner: "o", Lease: 1e9, StealAfter: -1},
	} {
		if _, err := b.Acquire(t.Context(), r); !errors.Is(err, locking.ErrInvalid) {
			t.Errorf("Acquire %s = %v; want ErrInvalid", name, err)
		}
		if _, err := b.Renew(t.Context(), r); !errors.Is(err, locking.ErrInvalid) {
			t.Errorf("Renew %s = %v; want ErrInvalid", name, err)
		}
	}
	if err := b.Release(t.Context(), "", "o"); !errors.Is(err, locking.ErrInvalid) {
		t.Errorf("Release with empty id = %v; want ErrInvalid", err)
	}
}

func TestKeyAndReadableID(t *testing.T) {
	if KeyName("a") == KeyName("a ") || len(KeyName("x")) != 64 {
		t.Errorf("KeyName must be a 64-hex-digit hash distinguishing ids")
	}
	long := string(make([]byte, 5000))
	cases := map[string]struct{ in, want string }{
		"plain":       {"user-42", "user-42"},
		"invalid":     {"a\xffb", "a\uFFFDb"},
		"long":        {long, long[:maxIDBytes]},
		"rune at cut": {long[:maxIDBytes-1] + "é", long[:maxIDBytes-1]},
	}
	for name, tc := range cases {
		if got := readable(tc.in); got != tc.want {
			t.Errorf("%s: readable = %d bytes; want %d", name, len(got), len(tc.want))
		}
	}
}
