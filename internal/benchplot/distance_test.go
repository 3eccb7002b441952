package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestDistanceTable feeds benchplot a small output of BenchmarkDistance alone
// and checks the section it writes (and nothing else): both columns side by
// side, the prod column in model and measured round trips, and each goal
// judged on the figures (met for the cycle at 2.00 measured RTT, not met
// for a 70 ms hand-off against 31.5 ms + 25 ms, nor for 2.1 writes per
// hand-off with failures).
func TestDistanceTable(t *testing.T) {
	dir := t.TempDir()
	md := filepath.Join(dir, "BENCHMARKS.md")
	doc := "# B\n\n" + distanceBegin + "\nOLD\n" + distanceEnd + "\n\nkept\n\n" + beginMarker + "\nMAIN TABLES\n" + endMarker + "\n"
	if err := os.WriteFile(md, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run("testdata/distance.txt", md, filepath.Join(dir, "handoff.svg")); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(md)
	if err != nil {
		t.Fatal(err)
	}
	got := string(raw)
	if strings.Contains(got, "OLD") || !strings.Contains(got, "kept") {
		t.Errorf("the section was not replaced in place:\n%s", got)
	}
	// An input of BenchmarkDistance alone leaves the other tables and the
	// plot alone.
	if !strings.Contains(got, "MAIN TABLES") {
		t.Errorf("the main tables were rewritten from an input without their benchmarks:\n%s", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "handoff.svg")); err == nil {
		t.Error("the plot was drawn from an input without hand-off benchmarks")
	}
	for _, want := range []string{
		"| one bare commit (the measured RTT), p50 | 1 RPC | 1.5 ms | 32 ms | — | 1 |",
		"| uncontended acquire + release, p50 | 2 RPCs: Insert, Delete | 3.0 ms | 63 ms | 2.10 | 2.00 |",
		"+15 ms each way",
		"| uncontended acquire + release ≤ 2.2 RTT | 63 ms = 2.00 measured RTT (2.10 model RTT) | **yes** |",
		"| cross-instance hand-off p50 ≤ 1 RTT + 25 ms (50 ms holds) | 70 ms (bound 56 ms; 55 ms with the model RTT) | **no** |",
		"| lock-entity write attempts per hand-off ≤ 2, none failed (loopback, hold=50ms) | 2.00, 0.00 failed | **yes** |",
		"| lock-entity write attempts per hand-off ≤ 2, none failed (prod, hold=50ms) | 2.10, 0.10 failed | **no** |",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %q in:\n%s", want, got)
		}
	}
}
