package main

import (
	"fmt"
	"math"
	"strings"
)

// series is one line of the plot.
type series struct {
	label, color, bench string // bench: name with %d for the waiter count
	dashed              bool
}

// plot draws hand-off p50 (solid) and p99 (faint) against the number of
// waiters, on a logarithmic time axis, as a self-contained SVG.
func plot(r *results) string {
	const (
		width, height            = 760, 460
		left, right, top, bottom = 70, 230, 40, 50
		plotW, plotH             = width - left - right, height - top - bottom
	)
	waiters := []int{2, 8, 32}
	lines := []series{
		{"ours, across instances", "#1f77b4", "Handoff/datastore/ours/cross/hold=50ms/waiters=%d", false},
		{"ours, one process", "#2ca02c", "Handoff/datastore/ours/local/hold=50ms/waiters=%d", false},
		{"djangae, across instances", "#d62728", "Handoff/datastore/djangae/cross/hold=50ms/waiters=%d", false},
		{"djangae, one process", "#ff7f0e", "Handoff/datastore/djangae/local/hold=50ms/waiters=%d", false},
		{"datastore-lock, across", "#9467bd", "Handoff/datastore/googlelock/cross/hold=50ms/waiters=%d", false},
		{"ours on memory, one process", "#7f7f7f", "Handoff/memory/ours/local/hold=50ms/waiters=%d", true},
	}
	// The y range covers every value, in whole decades.
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, s := range lines {
		for _, n := range waiters {
			for _, u := range []string{"p50-ns", "p99-ns"} {
				if v, ok := r.get(fmt.Sprintf(s.bench, n), u); ok && v > 0 {
					lo, hi = min(lo, v), max(hi, v)
				}
			}
		}
	}
	limit, hasLimit := r.get("Throughput/datastore/ours/g=1", "acq-p50-ns")
	if hasLimit && limit > 0 {
		lo, hi = min(lo, limit), max(hi, limit)
	}
	if math.IsInf(lo, 0) {
		lo, hi = 1e3, 1e9
	}
	dlo, dhi := math.Floor(math.Log10(lo)), math.Ceil(math.Log10(hi))
	if dhi == dlo {
		dhi++
	}
	x := func(i int) float64 { return left + float64(plotW)*(float64(i)+0.5)/float64(len(waiters)) }
	y := func(ns float64) float64 {
		return top + float64(plotH)*(1-(math.Log10(ns)-dlo)/(dhi-dlo))
	}

	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	w(`<rect width="100%%" height="100%%" fill="white"/>` + "\n")
	w(`<text x="%d" y="22" font-size="15" font-weight="bold">Hand-off latency vs waiters (Datastore emulator, hold 50 ms)</text>`+"\n", left)
	// Axes and grid.
	for d := dlo; d <= dhi; d++ {
		yy := y(math.Pow(10, d))
		w(`<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>`+"\n", left, yy, left+plotW, yy)
		w(`<text x="%d" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n", left-6, yy, decade(d))
	}
	w(`<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#333"/>`+"\n", left, top, plotW, plotH)
	for i, n := range waiters {
		w(`<text x="%.1f" y="%d" text-anchor="middle">%d</text>`+"\n", x(i), top+plotH+18, n)
	}
	w(`<text x="%d" y="%d" text-anchor="middle">waiters</text>`+"\n", left+plotW/2, top+plotH+38)
	w(`<text x="16" y="%d" text-anchor="middle" transform="rotate(-90 16 %d)">hand-off (log scale)</text>`+"\n", top+plotH/2, top+plotH/2)
	if hasLimit && limit > 0 {
		w(`<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#000" stroke-dasharray="2,3"/>`+"\n", left, y(limit), left+plotW, y(limit))
	}
	// Lines: p99 faint first, then p50.
	for _, unit := range []string{"p99-ns", "p50-ns"} {
		for _, s := range lines {
			var pts []string
			for i, n := range waiters {
				if v, ok := r.get(fmt.Sprintf(s.bench, n), unit); ok && v > 0 {
					pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(i), y(v)))
				}
			}
			if len(pts) == 0 {
				continue
			}
			style := `stroke-width="2.5"`
			if unit == "p99-ns" {
				style = `stroke-width="1.2" stroke-opacity="0.45" stroke-dasharray="6,4"`
			} else if s.dashed {
				style = `stroke-width="2" stroke-dasharray="4,3"`
			}
			w(`<polyline fill="none" stroke="%s" %s points="%s"/>`+"\n", s.color, style, strings.Join(pts, " "))
			if unit == "p50-ns" {
				for _, p := range pts {
					xy := strings.Split(p, ",")
					w(`<circle cx="%s" cy="%s" r="3.5" fill="%s"/>`+"\n", xy[0], xy[1], s.color)
				}
			}
		}
	}
	// Legend.
	lx, ly := left+plotW+16, top+8
	for i, s := range lines {
		yy := ly + i*20
		w(`<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2.5"/>`+"\n", lx, yy, lx+22, yy, s.color)
		w(`<text x="%d" y="%d" dominant-baseline="middle">%s</text>`+"\n", lx+28, yy, s.label)
	}
	yy := ly + len(lines)*20
	w(`<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#000" stroke-dasharray="2,3"/>`+"\n", lx, yy, lx+22, yy)
	w(`<text x="%d" y="%d" dominant-baseline="middle">1-RPC limit</text>`+"\n", lx+28, yy)
	w(`<text x="%d" y="%d" dominant-baseline="middle" fill="#666">solid: p50 · faint dashed: p99</text>`+"\n", lx, yy+24)
	w("</svg>\n")
	return b.String()
}

// decade labels 10^d nanoseconds: "100 µs", "1 ms", "10 s".
func decade(d float64) string {
	units := []string{"ns", "µs", "ms", "s"}
	i := min(max(int(d)/3, 0), len(units)-1)
	return fmt.Sprintf("%g %s", math.Pow(10, d-float64(3*i)), units[i])
}
