package lockhttp_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockhttp"
	"github.com/taskguard/taskguard/locking/memlock"
)

func newClient(t *testing.T, b locking.Backend) *locking.Client {
	t.Helper()
	c, err := locking.New(locking.Config{Strong: b, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var quiet = lockhttp.Logger(slog.New(slog.DiscardHandler))

type answer struct {
	status     int
	retryAfter string
	body       string
}

func get(t *testing.T, url string) answer {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, resp.Header.Get("Retry-After"), string(body)}
}

// TestGuardOneRequestPerID runs requests over real HTTP: while one request
// for customer z runs, another for z is answered 429 with Retry-After (and
// is not run), one for customer y runs, and z runs again once the first is
// done. The handler sees the held lock in its context.
func TestGuardOneRequestPerID(t *testing.T) {
	c := newClient(t, memlock.New())
	entered, leave := make(chan uint64, 1), make(chan struct{})
	var mu sync.Mutex
	runs := map[string]int{}
	h := lockhttp.Guard(c, lockhttp.Query("customer", "checkout/"), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cust := r.URL.Query().Get("customer")
		mu.Lock()
		runs[cust]++
		mu.Unlock()
		if r.URL.Query().Get("block") != "" {
			entered <- locking.FromContext(r.Context()).Token()
			<-leave
		}
		io.WriteString(w, "charged "+cust)
	}), quiet, lockhttp.LockOptions(locking.Lease(5*time.Second)))
	srv := httptest.NewServer(h)
	defer srv.Close()

	first := make(chan answer, 1)
	go func() { first <- get(t, srv.URL+"/?customer=z&block=1") }()
	token := <-entered
	if token == 0 {
		t.Error("handler's context has no held lock")
	}
	if a := get(t, srv.URL+"/?customer=z"); a.status != http.StatusTooManyRequests || a.retryAfter != "5" {
		t.Errorf("second request for z while the first runs = %+v; want 429 with Retry-After 5 (the holder's lease)", a)
	}
	if a := get(t, srv.URL+"/?customer=y"); a.status != http.StatusOK || a.body != "charged y" {
		t.Errorf("request for y = %+v; want 200 charged y", a)
	}
	close(leave)
	if a := <-first; a.status != http.StatusOK || a.body != "charged z" {
		t.Errorf("first request for z = %+v; want 200 charged z", a)
	}
	if a := get(t, srv.URL+"/?customer=z"); a.status != http.StatusOK {
		t.Errorf("request for z after the first = %+v; want 200", a)
	}
	mu.Lock()
	defer mu.Unlock()
	if runs["z"] != 2 || runs["y"] != 1 {
		t.Errorf("handler ran %v; want z twice (the busy request never), y once", runs)
	}
	if a := get(t, srv.URL+"/"); a.status != http.StatusBadRequest || !strings.Contains(a.body, `"customer"`) {
		t.Errorf("request without the key = %+v; want 400 naming the parameter", a)
	}
}

