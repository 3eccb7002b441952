// Package cloudlog writes log/slog records as the JSON lines that Cloud
// Logging reads from a Cloud Run function's output: "severity" instead of
// "level", "message" instead of "msg", and the request's trace under
// "logging.googleapis.com/trace" so that log lines group under their request.
// It is usable in any Cloud Run service or function:
//
//	log := slog.New(cloudlog.NewHandler(os.Stdout, slog.LevelInfo, os.Getenv("GOOGLE_CLOUD_PROJECT")))
//	http.Handle("/", cloudlog.Middleware(h)) // h logs with log.InfoContext(r.Context(), ...)
//
// It sets no global logger: the program decides whether to pass it to
// slog.SetDefault.
package cloudlog

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"strings"
)

// Keys Cloud Logging gives a meaning to.
const (
	TraceKey   = "logging.googleapis.com/trace"
	SpanKey    = "logging.googleapis.com/spanId"
	SampledKey = "logging.googleapis.com/trace_sampled"
)

// NewHandler returns a JSON handler writing to w at level and above, with
// the trace of the request carried by each record's context (see
// WithTrace) attached. projectID forms the trace's resource name; without
// it the trace is left out.
func NewHandler(w io.Writer, level slog.Leveler, projectID string) slog.Handler {
	return &handler{
		Handler: slog.NewJSONHandler(w, &slog.HandlerOptions{
			Level:       level,
			ReplaceAttr: replace,
		}),
		project: projectID,
	}
}

func replace(groups []string, a slog.Attr) slog.Attr {
	if len(groups) > 0 {
		return a
	}
	switch a.Key {
	case slog.LevelKey:
		return slog.String("severity", severity(a.Value.Any().(slog.Level)))
	case slog.MessageKey:
		a.Key = "message"
	case slog.TimeKey:
		a.Key = "time"
	}
	return a
}

// severity maps slog levels onto Cloud Logging's severities.
func severity(l slog.Level) string {
	switch {
	case l >= slog.LevelError+4:
		return "CRITICAL"
	case l >= slog.LevelError:
		return "ERROR"
	case l >= slog.LevelWarn:
		return "WARNING"
	case l >= slog.LevelInfo+2:
		return "NOTICE"
	case l >= slog.LevelInfo:
		return "INFO"
	}
	return "DEBUG"
}

type handler struct {
	slog.Handler
	project string
}

func (h *handler) Handle(ctx context.Context, r slog.Record) error {
	if t, ok := ctx.Value(traceKey{}).(trace); ok && h.project != "" {
		r.AddAttrs(slog.String(TraceKey, fmt.Sprintf("projects/%s/traces/%s", h.project, t.id)))
		if t.span != "" {
			r.AddAttrs(slog.String(SpanKey, t.span))
		}
		r.AddAttrs(slog.Bool(SampledKey, t.sampled))
	}
	return h.Handler.Handle(ctx, r)
}

func (h *handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &handler{Handler: h.Handler.WithAttrs(attrs), project: h.project}
}

func (h *handler) WithGroup(name string) slog.Handler {
	return &handler{Handler: h.Handler.WithGroup(name), project: h.project}
}

type traceKey struct{}

type trace struct {
	id, span string
	sampled  bool
}

var (
	// traceparent: version-traceid-parentid-flags (W3C Trace Context).
	traceparentRE = regexp.MustCompile(`^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$`)
	// X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=OPTIONS (span id decimal).
	cloudTraceRE = regexp.MustCompile(`^([0-9a-fA-F]{32})(?:/([0-9]+))?(?:;o=([0-9]+))?$`)
)

// WithTrace returns ctx carrying the trace of r, from its traceparent header
// or else its X-Cloud-Trace-Context header; ctx unchanged when it has
// neither, or a malformed one.
func WithTrace(ctx context.Context, r *http.Request) context.Context {
	if m := traceparentRE.FindStringSubmatch(strings.TrimSpace(r.Header.Get("traceparent"))); m != nil {
		if m[1] == strings.Repeat("0", 32) {
			return ctx
		}
		return context.WithValue(ctx, traceKey{}, trace{id: m[1], span: m[2], sampled: m[3] == "01"})
	}
	if m := cloudTraceRE.FindStringSubmatch(strings.TrimSpace(r.Header.Get("X-Cloud-Trace-Context"))); m != nil {
		span := ""
		if m[2] != "" {
			var n uint64
			if _, err := fmt.Sscan(m[2], &n); err == nil {
				span = fmt.Sprintf("%016x", n)
			}
		}
		return context.WithValue(ctx, traceKey{}, trace{id: strings.ToLower(m[1]), span: span, sampled: m[3] == "1"})
	}
	return ctx
}

// Middleware puts the trace of each request into its context (WithTrace).
func Middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(w, r.WithContext(WithTrace(r.Context(), r)))
	})
}
