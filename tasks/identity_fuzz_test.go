package tasks

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// FuzzIdentityRoundTrip follows a job name and a lock id from Enqueue to the
// job: Enqueue either refuses them (ErrInvalidTask, quoting a name that is
// not valid UTF-8) or builds a task body that a Worker delivers to the job
// registered under exactly that name, holding the lock of exactly that id,
// byte for byte.
func FuzzIdentityRoundTrip(f *testing.F) {
	for _, s := range [][2]string{
		{"j", "user-42"}, {"j", "user-\xff42"}, {"resize-\xe9", "l"}, {"j", "\xff"}, {"j", "\xfe"},
		{"j", "\uFFFD"}, {"j", "\u2028<>&"}, {"j", "\x00"}, {"\U0001F600", `\ud800`}, {"j", "\xed\xa0\x80"},
	} {
		f.Add(s[0], s[1])
	}
	c := &Client{
		cfg:      Config{Queue: "projects/p/locations/l/queues/jobs", WorkerURL: "https://worker.example/", ServiceAccount: "w@p.iam.gserviceaccount.com"},
		deadline: DefaultDispatchDeadline,
		now:      time.Now,
	}
	f.Fuzz(func(t *testing.T, job, lockID string) {
		req, err := c.request(Task{Job: job, LockID: lockID})
		if job == "" || lockID == "" || len(job) > maxJobLength {
			if !errors.Is(err, ErrInvalidTask) {
				t.Fatalf("Enqueue(%q, %q) = %v; want ErrInvalidTask", job, lockID, err)
			}
			return
		}
		for _, id := range []string{job, lockID} {
			if !utf8.ValidString(id) {
				if !errors.Is(err, ErrInvalidTask) || !strings.Contains(err.Error(), strconv.Quote(id)) {
					t.Fatalf("Enqueue(%q, %q) = %v; want ErrInvalidTask quoting %q", job, lockID, err, id)
				}
				return
			}
		}
		if err != nil {
			t.Fatalf("Enqueue(%q, %q) refused: %v", job, lockID, err)
		}

		b := memlock.New()
		locker, err := locking.New(locking.Config{Strong: b, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		w, err := NewWorker(locker, WithLogger(slog.New(slog.DiscardHandler)))
		if err != nil {
			t.Fatal(err)
		}
		var got *Delivery
		var heldErr error
		w.Handle(job, func(ctx context.Context, d *Delivery) error {
			got = d
			// The held lock is lockID's: another owner (a context that does
			// not carry the job's lock; locks are not re-entrant) cannot take it.
			_, heldErr = locker.Acquire(context.Background(), lockID, locking.Wait(false))
			return nil
		})
		r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(string(req.GetTask().GetHttpRequest().GetBody())))
		r.Header.Set(headerTaskName, "t1")
		r.Header.Set(headerQueueName, "jobs")
		rec := httptest.NewRecorder()
		w.ServeHTTP(rec, r)
		if rec.Code != StatusDone || got == nil {
			t.Fatalf("delivery of (%q, %q): status %d, job ran %v; want %d and the job run", job, lockID, rec.Code, got != nil, StatusDone)
		}
		if got.Job != job || got.LockID != lockID || got.Lock.ID() != lockID {
			t.Fatalf("delivered job %q lock id %q (lock %q); enqueued %q, %q", got.Job, got.LockID, got.Lock.ID(), job, lockID)
		}
		var busy *locking.NotAcquiredError
		if !errors.As(heldErr, &busy) {
			t.Fatalf("lock %q taken by another owner while the job ran: %v", lockID, heldErr)
		}
		if n := b.Held(); n != 0 {
			t.Fatalf("%d locks left held", n)
		}
	})
}
