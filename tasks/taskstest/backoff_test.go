package taskstest

import (
	"testing"
	"time"
)

func TestBackoffSchedule(t *testing.T) {
	s := time.Second
	tests := []struct {
		name string
		p    retryPolicy
		want []time.Duration
	}{
		// The example in the RetryConfig documentation.
		{"documented", retryPolicy{minBackoff: 10 * s, maxBackoff: 300 * s, maxDoublings: 3},
			[]time.Duration{10 * s, 20 * s, 40 * s, 80 * s, 160 * s, 240 * s, 300 * s, 300 * s}},
		{"no doublings", retryPolicy{minBackoff: s, maxBackoff: 5 * s, maxDoublings: 0},
			[]time.Duration{s, 2 * s, 3 * s, 4 * s, 5 * s, 5 * s}},
		{"defaults", retryPolicy{minBackoff: 100 * time.Millisecond, maxBackoff: time.Hour, maxDoublings: 16},
			[]time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond}},
		{"capped early", retryPolicy{minBackoff: s, maxBackoff: 3 * s, maxDoublings: 16},
			[]time.Duration{s, 2 * s, 3 * s, 3 * s}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for i, w := range tt.want {
				if got := tt.p.backoff(i + 1); got != w {
					t.Errorf("backoff after %d failures = %v, want %v", i+1, got, w)
				}
			}
		})
	}
}

func TestExhausted(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tests := []struct {
		name     string
		attempts int
		dur      time.Duration
		made     int
		elapsed  time.Duration
		want     bool
	}{
		{"attempts used, no duration", 3, 0, 3, 0, true},
		{"attempts left", 3, 0, 2, time.Hour, false},
		{"attempts used, duration left", 3, time.Minute, 3, time.Second, false},
		{"both used", 3, time.Minute, 3, time.Minute, true},
		{"unlimited attempts, duration used", -1, time.Minute, 50, time.Minute, true},
		{"unlimited attempts, duration left", -1, time.Minute, 50, time.Second, false},
		{"both unlimited", -1, 0, 1 << 20, 1000 * time.Hour, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := retryPolicy{maxAttempts: tt.attempts, maxRetryDuration: tt.dur}
			if got := p.exhausted(tt.made, t0, t0.Add(tt.elapsed)); got != tt.want {
				t.Errorf("exhausted = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := map[string]time.Duration{
		"":                              0,
		"3":                             3 * time.Second,
		"0":                             0,
		"-1":                            0,
		"soon":                          0,
		"Thu, 01 Jan 2026 00:00:05 GMT": 5 * time.Second,
		"Wed, 31 Dec 2025 00:00:05 GMT": 0,
	}
	for in, want := range tests {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", in, got, want)
		}
	}
}
