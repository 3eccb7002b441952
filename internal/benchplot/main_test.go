package main

import (
	"encoding/xml"
	"errors"
	"io"
	"strings"
	"testing"
)

const sample = `# nproc: 2
goos: linux
cpu: AMD EPYC
BenchmarkRoundTrips/datastore/ours/acquire-2 	       1	 256356353 ns/op	         1.000 rpcs/op
--- BENCH: BenchmarkRoundTrips/datastore/ours/acquire-2
    roundtrip_bench_test.go:58: acquire: Commit
BenchmarkHandoff/datastore/ours/cross/hold=50ms/waiters=2-2  1  5196686520 ns/op  26168448 call-p50-ns  14428921 p50-ns  83461927 p99-ns  16.36 polls/s  60.00 samples
BenchmarkHandoff/datastore/djangae/cross/hold=50ms/waiters=2-2  1  6366789984 ns/op  175962578 call-p50-ns  172919358 p50-ns  641564416 p99-ns  1.885 polls/s  20.00 samples
BenchmarkHandoff/datastore/ours/local/hold=50ms/waiters=2
`

func TestParse(t *testing.T) {
	r, err := parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, unit string
		want       float64
	}{
		{"RoundTrips/datastore/ours/acquire", "rpcs/op", 1},
		{"Handoff/datastore/ours/cross/hold=50ms/waiters=2", "p50-ns", 14428921},
		{"Handoff/datastore/djangae/cross/hold=50ms/waiters=2", "polls/s", 1.885},
	}
	for _, tc := range tests {
		if got, ok := r.get(tc.name, tc.unit); !ok || got != tc.want {
			t.Errorf("%s %s = %v, %v; want %v", tc.name, tc.unit, got, ok, tc.want)
		}
	}
	if _, ok := r.metrics["Handoff/datastore/ours/local/hold=50ms/waiters=2"]; ok {
		t.Error("a name line without results was parsed as a result")
	}
	if len(r.header) != 3 || r.header[0] != "nproc: 2" {
		t.Errorf("header = %q", r.header)
	}
	if got := r.ratio("Handoff/datastore/djangae/cross/hold=50ms/waiters=2", "p50-ns", "Handoff/datastore/ours/cross/hold=50ms/waiters=2", "p50-ns"); got != "12.0×" {
		t.Errorf("ratio = %q; want 12.0×", got)
	}
}

func TestSplice(t *testing.T) {
	tests := []struct{ name, doc, want string }{
		{"no markers", "# Title\n", "# Title\n\n" + beginMarker + "\nNEW\n" + endMarker + "\n"},
		{"markers", "a\n" + beginMarker + "\nOLD\n" + endMarker + "\nb\n", "a\n" + beginMarker + "\nNEW\n" + endMarker + "\nb\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := splice(tc.doc, "NEW\n"); got != tc.want {
				t.Errorf("splice = %q; want %q", got, tc.want)
			}
		})
	}
}

// TestPlotWellFormed checks that the SVG is well-formed XML and draws the
// measured series.
func TestPlotWellFormed(t *testing.T) {
	r, err := parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	svg := plot(r)
	d := xml.NewDecoder(strings.NewReader(svg))
	lines := 0
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "polyline" {
			lines++
		}
	}
	if lines != 4 { // p50 and p99 of the two series measured
		t.Errorf("%d polylines; want 4", lines)
	}
}
