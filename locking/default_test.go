package locking_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// clearProduction unsets every variable that says production, and the
// opt-in, for the test.
func clearProduction(t *testing.T) {
	t.Helper()
	for _, v := range []string{"K_SERVICE", "K_REVISION", "CLOUD_RUN_JOB", "GAE_SERVICE", locking.EnvAllowMemory, testProviderEnv} {
		t.Setenv(v, "")
	}
}

// useDefault resets the default client for the test and captures the
// default logger's lines.
func useDefault(t *testing.T) *bytes.Buffer {
	t.Helper()
	var buf bytes.Buffer
	prev := slog.Default()
	slog.SetDefault(slog.New(slog.NewJSONHandler(&buf, nil)))
	locking.SetDefault(nil)
	t.Cleanup(func() { slog.SetDefault(prev); locking.SetDefault(nil) })
	return &buf
}

func nop(context.Context) error { return nil }

// TestDefaultRefusesMemoryInProduction: on Cloud Run settings with no Strong
// backend, the first lock call fails with ErrNoStrongBackend and an error
// that names the fix; nothing runs.
func TestDefaultRefusesMemoryInProduction(t *testing.T) {
	for _, v := range []string{"K_SERVICE", "K_REVISION", "CLOUD_RUN_JOB", "GAE_SERVICE"} {
		t.Run(v, func(t *testing.T) {
			clearProduction(t)
			t.Setenv(v, "checkout")
			useDefault(t)

			ran := false
			err := locking.With(t.Context(), "customer-z", func(context.Context) error { ran = true; return nil })
			if !errors.Is(err, locking.ErrNoStrongBackend) {
				t.Fatalf("With on %s = %v; want ErrNoStrongBackend", v, err)
			}
			if ran {
				t.Error("the function ran without a lock")
			}
			for _, want := range []string{"locking/dslock", "GOOGLE_CLOUD_PROJECT", locking.EnvAllowMemory, v + "=checkout"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error does not name %q: %v", want, err)
				}
			}
			if _, err := locking.Acquire(t.Context(), "customer-z", locking.Kind(locking.Weak)); !errors.Is(err, locking.ErrNoStrongBackend) {
				t.Errorf("Acquire(Weak) = %v; want ErrNoStrongBackend", err)
			}
			if err := locking.Default().Err(); !errors.Is(err, locking.ErrNoStrongBackend) {
				t.Errorf("Default().Err() = %v; want ErrNoStrongBackend", err)
			}
			if _, err := locking.FromEnvironment(locking.Config{Logger: slog.New(slog.DiscardHandler)}); !errors.Is(err, locking.ErrNoStrongBackend) {
				t.Errorf("FromEnvironment = %v; want ErrNoStrongBackend", err)
			}
		})
	}
}

// TestDefaultProductionWithStrongBackend: a configured Strong backend is
// used in production without complaint.
func TestDefaultProductionWithStrongBackend(t *testing.T) {
	clearProduction(t)
	t.Setenv("K_SERVICE", "checkout")
	b := memlock.New()
	c, err := locking.FromEnvironment(locking.Config{Strong: b, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatalf("FromEnvironment with Config.Strong: %v", err)
	}
	if c.Backend(locking.Strong) != b || c.Err() != nil {
		t.Errorf("client does not use the configured backend (err %v)", c.Err())
	}
}

// TestDefaultMemoryOptIn: TASKGUARD_ALLOW_MEMORY=1 accepts in-memory locks
// in production, with a WARN line; a value that is not a boolean is an
// error.
func TestDefaultMemoryOptIn(t *testing.T) {
	clearProduction(t)
	t.Setenv("K_SERVICE", "checkout")
	t.Setenv(locking.EnvAllowMemory, "1")
	logs := useDefault(t)
	if err := locking.With(t.Context(), "customer-z", nop); err != nil {
		t.Fatalf("With with %s=1: %v", locking.EnvAllowMemory, err)
	}
	if !strings.Contains(logs.String(), `"level":"WARN","msg":"locking: Strong locks are in this process's memory`) {
		t.Errorf("no WARN line about in-memory locks:\n%s", logs)
	}

	t.Setenv(locking.EnvAllowMemory, "yes please")
	locking.SetDefault(nil)
	if err := locking.With(t.Context(), "customer-z", nop); !errors.Is(err, locking.ErrInvalid) || !strings.Contains(err.Error(), locking.EnvAllowMemory) {
		t.Errorf("With with %s=%q = %v; want ErrInvalid naming it", locking.EnvAllowMemory, "yes please", err)
	}
}

// TestDefaultMemoryLocally: outside production the in-memory default stays,
// with a WARN line that says how to get a real backend.
func TestDefaultMemoryLocally(t *testing.T) {
	clearProduction(t)
	logs := useDefault(t)
	if err := locking.With(t.Context(), "customer-z", nop); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(logs.String(), `"level":"WARN"`); n != 1 {
		t.Errorf("%d WARN lines; want one:\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), "locking/dslock") {
		t.Errorf("WARN line does not name the fix:\n%s", logs)
	}
}

// TestInMemoryClientsShareOneStore: two clients that fall back to memory in
// one process exclude each other, as the default client and a client built
// by FromEnvironment (an App's, a Worker's) must.
func TestInMemoryClientsShareOneStore(t *testing.T) {
	clearProduction(t)
	useDefault(t)
	other, err := locking.FromEnvironment(locking.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	err = locking.With(t.Context(), "customer-z", func(context.Context) error {
		// Another request's context: not this With's.
		_, err := other.Acquire(t.Context(), "customer-z", locking.Wait(false))
		if !errors.Is(err, locking.ErrNotAcquired) {
			t.Errorf("second in-memory client acquired a lock the default client holds: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := other.Acquire(t.Context(), "customer-z", locking.Wait(false))
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
}

// TestCheckEnvironment: the error a default client built now would fail
// every lock call with, found without building it.
func TestCheckEnvironment(t *testing.T) {
	clearProduction(t)
	if err := locking.CheckEnvironment(); err != nil {
		t.Errorf("local environment: CheckEnvironment = %v; want nil (in-memory, allowed)", err)
	}
	t.Setenv(testProviderEnv, "bad")
	if err := locking.CheckEnvironment(); err == nil || !strings.Contains(err.Error(), "TEST_ADDR") {
		t.Errorf("a provider's invalid environment: CheckEnvironment = %v; want the provider's error", err)
	}
	t.Setenv(testProviderEnv, "")
	t.Setenv("K_SERVICE", "checkout")
	if err := locking.CheckEnvironment(); !errors.Is(err, locking.ErrNoStrongBackend) {
		t.Errorf("Cloud Run without a Strong backend: CheckEnvironment = %v; want ErrNoStrongBackend", err)
	}
	t.Setenv(locking.EnvAllowMemory, "maybe")
	if err := locking.CheckEnvironment(); !errors.Is(err, locking.ErrInvalid) {
		t.Errorf("%s=maybe: CheckEnvironment = %v; want ErrInvalid", locking.EnvAllowMemory, err)
	}
}
