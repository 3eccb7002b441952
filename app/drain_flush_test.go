package app

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// TestDrainAnswerWrittenBeforeExit: at SIGTERM DrainOnSIGTERM exits the
// process once every request in flight has returned from its function.
// net/http writes a function's answer only after it returned (its status
// line and headers sit in a buffer until then): the exit must not come
// before that write, else the caller gets no answer. Here the task's job
// finished as the SIGTERM came (it answers 204: done), and a moment passes
// between the function's return and net/http's write, as it does on a
// throttled CPU; the process's exit is its connections closing. A lost 204
// is retried by Cloud Tasks: a task that ran runs twice.
func TestDrainAnswerWrittenBeforeExit(t *testing.T) {
	d := newDrainer(5 * time.Second)
	started := make(chan struct{})
	fn := func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-r.Context().Done()
		w.WriteHeader(http.StatusNoContent) // the job's work was done
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d.serve(w, r, fn)
		time.Sleep(200 * time.Millisecond) // between the function's return and net/http's write
	}))
	defer srv.Close()
	type answer struct {
		code int
		err  error
	}
	answers := make(chan answer, 1)
	go func() {
		resp, err := http.Post(srv.URL, "application/json", nil)
		if err != nil {
			answers <- answer{err: err}
			return
		}
		resp.Body.Close()
		answers <- answer{code: resp.StatusCode}
	}()
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("the request did not start")
	}
	stopped, left := d.drain()
	if stopped != 1 || left != 0 {
		t.Errorf("drain stopped %d and left %d, want 1 and 0", stopped, left)
	}
	srv.CloseClientConnections() // the process exits
	got := <-answers
	if got.err != nil || got.code != http.StatusNoContent {
		t.Errorf("the caller got %d, %v after the exit; want the function's answer %d written before it", got.code, got.err, http.StatusNoContent)
	}
}
