// Command benchplot turns the output of the internal/bench benchmarks into
// the tables of BENCHMARKS.md and an SVG plot of hand-off latency against
// the number of waiters.
//
//	go run ./internal/benchplot -in bench.txt -md BENCHMARKS.md -svg docs/handoff.svg
//
// It replaces the part of the Markdown file between the markers
// "<!-- bench:begin -->" and "<!-- bench:end -->", and, when the input holds
// a run of tasks.BenchmarkBurst, the burst table between
// "<!-- burst:begin -->" and "<!-- burst:end -->" (park mode vs 429 mode vs
// the ideal n × T, and unrelated ids' start latency with and without the
// burst), when it holds a run of BenchmarkDistance, the loopback and
// production-like figures between "<!-- distance:begin -->" and
// "<!-- distance:end -->" (an input of BenchmarkDistance alone updates only
// that section), and leaves the rest (hand-written analysis) alone; a file without
// the markers gets them appended. Lines of the input starting with "# " (written by `make bench`:
// machine, load, command) are copied into the report.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"regexp"
	"strconv"
	"strings"
)

const (
	beginMarker = "<!-- bench:begin -->"
	endMarker   = "<!-- bench:end -->"
)

func main() {
	in := flag.String("in", "", "benchmark output to read (default stdin)")
	md := flag.String("md", "BENCHMARKS.md", "Markdown report to update")
	svg := flag.String("svg", "docs/handoff.svg", "SVG plot to write")
	flag.Parse()
	if err := run(*in, *md, *svg); err != nil {
		log.Fatal(err)
	}
}

func run(in, mdPath, svgPath string) error {
	var r io.Reader = os.Stdin
	if in != "" {
		f, err := os.Open(in)
		if err != nil {
			return err
		}
		defer f.Close()
		r = f
	}
	res, err := parse(r)
	if err != nil {
		return err
	}
	if len(res.metrics) == 0 {
		return errors.New("benchplot: no benchmark results in the input")
	}
	old, err := os.ReadFile(mdPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	doc := string(old)
	if !res.distanceOnly() {
		if err := os.WriteFile(svgPath, []byte(plot(res)), 0o644); err != nil {
			return err
		}
		doc = splice(doc, report(res, svgPath))
	}
	if res.hasBurst() {
		doc = spliceBetween(doc, burstBegin, burstEnd, burstReport(res))
	}
	if res.hasDistance() {
		doc = spliceBetween(doc, distanceBegin, distanceEnd, distanceReport(res))
	}
	return os.WriteFile(mdPath, []byte(doc), 0o644)
}

// results holds the parsed benchmark output.
type results struct {
	header  []string                      // "# " lines and goos/goarch/cpu lines
	metrics map[string]map[string]float64 // benchmark name (no -N suffix) -> unit -> value
	order   []string                      // benchmark names in input order
}

var procSuffix = regexp.MustCompile(`-\d+$`)

// parse reads `go test -bench` output.
func parse(r io.Reader) (*results, error) {
	res := &results{metrics: map[string]map[string]float64{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "# "):
			res.header = append(res.header, strings.TrimPrefix(line, "# "))
		case strings.HasPrefix(line, "cpu: "), strings.HasPrefix(line, "goos: "), strings.HasPrefix(line, "goarch: "):
			res.header = append(res.header, line)
		case strings.HasPrefix(line, "Benchmark"):
			f := strings.Fields(line)
			if len(f) < 4 || len(f)%2 != 0 {
				continue // a benchmark name printed before its logs, or a failure
			}
			if _, err := strconv.Atoi(f[1]); err != nil {
				continue
			}
			name := procSuffix.ReplaceAllString(strings.TrimPrefix(f[0], "Benchmark"), "")
			m := map[string]float64{}
			for i := 2; i+1 < len(f); i += 2 {
				v, err := strconv.ParseFloat(f[i], 64)
				if err != nil {
					return nil, fmt.Errorf("benchplot: %q: %v", line, err)
				}
				m[f[i+1]] = v
			}
			if _, seen := res.metrics[name]; !seen {
				res.order = append(res.order, name)
			}
			res.metrics[name] = m
		}
	}
	return res, sc.Err()
}

// get returns a metric, and whether it was measured.
func (r *results) get(name, unit string) (float64, bool) {
	v, ok := r.metrics[name][unit]
	return v, ok
}

// splice puts body between the markers of doc.
func splice(doc, body string) string { return spliceBetween(doc, beginMarker, endMarker, body) }
