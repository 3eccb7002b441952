package fence_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/lockhttp"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

var emulators *dstest.Set

func TestMain(m *testing.M) {
	if os.Getenv(holderEnv) != "" {
		os.Exit(holder())
	}
	emulators = dstest.StartSet(dstest.Firestore)
	code := m.Run()
	emulators.Close()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func TestAdmit(t *testing.T) {
	ours := func(h uint64) fence.State { return fence.State{Format: fence.Format, LockID: "a", Highest: h} }
	tok := func(v uint64) fence.Token { return fence.Token{LockID: "a", Value: v} }
	for _, tc := range []struct {
		name        string
		st          fence.State
		lockID      string
		tok         fence.Token
		wantErr     error
		wantChanged bool
		wantHighest uint64
	}{
		{name: "first token", tok: tok(5), lockID: "a", wantChanged: true, wantHighest: 5},
		{name: "higher token", st: ours(5), tok: tok(9), lockID: "a", wantChanged: true, wantHighest: 9},
		{name: "equal token", st: ours(5), tok: tok(5), lockID: "a", wantHighest: 5},
		{name: "lower token", st: ours(5), tok: tok(4), lockID: "a", wantErr: fence.ErrStale, wantHighest: 5},
		{name: "zero token", st: ours(5), tok: fence.Token{}, lockID: "a", wantErr: fence.ErrInvalid, wantHighest: 5},
		{name: "zero value", st: ours(5), tok: tok(0), lockID: "a", wantErr: fence.ErrInvalid, wantHighest: 5},
		{name: "no lock id", tok: fence.Token{Value: 3}, lockID: "a", wantErr: fence.ErrInvalid},
		{name: "above MaxToken", tok: tok(fence.MaxToken + 1), lockID: "a", wantErr: fence.ErrInvalid},
		{name: "empty fence id", tok: tok(3), lockID: "", wantErr: fence.ErrInvalid},
		{name: "token of another lock", st: ours(5), tok: fence.Token{LockID: "b", Value: 50}, lockID: "a", wantErr: fence.ErrWrongLock, wantHighest: 5},
		{name: "record of another lock", st: fence.State{Format: fence.Format, LockID: "b", Highest: 2}, tok: tok(50), lockID: "a", wantErr: fence.ErrWrongLock, wantHighest: 2},
		{name: "no format marker", st: fence.State{LockID: "a", Highest: 2}, tok: tok(50), lockID: "a", wantErr: fence.ErrForeign, wantHighest: 2},
		{name: "other format marker", st: fence.State{Format: "other/1", LockID: "a", Highest: 2}, tok: tok(50), lockID: "a", wantErr: fence.ErrForeign, wantHighest: 2},
		{name: "marker without token", st: fence.State{Format: fence.Format, LockID: "a"}, tok: tok(50), lockID: "a", wantErr: fence.ErrForeign},
	} {
		t.Run(tc.name, func(t *testing.T) {
			next, changed, err := tc.st.Admit(tc.lockID, tc.tok)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("Admit = %v, want %v", err, tc.wantErr)
			}
			if changed != tc.wantChanged || next.Highest != tc.wantHighest {
				t.Fatalf("Admit = (%+v, %v), want highest %d, changed %v", next, changed, tc.wantHighest, tc.wantChanged)
			}
			if err != nil && next != tc.st {
				t.Fatalf("Admit changed the state on error: %+v, was %+v", next, tc.st)
			}
			if changed && (next.Format != fence.Format || next.LockID != tc.lockID) {
				t.Fatalf("Admit = %+v: not marked as ours for %q", next, tc.lockID)
			}
		})
	}
}

func TestStaleErrorMatchesLockLost(t *testing.T) {
	_, _, err := fence.State{Format: fence.Format, LockID: "a", Highest: 7}.Admit("a", fence.Token{LockID: "a", Value: 3})
	var se *fence.StaleError
	if !errors.As(err, &se) || se.Token != 3 || se.Highest != 7 || se.LockID != "a" {
		t.Fatalf("err = %#v, want a *StaleError{a, 3, 7}", err)
	}
	if !errors.Is(err, locking.ErrLockLost) || !errors.Is(err, fence.ErrStale) {
		t.Fatalf("err = %v: want it to match ErrStale and locking.ErrLockLost", err)
	}
}

func TestTokenSources(t *testing.T) {
	c, err := locking.New(locking.Config{Strong: memlock.New()})
	if err != nil {
		t.Fatal(err)
	}
	if tok := fence.FromContext(t.Context()); tok.Validate() == nil {
		t.Fatalf("FromContext outside With = %+v, want an invalid token", tok)
	}
	if tok := fence.Of(nil); !errors.Is(tok.Validate(), fence.ErrInvalid) {
		t.Fatalf("Of(nil) = %+v, want an invalid token", tok)
	}
	err = c.With(t.Context(), "order-1", func(ctx context.Context) error {
		l := locking.FromContext(ctx)
		tok := fence.FromContext(ctx)
		if tok != (fence.Token{LockID: "order-1", Value: l.Token()}) || tok != fence.Of(l) {
			t.Errorf("FromContext = %+v, Of = %+v; want order-1's token %d", tok, fence.Of(l), l.Token())
		}
		return tok.Validate()
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestTokenWhereTheJobWrites: fence.FromContext gives the held lock's token
// inside a tasks.Worker job and a lockhttp.Guard handler, equal to the
// Delivery's own.
func TestTokenWhereTheJobWrites(t *testing.T) {
	c, err := locking.New(locking.Config{Strong: memlock.New(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Run("tasks.Worker", func(t *testing.T) {
		w, err := tasks.NewWorker(c, tasks.WithLogger(slog.New(slog.DiscardHandler)))
		if err != nil {
			t.Fatal(err)
		}
		var got, want fence.Token
		w.Handle("write", func(ctx context.Context, d *tasks.Delivery) error {
			got, want = fence.FromContext(ctx), fence.Token{LockID: d.LockID, Value: d.Token}
			if fence.Of(d.Lock) != want {
				t.Errorf("fence.Of(d.Lock) = %+v, want %+v", fence.Of(d.Lock), want)
			}
			return nil
		})
		req, err := taskstest.NewRequest(tasks.Task{Job: "write", LockID: "order-9"})
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		w.ServeHTTP(rec, req)
		if rec.Code != tasks.StatusDone || got != want || got.Validate() != nil || got.LockID != "order-9" {
			t.Fatalf("delivery answered %d; the job's token %+v, the delivery's %+v", rec.Code, got, want)
		}
	})
	t.Run("lockhttp.Guard", func(t *testing.T) {
		var got fence.Token
		h := lockhttp.GuardFunc(c, lockhttp.Query("order", "order-"), func(w http.ResponseWriter, r *http.Request) {
			got = fence.FromContext(r.Context())
		})
		rec := httptest.NewRecorder()
		h(rec, httptest.NewRequest(http.MethodPost, "/?order=10", nil))
		if rec.Code != http.StatusOK || got.LockID != "order-10" || got.Validate() != nil {
			t.Fatalf("answered %d; the handler's token %+v, want a valid token of order-10", rec.Code, got)
		}
	})
}
