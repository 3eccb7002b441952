package reqbody

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestReadAllWithoutResponseController stalls a body behind a writer that
// cannot set read deadlines (a recorder): the read still ends with the
// request's context, by closing the body.
func TestReadAllWithoutResponseController(t *testing.T) {
	pr, pw := io.Pipe()
	defer pw.Close()
	go func() { _, _ = pw.Write([]byte(`{"partial":`)) }()
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	r := httptest.NewRequest(http.MethodPost, "/", pr).WithContext(ctx)
	_, err := ReadAll(httptest.NewRecorder(), r, 1<<20)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ReadAll of a stalled body = %v; want context.DeadlineExceeded", err)
	}
}

func TestReadAllLimits(t *testing.T) {
	r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(strings.Repeat("x", 11)))
	var tooBig *http.MaxBytesError
	if _, err := ReadAll(httptest.NewRecorder(), r, 10); !errors.As(err, &tooBig) {
		t.Errorf("ReadAll of 11 bytes, limit 10 = %v; want *http.MaxBytesError", err)
	}
	r = httptest.NewRequest(http.MethodPost, "/", strings.NewReader("0123456789"))
	if b, err := ReadAll(httptest.NewRecorder(), r, 10); err != nil || string(b) != "0123456789" {
		t.Errorf("ReadAll of 10 bytes, limit 10 = %q, %v", b, err)
	}
}