// TestGuardBusyStatusAndWait: BusyStatus(409) changes the busy answer, and
// MaxRetryAfter caps its Retry-After; MaxWait makes a request wait for the
// holder instead.
func TestGuardBusyStatusAndWait(t *testing.T) {
	c := newClient(t, memlock.New())
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	key := lockhttp.Header("X-Customer", "")
	conflict := httptest.NewServer(lockhttp.Guard(c, key, ok, quiet, lockhttp.BusyStatus(http.StatusConflict), lockhttp.MaxRetryAfter(2*time.Second)))
	defer conflict.Close()
	waiting := httptest.NewServer(lockhttp.Guard(c, key, ok, quiet, lockhttp.MaxWait(10*time.Second)))
	defer waiting.Close()
	do := func(url string) answer {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("X-Customer", "z")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return answer{resp.StatusCode, resp.Header.Get("Retry-After"), string(body)}
	}

	l, err := c.Acquire(t.Context(), "z", locking.Lease(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if a := do(conflict.URL); a.status != http.StatusConflict || a.retryAfter != "2" {
		t.Errorf("busy with BusyStatus(409), MaxRetryAfter(2s) = %+v; want 409 with Retry-After 2", a)
	}
	waited := make(chan answer, 1)
	go func() { waited <- do(waiting.URL) }()
	time.Sleep(100 * time.Millisecond) // let the request start waiting (the test holds either way)
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	if a := <-waited; a.status != http.StatusOK || a.body != "ok" {
		t.Errorf("request with MaxWait = %+v; want 200 once the holder released", a)
	}
}

// failingRenewals is a store whose renewals fail: a lock taken from it is
// lost after its lease.
type failingRenewals struct{ *memlock.Backend }

func (failingRenewals) Renew(context.Context, locking.Request) (locking.Grant, error) {
	return locking.Grant{}, locking.ErrNotHeld
}

// brokenStore fails every call.
type brokenStore struct{ *memlock.Backend }

var errDown = errors.New("store down")

func (brokenStore) Acquire(context.Context, locking.Request) (locking.Grant, error) {
	return locking.Grant{}, errDown
}

// TestGuardErrors: a lock lost while the handler runs answers 503 (and the
// handler's context says why); a lock store that fails answers 503; a client
// that cannot work as configured answers 500. The handler runs only in the
// first case.
func TestGuardErrors(t *testing.T) {
	t.Run("lost", func(t *testing.T) {
		c := newClient(t, failingRenewals{memlock.New()})
		var cause error
		h := lockhttp.Guard(c, lockhttp.Query("id", ""), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
			cause = context.Cause(r.Context())
		}), quiet, lockhttp.LockOptions(locking.Lease(300*time.Millisecond)))
		srv := httptest.NewServer(h)
		defer srv.Close()
		if a := get(t, srv.URL+"/?id=x"); a.status != http.StatusServiceUnavailable || a.retryAfter != "" {
			t.Errorf("lock lost before the handler answered = %+v; want 503", a)
		}
		if !errors.Is(cause, locking.ErrLockLost) {
			t.Errorf("handler's context cause = %v; want ErrLockLost", cause)
		}
	})
	t.Run("store down", func(t *testing.T) {
		c := newClient(t, brokenStore{memlock.New()})
		srv := httptest.NewServer(lockhttp.Guard(c, lockhttp.Query("id", ""), http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
			t.Error("handler ran without its lock")
		}), quiet))
		defer srv.Close()
		if a := get(t, srv.URL+"/?id=x"); a.status != http.StatusServiceUnavailable {
			t.Errorf("lock store down = %+v; want 503", a)
		}
	})
	t.Run("no Strong backend in production", func(t *testing.T) {
		for _, v := range []string{"GOOGLE_CLOUD_PROJECT", "DATASTORE_EMULATOR_HOST", locking.EnvAllowMemory} {
			t.Setenv(v, "")
		}
		t.Setenv("K_SERVICE", "checkout")
		locking.SetDefault(nil)
		t.Cleanup(func() { locking.SetDefault(nil) })
		srv := httptest.NewServer(http.HandlerFunc(lockhttp.GuardFunc(nil, lockhttp.Query("id", ""), func(http.ResponseWriter, *http.Request) {
			t.Error("handler ran without a lock store")
		}, quiet)))
		defer srv.Close()
		if a := get(t, srv.URL+"/?id=x"); a.status != http.StatusInternalServerError {
			t.Errorf("default client without a Strong backend on Cloud Run = %+v; want 500", a)
		}
	})
}

// TestGuardKeepsFlusher: the handler's ResponseWriter is still an
// http.Flusher, and a response begun before the lock is lost is left
// alone.
func TestGuardKeepsFlusher(t *testing.T) {
	c := newClient(t, failingRenewals{memlock.New()})
	h := lockhttp.Guard(c, lockhttp.Query("id", ""), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, ok := w.(http.Flusher)
		if !ok {
			t.Error("ResponseWriter is not an http.Flusher")
			return
		}
		io.WriteString(w, "partial")
		f.Flush()
		<-r.Context().Done()
	}), quiet, lockhttp.LockOptions(locking.Lease(300*time.Millisecond)))
	srv := httptest.NewServer(h)
	defer srv.Close()
	if a := get(t, srv.URL+"/?id=x"); a.status != http.StatusOK || a.body != "partial" {
		t.Errorf("lost after the response began = %+v; want the handler's 200 partial, untouched", a)
	}
}

