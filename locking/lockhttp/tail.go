package lockhttp

import (
	"io"
	"net/http"
	"strconv"
)

// tail keeps a guarded response from ending before its lock is released.
// On Cloud Run, once a response is complete the instance's CPU may be
// throttled to almost nothing until its next request: a release made after
// that waits with it, and the lock stays held up to a lease. A response
// ends on the wire before its handler returns when the handler declared a
// Content-Length and wrote (and flushed) the whole body, or flushed a
// response without a body (204, 304, HEAD, Content-Length: 0); a chunked
// response ends only after the handler returns. So tail withholds the last
// byte of a declared body, and a flush of a response that has nothing left
// to send, and sends them after the release. It is used by one request's
// goroutine at a time, as a ResponseWriter is.
type tail struct {
	w       http.ResponseWriter // the server's, after the guard's hooks
	head    bool                // a HEAD request: no body
	status  int                 // 0 until the header is written
	length  int64               // declared Content-Length; -1 none
	written int64               // body bytes the handler wrote
	held    []byte              // withheld last byte of a declared body
	flush   bool                // a withheld Flush
}

func newTail(w http.ResponseWriter, r *http.Request) *tail {
	return &tail{w: w, head: r.Method == http.MethodHead, length: -1}
}

// header notes the status and the declared length, when the header is
// written (explicitly, or by the first write or flush).
func (t *tail) header(code int) {
	if t.status != 0 {
		return
	}
	t.status = code
	if n, err := strconv.ParseInt(t.w.Header().Get("Content-Length"), 10, 64); err == nil && n >= 0 {
		t.length = n
	}
}

// complete reports whether the response, as written so far, would be
// complete on the wire once flushed.
func (t *tail) complete() bool {
	s := t.status
	if s == 0 {
		s = http.StatusOK
	}
	switch {
	case t.head, s == http.StatusNoContent, s == http.StatusNotModified, s >= 100 && s < 200:
		return true
	default:
		return t.length >= 0 && t.written >= t.length
	}
}

func (t *tail) writeHeader(next func(int)) func(int) {
	return func(code int) {
		if code >= 200 || code == http.StatusSwitchingProtocols {
			t.header(code)
		}
		next(code)
	}
}

func (t *tail) write(next func([]byte) (int, error)) func([]byte) (int, error) {
	return func(b []byte) (int, error) {
		t.header(http.StatusOK)
		if len(t.held) > 0 && len(b) > 0 {
			// Past the declared body: refused, as the server would.
			return 0, http.ErrContentLength
		}
		if t.length < 0 || len(b) == 0 || t.written+int64(len(b)) != t.length {
			n, err := next(b)
			t.written += int64(n)
			return n, err
		}
		// This write completes the declared body: keep its last byte.
		n, err := next(b[:len(b)-1])
		t.written += int64(n)
		if err != nil {
			return n, err
		}
		t.held = append(t.held[:0], b[len(b)-1])
		t.written++
		return len(b), nil
	}
}

func (t *tail) writeString(next func([]byte) (int, error)) func(string) (int, error) {
	w := t.write(next)
	return func(s string) (int, error) { return w([]byte(s)) }
}

// readFrom copies through write when a body length is declared, so that its
// last byte is withheld; otherwise it keeps the server's own ReadFrom.
func (t *tail) readFrom(next func(io.Reader) (int64, error)) func(io.Reader) (int64, error) {
	write := t.write(t.w.Write)
	return func(src io.Reader) (int64, error) {
		t.header(http.StatusOK)
		if t.length < 0 {
			n, err := next(src)
			t.written += n
			return n, err
		}
		return io.Copy(writerFunc(write), src)
	}
}

func (t *tail) flusher(next func()) func() {
	return func() {
		t.header(http.StatusOK)
		if t.complete() {
			t.flush = true // nothing left to send but the end: after the release
			return
		}
		next()
	}
}

// finish sends what was withheld; the lock is released by then.
func (t *tail) finish() {
	if len(t.held) > 0 {
		_, _ = t.w.Write(t.held)
		t.held = nil
	}
	if t.flush {
		_ = http.NewResponseController(t.w).Flush()
		t.flush = false
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }
