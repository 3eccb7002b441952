package lockhttp_test

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/textproto"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockhttp"
	"github.com/taskguard/taskguard/locking/memlock"
)

// TestWriteAfterTheDeclaredBody: a write past a declared Content-Length is
// refused with http.ErrContentLength, as the server refuses it, and the
// body the client gets is the one declared. The withheld last byte must
// not leave room on the wire for the excess.
func TestWriteAfterTheDeclaredBody(t *testing.T) {
	for _, tc := range []struct {
		name  string
		extra string
	}{{"one byte more", "\n"}, {"two bytes more", "!!"}} {
		t.Run(tc.name, func(t *testing.T) {
			var extraErr error
			h := func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", "5")
				_, _ = io.WriteString(w, "hello")
				_, extraErr = io.WriteString(w, tc.extra)
			}
			for _, guarded := range []bool{false, true} {
				var handler http.Handler = http.HandlerFunc(h)
				if guarded {
					handler = lockhttp.Guard(newClient(t, memlock.New()), lockhttp.Query("id", ""), handler, quiet)
				}
				srv := httptest.NewServer(handler)
				a := get(t, srv.URL+"/?id=x")
				srv.Close()
				if a.status != http.StatusOK || a.body != "hello" || !errors.Is(extraErr, http.ErrContentLength) {
					t.Errorf("guarded=%v: answer %d %q, the extra write's error %v; want 200 %q and http.ErrContentLength",
						guarded, a.status, a.body, extraErr, "hello")
				}
			}
		})
	}
}

// TestEarlyHintsThenLockLost: a 103 Early Hints is not the response: a
// lock lost after it, before the handler answered, is answered 503 as a
// lock lost before any response is.
func TestEarlyHintsThenLockLost(t *testing.T) {
	c := newClient(t, failingRenewals{memlock.New()})
	h := lockhttp.Guard(c, lockhttp.Query("id", ""), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Link", "</style.css>; rel=preload; as=style")
		w.WriteHeader(http.StatusEarlyHints)
		<-r.Context().Done() // the lock is lost: give up without answering
	}), quiet, lockhttp.LockOptions(locking.Lease(300*time.Millisecond)))
	srv := httptest.NewServer(h)
	defer srv.Close()
	if a := get(t, srv.URL+"/?id=x"); a.status != http.StatusServiceUnavailable {
		t.Errorf("lock lost after a 103 = %+v; want 503", a)
	}
}

// TestEarlyHintsAndDeclaredBody: a 103 before a declared body reaches the
// client at once, and the body whole after the release.
func TestEarlyHintsAndDeclaredBody(t *testing.T) {
	store := memlock.New()
	other := newClient(t, store)
	h := lockhttp.Guard(newClient(t, slowRelease{store}), lockhttp.Query("id", ""), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Link", "</style.css>; rel=preload; as=style")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Set("Content-Length", "5")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "hello")
		w.(http.Flusher).Flush()
	}), quiet)
	srv := httptest.NewServer(h)
	defer srv.Close()
	hints := 0
	req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(t.Context(), &httptrace.ClientTrace{
		Got1xxResponse: func(code int, _ textproto.MIMEHeader) error { hints++; return nil },
	}), http.MethodGet, srv.URL+"/?id=e", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if l, err := other.Acquire(t.Context(), "e", locking.Wait(false)); err != nil {
		t.Errorf("the client had the whole response while the lock was still held: %v", err)
	} else {
		_ = l.Release(t.Context())
	}
	if hints != 1 || resp.StatusCode != http.StatusOK || string(body) != "hello" {
		t.Errorf("%d hints, answer %d %q; want 1 hint, 200 %q", hints, resp.StatusCode, body, "hello")
	}
}

