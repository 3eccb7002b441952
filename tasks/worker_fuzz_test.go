package tasks_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
)

// FuzzWorker serves arbitrary requests (method, body, Cloud Tasks headers)
// to a Worker whose jobs succeed, fail, fail permanently, panic, or nest a
// busy lock. The Worker never panics, answers only the documented statuses,
// and leaves no lock held.
func FuzzWorker(f *testing.F) {
	f.Add("POST", []byte(`{"v":1,"job":"ok","lockId":"a"}`), "t1", "jobs", "0", "1700000000.5")
	f.Add("POST", []byte(`{"v":1,"job":"fail","lockId":"a","payload":{"x":1}}`), "t1", "jobs", "3", "")
	f.Add("POST", []byte(`{"v":1,"job":"perm","lockId":"a","data":"AAE="}`), "t", "jobs", "-1", "x")
	f.Add("POST", []byte(`{"v":1,"job":"panic","lockId":"\u0000"}`), "t", "jobs", "99999999999999999999", "-5.-5")
	f.Add("POST", []byte(`{"v":1,"job":"nested","lockId":"busy"}`), "t", "jobs", "", "1.")
	f.Add("POST", []byte(`{"v":1,"job":"ok","lockId":"busy"}`), "t", "jobs", "0", "0")
	f.Add("POST", []byte(`{"v":2,"job":"ok","lockId":"a"}`), "t", "jobs", "0", "")
	f.Add("POST", []byte(`{"v":1,"job":"nope","lockId":"a"}`), "t", "jobs", "0", "")
	f.Add("POST", bytes.Repeat([]byte("x"), 5000), "t", "jobs", "0", "")
	f.Add("GET", []byte(``), "t", "jobs", "0", "")
	f.Add("POST", []byte(`{"v":1,"job":"ok","lockId":"a"}`), "", "", "0", "")
	f.Add("POST", []byte(`{"v":1,"job":"ok","lockId":"a"}`), "t", "other", "0", "")
	f.Add("PUT", []byte("\xff\xfe"), "\r", "jobs", "1e9", "9223372036854775807.999999999")
	f.Fuzz(func(t *testing.T, method string, body []byte, taskName, queue, retry, eta string) {
		b := memlock.New()
		locker, err := locking.New(locking.Config{Strong: b, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		// "busy" is held for the whole request by someone else.
		held, err := locker.Acquire(context.Background(), "busy", locking.Lease(time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		w, err := tasks.NewWorker(locker, tasks.WithLogger(slog.New(slog.DiscardHandler)), tasks.WithQueue("jobs"), tasks.WithMaxBodyBytes(4096))
		if err != nil {
			t.Fatal(err)
		}
		w.Handle("ok", func(ctx context.Context, d *tasks.Delivery) error { return nil })
		w.Handle("fail", func(ctx context.Context, d *tasks.Delivery) error { return errors.New("failed") })
		w.Handle("perm", func(ctx context.Context, d *tasks.Delivery) error { return tasks.Permanent(errors.New("never")) })
		w.Handle("panic", func(ctx context.Context, d *tasks.Delivery) error { panic("job panicked") })
		w.Handle("nested", func(ctx context.Context, d *tasks.Delivery) error {
			return locker.With(ctx, "busy", func(context.Context) error { return nil }, locking.Wait(false))
		})

		if !validMethod(method) {
			method = http.MethodPost
		}
		r := httptest.NewRequest(method, "/Worker", bytes.NewReader(body))
		for k, v := range map[string]string{
			"X-CloudTasks-TaskName": taskName, "X-CloudTasks-QueueName": queue,
			"X-CloudTasks-TaskRetryCount": retry, "X-CloudTasks-TaskExecutionCount": retry,
			"X-CloudTasks-TaskETA": eta, "X-CloudTasks-TaskPreviousResponse": retry,
		} {
			r.Header[k] = []string{v} // raw, even if not a valid header value
		}
		rec := httptest.NewRecorder()
		w.ServeHTTP(rec, r)
		switch rec.Code {
		case tasks.StatusDone, tasks.StatusDropped, tasks.StatusBusy, tasks.StatusFailed, tasks.StatusRetry, tasks.StatusRejected:
		default:
			t.Errorf("status %d is not one the Worker documents", rec.Code)
		}
		if rec.Code == tasks.StatusBusy && rec.Header().Get("Retry-After") == "" {
			t.Error("429 without Retry-After")
		}
		if err := held.Release(context.Background()); err != nil {
			t.Errorf("the other holder's lock was disturbed: %v", err)
		}
		if n := b.Held(); n != 0 {
			t.Errorf("%d locks left held after the request", n)
		}
	})
}

// validMethod reports whether m is an HTTP token httptest accepts.
func validMethod(m string) bool {
	if m == "" {
		return false
	}
	for i := 0; i < len(m); i++ {
		c := m[i]
		if c <= ' ' || c >= 0x7f || bytes.IndexByte([]byte(`()<>@,;:\"/[]?={}`), c) >= 0 {
			return false
		}
	}
	return true
}