// TestPolicyAnswer checks the shared mapping on each kind of error.
func TestPolicyAnswer(t *testing.T) {
	var p lockhttp.Policy
	for _, c := range []struct {
		err    error
		status int
		retry  int
	}{
		{&locking.NotAcquiredError{ID: "x", Remaining: 2500 * time.Millisecond}, 429, 3},
		{&locking.NotAcquiredError{ID: "x"}, 429, 1},
		{&locking.NotAcquiredError{ID: "x", Remaining: time.Hour}, 429, 10},
		{errors.Join(errors.New("job failed"), locking.ErrLockLost), 503, 0},
		{errDown, 503, 0},
		{context.Canceled, 503, 0},
		{locking.ErrInvalid, 500, 0},
		{locking.ErrNoStrongBackend, 500, 0},
		{locking.ErrReentrant, 500, 0},
	} {
		a, ok := p.Answer(c.err)
		if !ok || a.Status != c.status || a.RetryAfter != c.retry {
			t.Errorf("Answer(%v) = %+v, %v; want %d with Retry-After %d", c.err, a, ok, c.status, c.retry)
		}
	}
	if _, ok := p.Answer(nil); ok {
		t.Error("Answer(nil) reports an answer")
	}
}

// TestBadOptionsRefusedWhenBuilt: a bad setting fails New (and Guard at
// start-up) with an error wrapping locking.ErrInvalid, instead of failing
// or panicking at the first request; a Policy value that Validate refuses
// answers a busy lock 500 instead of panicking in WriteHeader.
func TestBadOptionsRefusedWhenBuilt(t *testing.T) {
	c := newClient(t, memlock.New())
	ok := http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})
	key := lockhttp.Query("id", "")
	for _, tc := range []struct {
		name string
		opt  lockhttp.Option
	}{
		{"BusyStatus(42)", lockhttp.BusyStatus(42)},
		{"BusyStatus(200)", lockhttp.BusyStatus(http.StatusOK)},
		{"BusyStatus(1000)", lockhttp.BusyStatus(1000)},
		{"MaxWait(48h)", lockhttp.MaxWait(48 * time.Hour)},
		{"MaxWait(0)", lockhttp.MaxWait(0)},
		{"MaxWait(-1s)", lockhttp.MaxWait(-time.Second)},
		{"MaxRetryAfter(-1s)", lockhttp.MaxRetryAfter(-time.Second)},
		{"nil", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := lockhttp.New(c, key, ok, tc.opt)
			if !errors.Is(err, locking.ErrInvalid) || h != nil {
				t.Fatalf("New with %s = %v, %v; want an error wrapping ErrInvalid", tc.name, h, err)
			}
			func() {
				defer func() {
					if r, _ := recover().(error); !errors.Is(r, locking.ErrInvalid) {
						t.Errorf("Guard with %s panicked with %v; want New's error", tc.name, r)
					}
				}()
				lockhttp.Guard(c, key, ok, tc.opt)
			}()
		})
	}
	if _, err := lockhttp.New(c, nil, ok); !errors.Is(err, locking.ErrInvalid) {
		t.Errorf("New with a nil key = %v; want ErrInvalid", err)
	}
	if _, err := lockhttp.New(c, key, ok, lockhttp.BusyStatus(409), lockhttp.MaxWait(time.Second), lockhttp.MaxRetryAfter(time.Minute)); err != nil {
		t.Errorf("New with valid options: %v", err)
	}

	p := lockhttp.Policy{BusyStatus: 42}
	if err := p.Validate(); !errors.Is(err, locking.ErrInvalid) {
		t.Errorf("Policy{BusyStatus: 42}.Validate() = %v; want ErrInvalid", err)
	}
	a, _ := p.Answer(&locking.NotAcquiredError{ID: "x"})
	rec := httptest.NewRecorder()
	a.Write(rec) // must not panic
	if rec.Code != http.StatusInternalServerError {
		t.Errorf("busy answer of Policy{BusyStatus: 42} = %d; want 500", rec.Code)
	}
}
