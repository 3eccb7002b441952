package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBurstTable feeds benchplot a small output of tasks.BenchmarkBurst and
// checks the burst section it writes into a BENCHMARKS.md: one row per mode
// with the run's figures, the span over the ideal, and the hand-written
// text around the markers kept.
func TestBurstTable(t *testing.T) {
	dir := t.TempDir()
	md := filepath.Join(dir, "BENCHMARKS.md")
	const before, between, after = "# Benchmarks\n\nHand-written intro.\n\n", "\nHand-written analysis of the burst.\n\n", "\nHand-written tail.\n"
	doc := before + burstBegin + "\nOLD TABLE\n" + burstEnd + "\n" + between + beginMarker + "\nOLD RESULTS\n" + endMarker + "\n" + after
	if err := os.WriteFile(md, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run("testdata/burst.txt", md, filepath.Join(dir, "handoff.svg")); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(md)
	if err != nil {
		t.Fatal(err)
	}
	got := string(raw)
	for _, keep := range []string{before, between, after} {
		if !strings.Contains(got, keep) {
			t.Errorf("hand-written text %q lost:\n%s", keep, got)
		}
	}
	if strings.Contains(got, "OLD TABLE") || strings.Contains(got, "OLD RESULTS") {
		t.Errorf("old generated text kept:\n%s", got)
	}
	i, j := strings.Index(got, burstBegin), strings.Index(got, burstEnd)
	if i < 0 || j < i {
		t.Fatalf("burst markers lost:\n%s", got)
	}
	section := got[i:j]
	rows := map[string]string{}
	for line := range strings.SplitSeq(section, "\n") {
		for _, m := range burstModes {
			if strings.HasPrefix(line, "| "+m.label+" |") {
				rows[m.name] = line
			}
		}
	}
	want := map[string][]string{
		// span, ideal, span/ideal, 429s, 503s, quiet, during the burst
		"Burst/park": {"| 1.834 s |", "| 1.800 s |", "| 1.0× |", "| 0 | 0 |", "| 0.9 ms |", "| 0.5 ms |"},
		"Burst/429":  {"| 75.490 s |", "| 1.800 s |", "| 41.9× |", "| 10 | 0 |", "| 0.7 ms |", "| 1244.0 ms |"},
	}
	for name, cells := range want {
		row, ok := rows[name]
		if !ok {
			t.Errorf("no row for %s in:\n%s", name, section)
			continue
		}
		for _, c := range cells {
			if !strings.Contains(row, c) {
				t.Errorf("%s row lacks %q: %s", name, c, row)
			}
		}
	}
}

// TestBurstTableAbsent: an output without BenchmarkBurst leaves the burst
// section as it was.
func TestBurstTableAbsent(t *testing.T) {
	r, err := parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	if r.hasBurst() {
		t.Fatal("hasBurst on an output without BenchmarkBurst")
	}
	dir := t.TempDir()
	md := filepath.Join(dir, "BENCHMARKS.md")
	in := filepath.Join(dir, "bench.txt")
	doc := burstBegin + "\nKEEP\n" + burstEnd + "\n"
	if err := os.WriteFile(md, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in, []byte(sample), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run(in, md, filepath.Join(dir, "handoff.svg")); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(md)
	if !strings.Contains(string(raw), burstBegin+"\nKEEP\n"+burstEnd) {
		t.Errorf("the burst section changed without burst results:\n%s", raw)
	}
}
