package cloudlog

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"testing"
)

func TestRecordShape(t *testing.T) {
	cases := []struct {
		name    string
		headers map[string]string
		level   slog.Level
		want    map[string]any
		absent  []string
	}{
		{
			name:    "traceparent",
			headers: map[string]string{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
			level:   slog.LevelError,
			want: map[string]any{
				"severity": "ERROR", "message": "boom", "lock_id": "user-42",
				TraceKey: "projects/p1/traces/4bf92f3577b34da6a3ce929d0e0e4736", SpanKey: "00f067aa0ba902b7", SampledKey: true,
			},
			absent: []string{"level", "msg"},
		},
		{
			name:    "X-Cloud-Trace-Context",
			headers: map[string]string{"X-Cloud-Trace-Context": "105445AA7843BC8BF206B12000100000/1;o=1"},
			level:   slog.LevelWarn,
			want: map[string]any{
				"severity": "WARNING",
				TraceKey:   "projects/p1/traces/105445aa7843bc8bf206b12000100000", SpanKey: "0000000000000001", SampledKey: true,
			},
		},
		{
			name:    "malformed trace is left out",
			headers: map[string]string{"traceparent": "nonsense", "X-Cloud-Trace-Context": "xyz"},
			level:   slog.LevelInfo,
			want:    map[string]any{"severity": "INFO"},
			absent:  []string{TraceKey, SpanKey},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			log := slog.New(NewHandler(&buf, slog.LevelDebug, "p1"))
			r := httptest.NewRequest("POST", "/Worker", nil)
			for k, v := range tc.headers {
				r.Header.Set(k, v)
			}
			ctx := WithTrace(t.Context(), r)
			log.With("lock_id", "user-42").Log(ctx, tc.level, "boom")
			var got map[string]any
			if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
				t.Fatalf("not one JSON object: %v: %s", err, buf.String())
			}
			for k, v := range tc.want {
				if got[k] != v {
					t.Errorf("%s = %v; want %v (record %s)", k, got[k], v, buf.String())
				}
			}
			for _, k := range tc.absent {
				if _, ok := got[k]; ok {
					t.Errorf("record has %q; want it absent: %s", k, buf.String())
				}
			}
		})
	}
}

func TestSeverities(t *testing.T) {
	for l, want := range map[slog.Level]string{
		slog.LevelDebug: "DEBUG", slog.LevelInfo: "INFO", slog.LevelInfo + 2: "NOTICE",
		slog.LevelWarn: "WARNING", slog.LevelError: "ERROR", slog.LevelError + 4: "CRITICAL",
	} {
		if got := severity(l); got != want {
			t.Errorf("severity(%v) = %s; want %s", l, got, want)
		}
	}
}
