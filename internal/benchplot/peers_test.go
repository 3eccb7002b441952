package main

import (
	"strings"
	"testing"
)

// peerSample is BenchmarkPeerHandoff and BenchmarkPeerUncontended output:
// redislock at 1.5 ms and 0.5 calls/s in one configuration and 3 ms and
// 29 calls/s in the other; dslock within its bound in one and at 2× it in
// the other, polling 26/s over the long waits.
const peerSample = `BenchmarkPeerHandoff/dslock/hold=200-600ms/waiters=2-2  1  100 ns/op  0 aux/s  30000000 call-p50-ns  20000000 p50-ns  40000000 p90-ns  0.8000 xbound-p50  27.00 polls/s  1.200 waits/s  800000000 wait-ns  0 waits60  30.00 samples
BenchmarkPeerHandoff/dslock/hold=10s/waiters=8-2  1  100 ns/op  0 aux/s  60000000 call-p50-ns  50000000 p50-ns  90000000 p90-ns  2.000 xbound-p50  26.00 polls/s  0.0200 waits/s  50000000000 wait-ns  26.00 poll60/s  2.000 waits60  6.000 samples
BenchmarkPeerHandoff/redislock/hold=200-600ms/waiters=2-2  1  100 ns/op  1.300 aux/s  1600000 call-p50-ns  1500000 p50-ns  2000000 p90-ns  0.06 xbound-p50  0.5000 polls/s  1.200 waits/s  800000000 wait-ns  0 waits60  30.00 samples
BenchmarkPeerHandoff/redislock/hold=10s/waiters=8-2  1  100 ns/op  0.100 aux/s  3100000 call-p50-ns  3000000 p50-ns  4000000 p90-ns  0.1 xbound-p50  29.00 polls/s  0.0200 waits/s  50000000000 wait-ns  0 waits60  6.000 samples
BenchmarkPeerHandoff/bsm/hold=200-600ms/waiters=2-2  1  100 ns/op  0 aux/s  41000000 call-p50-ns  40000000 p50-ns  50000000 p90-ns  1.6 xbound-p50  10.00 polls/s  1.200 waits/s  800000000 wait-ns  0 waits60  30.00 samples
BenchmarkPeerUncontended/redis-2  1  100 ns/op  2.000 bsm-calls  2000 bsm-n  30000 bsm-p50-ns  40000 bsm-p90-ns  2.000 redislock-calls  2000 redislock-n  75000 redislock-p50-ns  90000 redislock-p90-ns  20.00 rounds
`

func peerVerdicts(t *testing.T, in string) map[string]string {
	t.Helper()
	r, err := parse(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, line := range strings.Split(peerReport(r), "\n") {
		cells := strings.Split(line, " | ")
		if len(cells) == 3 && strings.HasPrefix(line, "| ") {
			got[strings.TrimPrefix(cells[0], "| ")] = strings.TrimSuffix(cells[2], " |")
		}
	}
	return got
}

func TestPeerGoals(t *testing.T) {
	v := peerVerdicts(t, peerSample)
	tests := []struct {
		goal string
		want []string // substrings of the verdict
	}{
		{"redis: cross-process", []string{"**not met** (1 of 2 configurations meet both)", "hand-off p50 up to 1.5× the goal (10 s holds, 8 waiting)",
			"store calls/s up to 29× the goal", "the waiters subscribed", "Faster than every peer measured beside it in 1 of 1 configurations, quieter in 1 of 1"}},
		{"Datastore: hand-off p50", []string{"**not met** in 1 of 2 configurations", "up to 2× its bound (10 s holds, 8 waiting)", "at 26 polls/s the mean gap is 38 ms"}},
		{"Datastore: ≤ 2 store calls/s", []string{"**not met**: 13× the goal", "about that of the 200–600 ms holds"}},
		{"redislock uncontended", []string{"**not met**: 2.5× bsm/redislock's, 45 µs more per cycle", "both send 2 commands per cycle"}},
	}
	for _, tc := range tests {
		var verdict string
		for goal, vv := range v {
			if strings.HasPrefix(goal, tc.goal) {
				verdict = vv
			}
		}
		if verdict == "" {
			t.Errorf("no verdict for %q in %v", tc.goal, v)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(verdict, w) {
				t.Errorf("verdict for %q = %q; want it to contain %q", tc.goal, verdict, w)
			}
		}
	}
}

// TestPeerGoalsMet: numbers within every goal give "met" verdicts.
func TestPeerGoalsMet(t *testing.T) {
	in := `BenchmarkPeerHandoff/redislock/hold=10s/waiters=2-2  1  100 ns/op  2 aux/s  1000000 p50-ns  0.2 polls/s  0.05 waits/s  20000000000 wait-ns  3 samples
BenchmarkPeerHandoff/dslock/hold=10s/waiters=8-2  1  100 ns/op  0.5 xbound-p50  40000000 p50-ns  1.5 polls/s  1.2 poll60/s  2 waits60  6 samples
BenchmarkPeerUncontended/redis-2  1  100 ns/op  30000 bsm-p50-ns  29000 redislock-p50-ns
`
	v := peerVerdicts(t, in)
	n := 0
	for goal, verdict := range v {
		if goal == "goal" || strings.HasPrefix(goal, "---") {
			continue
		}
		n++
		if !strings.HasPrefix(verdict, "**met**") {
			t.Errorf("%s: %q; want met", goal, verdict)
		}
	}
	if n != 4 {
		t.Errorf("%d goals judged; want 4", n)
	}
}

func TestPeerReportAbsent(t *testing.T) {
	r, err := parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	if got := peerReport(r); got != "" {
		t.Errorf("peerReport without peer results = %q; want empty", got)
	}
}
