package lockhttp_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockhttp"
	"github.com/taskguard/taskguard/locking/memlock"
)

// slowRelease is a lock store whose releases take 300 ms, as a round trip
// to a distant store may.
type slowRelease struct{ locking.Backend }

func (b slowRelease) Unwrap() locking.Backend { return b.Backend }

func (b slowRelease) Release(ctx context.Context, id, owner string) error {
	time.Sleep(300 * time.Millisecond)
	return b.Backend.Release(ctx, id, owner)
}

// TestResponseEndsAfterTheRelease: on Cloud Run an instance's CPU may be
// throttled once its response is complete, so a guarded response must not
// be complete before its lock is released. Responses that end on the wire
// before their handler returns — a declared Content-Length written whole
// and flushed, in one write, in several, through io.Copy, and a flushed 204
// or empty body — reach the client only after the release: the moment the
// client has read the whole response, another instance can take the lock.
// Without this the client had the response 300 ms (the slowed release)
// before the lock was free.
func TestResponseEndsAfterTheRelease(t *testing.T) {
	body := bytes.Repeat([]byte("x"), 64<<10)
	declare := func(w http.ResponseWriter, n int) { w.Header().Set("Content-Length", strconv.Itoa(n)) }
	for _, tc := range []struct {
		name    string
		handler func(w http.ResponseWriter, r *http.Request)
		status  int
		body    []byte
	}{
		{"content-length, one write, flushed", func(w http.ResponseWriter, r *http.Request) {
			declare(w, len(body))
			_, _ = w.Write(body)
			_ = http.NewResponseController(w).Flush()
		}, http.StatusOK, body},
		{"content-length, small writes, flushed", func(w http.ResponseWriter, r *http.Request) {
			declare(w, 6)
			_, _ = io.WriteString(w, "abc")
			_, _ = w.Write([]byte("def"))
			w.(http.Flusher).Flush()
		}, http.StatusOK, []byte("abcdef")},
		{"content-length, io.Copy", func(w http.ResponseWriter, r *http.Request) {
			declare(w, len(body))
			_, _ = io.Copy(w, bytes.NewReader(body))
			w.(http.Flusher).Flush()
		}, http.StatusOK, body},
		{"204, flushed", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusNoContent)
			w.(http.Flusher).Flush()
		}, http.StatusNoContent, nil},
		{"content-length 0, flushed", func(w http.ResponseWriter, r *http.Request) {
			declare(w, 0)
			w.WriteHeader(http.StatusAccepted)
			w.(http.Flusher).Flush()
		}, http.StatusAccepted, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := memlock.New()
			guarded := newClient(t, slowRelease{store})
			other := newClient(t, store)
			srv := httptest.NewServer(lockhttp.Guard(guarded, lockhttp.Query("id", ""), http.HandlerFunc(tc.handler), quiet))
			defer srv.Close()
			resp, err := http.Get(srv.URL + "/?id=t")
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			// The whole response is here: the lock must be free now.
			l, lerr := other.Acquire(t.Context(), "t", locking.Wait(false))
			if lerr != nil {
				t.Errorf("the client had the whole response while the lock was still held: %v", lerr)
			} else {
				_ = l.Release(t.Context())
			}
			if resp.StatusCode != tc.status || !bytes.Equal(got, tc.body) {
				t.Errorf("answer %d with %d bytes %.10q…; want %d with %d bytes", resp.StatusCode, len(got), got, tc.status, len(tc.body))
			}
		})
	}
}

// TestStreamedResponseStillStreams: a handler that streams (no declared
// length) is flushed as it goes; only a response's end waits for the
// release.
func TestStreamedResponseStillStreams(t *testing.T) {
	next := make(chan struct{})
	srv := httptest.NewServer(lockhttp.Guard(newClient(t, memlock.New()), lockhttp.Query("id", ""), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		<-next
		_, _ = io.WriteString(w, "second\n")
	}), quiet))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/?id=s")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line := make([]byte, len("first\n"))
	if _, err := io.ReadFull(resp.Body, line); err != nil || string(line) != "first\n" {
		t.Fatalf("first streamed line %q, %v", line, err)
	}
	close(next)
	rest, _ := io.ReadAll(resp.Body)
	if !strings.HasPrefix(string(rest), "second") {
		t.Errorf("rest %q; want the second line", rest)
	}
}
