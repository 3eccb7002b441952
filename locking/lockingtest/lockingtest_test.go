package lockingtest_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockingtest"
)

// brokenEnv names the flaw TestRunBroken puts into its backend.
const brokenEnv = "LOCKINGTEST_BROKEN"

// flawed is a small map-backed backend with one flaw switched on, to show
// that the suite catches it.
type flawed struct {
	flaw string

	mu      sync.Mutex
	last    uint64
	entries map[string]*flawedEntry
}

type flawedEntry struct {
	owner            string
	token            uint64
	renewed, expires time.Time
}

func (b *flawed) Acquire(_ context.Context, r locking.Request) (locking.Grant, error) {
	if err := r.Validate(); err != nil {
		return locking.Grant{}, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	took := false
	if e, ok := b.entries[r.ID]; ok {
		expired := !now.Before(e.expires)
		if b.flaw == "acquire-ignores-expiry" {
			expired = false
		}
		stale := r.StealAfter > 0 && now.Sub(e.renewed) > r.StealAfter
		if !expired && !stale {
			return locking.Grant{Remaining: e.expires.Sub(now)}, nil
		}
		took = true
	}
	if b.flaw != "token-repeats" || b.last == 0 {
		b.last++
	}
	b.entries[r.ID] = &flawedEntry{owner: r.Owner, token: b.last, renewed: now, expires: now.Add(r.Lease)}
	return locking.Grant{Acquired: true, Token: b.last, TookOver: took}, nil
}

func (b *flawed) Renew(_ context.Context, r locking.Request) (locking.Grant, error) {
	if err := r.Validate(); err != nil {
		return locking.Grant{}, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	e, ok := b.entries[r.ID]
	if !ok || e.owner != r.Owner {
		return locking.Grant{}, fmt.Errorf("flawed: %w", locking.ErrNotHeld)
	}
	now := time.Now()
	e.renewed, e.expires = now, now.Add(r.Lease)
	return locking.Grant{Acquired: true, Token: e.token}, nil
}

func (b *flawed) Release(_ context.Context, id, owner string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	e, ok := b.entries[id]
	if !ok || (e.owner != owner && b.flaw != "release-ignores-owner") {
		return fmt.Errorf("flawed: %w", locking.ErrNotHeld)
	}
	delete(b.entries, id)
	return nil
}

// TestRunBroken runs the suite against a flawed backend; it only runs as a
// child of TestSuiteCatchesBrokenBackends, which expects it to fail.
func TestRunBroken(t *testing.T) {
	flaw := os.Getenv(brokenEnv)
	if flaw == "" {
		t.Skip("run by TestSuiteCatchesBrokenBackends")
	}
	b := &flawed{flaw: flaw, entries: make(map[string]*flawedEntry)}
	lockingtest.Run(t, func(*testing.T) locking.Backend { return b }, lockingtest.Options{})
}

// TestSuiteCatchesBrokenBackends proves the suite can fail: each flaw must
// make the named subtests fail, and the same backend without a flaw passes.
func TestSuiteCatchesBrokenBackends(t *testing.T) {
	cases := []struct {
		flaw     string
		wantFail []string // subtests that must fail
	}{
		{"", nil},
		{"release-ignores-owner", []string{"Backend/ReleaseIsOwnerChecked", "ReleaseChecksOwner"}},
		{"acquire-ignores-expiry", []string{"Backend/ExpiredLeaseIsTakenOver", "DeadHolderTakenOver", "Backend/OneWinnerPerTakeover"}},
		{"token-repeats", []string{"FencingTokensIncrease", "Backend/ExpiredLeaseIsTakenOver", "WaitUntilReleased"}},
	}
	for _, tc := range cases {
		name := tc.flaw
		if name == "" {
			name = "no-flaw"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestRunBroken$", "-test.v", "-test.count=1", "-test.timeout=2m")
			cmd.Env = append(os.Environ(), brokenEnv+"="+tc.flaw)
			if tc.flaw == "" {
				cmd.Env = append(cmd.Env, brokenEnv+"=none")
			}
			out, err := cmd.CombinedOutput()
			if tc.wantFail == nil {
				if err != nil {
					t.Fatalf("suite failed against a correct backend: %v\n%s", err, out)
				}
				if !strings.Contains(string(out), "--- PASS: TestRunBroken/Contention") {
					t.Fatalf("suite did not run:\n%s", out)
				}
				return
			}
			if err == nil {
				t.Fatalf("suite passed against a backend with flaw %q", tc.flaw)
			}
			for _, sub := range tc.wantFail {
				if !strings.Contains(string(out), "--- FAIL: TestRunBroken/"+sub+" ") {
					t.Errorf("flaw %q: subtest %s did not fail; output:\n%s", tc.flaw, sub, out)
				}
			}
		})
	}
}
