// Package reqbody reads untrusted request bodies bounded in size and in
// time: a client that sends its headers and part of a body, then stalls,
// holds the handler only until the request's context ends.
package reqbody

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"
)

// ReadAll reads r's body, at most limit bytes. A longer body fails with an
// error wrapping *http.MaxBytesError (and the connection is closed after the
// answer, as http.MaxBytesReader does). When r's context ends during the
// read, the read stops at once and ReadAll returns an error wrapping the
// context's cause (context.DeadlineExceeded or context.Canceled): it sets
// the connection's read deadline to the past through
// http.ResponseController, or, where w cannot (a test's recorder), closes
// the body.
func ReadAll(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	ctx := r.Context()
	body := http.MaxBytesReader(w, r.Body, limit)
	rc := http.NewResponseController(w)
	stop := context.AfterFunc(ctx, func() {
		// Unblock a read waiting for bytes that may never come.
		if rc.SetReadDeadline(time.Unix(1, 0)) != nil {
			_ = body.Close()
		}
	})
	b, err := io.ReadAll(body)
	stop()
	if err != nil && ctx.Err() != nil {
		return b, fmt.Errorf("reading the request body: %w (%w)", context.Cause(ctx), err)
	}
	return b, err
}