// TestResponseEndsAfterTheReleaseHTTP2: the shapes of
// TestResponseEndsAfterTheRelease over HTTP/2, and a HEAD request.
func TestResponseEndsAfterTheReleaseHTTP2(t *testing.T) {
	for _, tc := range []struct {
		name    string
		method  string
		handler func(w http.ResponseWriter, r *http.Request)
		status  int
		body    string
	}{
		{"content-length, flushed", http.MethodGet, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "6")
			_, _ = io.WriteString(w, "abcdef")
			w.(http.Flusher).Flush()
		}, http.StatusOK, "abcdef"},
		{"204, flushed", http.MethodGet, func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusNoContent)
			w.(http.Flusher).Flush()
		}, http.StatusNoContent, ""},
		{"HEAD, flushed", http.MethodHead, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "6")
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
		}, http.StatusOK, ""},
		{"HEAD with a body written, flushed", http.MethodHead, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "6")
			_, _ = io.WriteString(w, "abcdef")
			_ = http.NewResponseController(w).Flush()
		}, http.StatusOK, ""},
	} {
		for _, h2 := range []bool{false, true} {
			t.Run(tc.name+"/h2="+strconv.FormatBool(h2), func(t *testing.T) {
				store := memlock.New()
				other := newClient(t, store)
				srv := httptest.NewUnstartedServer(lockhttp.Guard(newClient(t, slowRelease{store}), lockhttp.Query("id", ""), http.HandlerFunc(tc.handler), quiet))
				srv.EnableHTTP2 = h2
				srv.StartTLS()
				defer srv.Close()
				client := srv.Client()
				req, _ := http.NewRequest(tc.method, srv.URL+"/?id=h", nil)
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if l, err := other.Acquire(t.Context(), "h", locking.Wait(false)); err != nil {
					t.Errorf("the client had the whole response while the lock was still held: %v", err)
				} else {
					_ = l.Release(t.Context())
				}
				if want := 1 + btoi(h2); resp.ProtoMajor != want {
					t.Errorf("protocol %s; want HTTP/%d", resp.Proto, want)
				}
				if resp.StatusCode != tc.status || string(body) != tc.body {
					t.Errorf("answer %d %q; want %d %q", resp.StatusCode, body, tc.status, tc.body)
				}
			})
		}
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestHijackThroughGuard: a handler that hijacks the connection answers on
// it as it likes; the guard adds nothing after the release.
func TestHijackThroughGuard(t *testing.T) {
	srv := httptest.NewServer(lockhttp.Guard(newClient(t, memlock.New()), lockhttp.Query("id", ""), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		_, _ = brw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
		_ = brw.Flush()
	}), quiet))
	defer srv.Close()
	if a := get(t, srv.URL+"/?id=j"); a.status != http.StatusOK || a.body != "ok" {
		t.Errorf("hijacked answer = %+v; want 200 ok", a)
	}
}

// TestServeContentThroughGuard: http.ServeContent (a declared length, a
// range, HEAD, a conditional GET answered 304) through the guard answers as
// without it.
func TestServeContentThroughGuard(t *testing.T) {
	content := strings.Repeat("0123456789", 10000)
	mod := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	h := func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "data.txt", mod, strings.NewReader(content))
	}
	srv := httptest.NewServer(lockhttp.Guard(newClient(t, memlock.New()), lockhttp.Query("id", ""), http.HandlerFunc(h), quiet))
	defer srv.Close()
	for _, tc := range []struct {
		name, method, header, value string
		status                      int
		body                        string
	}{
		{"whole", http.MethodGet, "", "", http.StatusOK, content},
		{"range", http.MethodGet, "Range", "bytes=5-14", http.StatusPartialContent, content[5:15]},
		{"last byte", http.MethodGet, "Range", "bytes=-1", http.StatusPartialContent, content[len(content)-1:]},
		{"HEAD", http.MethodHead, "", "", http.StatusOK, ""},
		{"not modified", http.MethodGet, "If-Modified-Since", mod.Format(http.TimeFormat), http.StatusNotModified, ""},
	} {
		req, _ := http.NewRequest(tc.method, srv.URL+"/?id=c", nil)
		if tc.header != "" {
			req.Header.Set(tc.header, tc.value)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != tc.status || string(body) != tc.body {
			t.Errorf("%s: answer %d with %d bytes (%v); want %d with %d bytes", tc.name, resp.StatusCode, len(body), err, tc.status, len(tc.body))
		}
	}
}
