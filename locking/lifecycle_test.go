package locking_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
)

// lateRenew is a backend whose Renew, once late is set, is answered only
// after delay (ignoring its context, as a client library that takes none
// does), and then succeeds: the store extends the lease after the holder has
// given up on it.
type lateRenew struct {
	locking.Backend
	delay time.Duration
	late  bool // set before the first renewal; read only by the renewer
}

func (b *lateRenew) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if b.late {
		time.Sleep(b.delay)
		return b.Backend.Renew(context.WithoutCancel(ctx), r)
	}
	return b.Backend.Renew(ctx, r)
}

// TestLateRenewalIsGivenBack: a renewal still pending when the holder
// declared the lock lost later succeeds. The holding it extended is given
// back at once, never left held for another lease. Before the fix the store
// kept the lock for a whole lease after the late renewal.
func TestLateRenewalIsGivenBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := memlock.New()
		c := newClient(t, &lateRenew{Backend: store, delay: 40 * time.Second, late: true}, locking.Config{})
		other := newClient(t, store, locking.Config{})
		const lease = 30 * time.Second
		l, err := c.Acquire(t.Context(), "job", locking.Lease(lease))
		if err != nil {
			t.Fatal(err)
		}
		<-l.Done() // lost at 27 s with the renewal sent at 10 s still pending
		if !errors.Is(l.Err(), locking.ErrLockLost) {
			t.Fatalf("Err() = %v; want ErrLockLost", l.Err())
		}
		time.Sleep(24 * time.Second) // the renewal applies at 50 s
		synctest.Wait()
		l2, err := other.Acquire(t.Context(), "job", locking.Wait(false))
		if err != nil {
			t.Fatalf("Acquire after a late renewal of a lock given up = %v; want the lock free", err)
		}
		if err := l2.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
	})
}

// TestRenewalWarningsAreRare: with the store unreachable, failing renewals
// are retried every 20 to 50 ms until the lease runs out; the warning is
// logged at once, then at most every 10 s. Before the fix a 30 s lease
// logged several hundred lines.
func TestRenewalWarningsAreRare(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := &counting{Backend: memlock.New()}
		var buf syncBuffer
		c := newClient(t, b, locking.Config{Logger: slog.New(slog.NewTextHandler(&buf, nil))})
		l, err := c.Acquire(t.Context(), "job", locking.Lease(30*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		b.failRenew.Store(true)
		<-l.Done()
		renews := b.renews.Load()
		warns := strings.Count(buf.String(), "renewal failed")
		// Failing from 10 s to 27 s: at 10 s, then at most once per 10 s.
		if renews < 20 || warns < 1 || warns > 3 {
			t.Errorf("%d failed renewals logged %d warnings; want 1 to 3 over the 17 s they failed", renews, warns)
		}
		if !strings.Contains(buf.String(), "failures_not_logged") {
			t.Errorf("the repeated warning does not say how many were left out:\n%s", buf.String())
		}
	})
}

// TestWithWarnsWhileFnOutlivesContext: With's context ends while fn runs a
// step that ignores it. The lock stays held; a warning is logged at once and
// repeated rarely, and stops when fn returns.
func TestWithWarnsWhileFnOutlivesContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var buf syncBuffer
		store := memlock.New()
		c := newClient(t, store, locking.Config{Logger: slog.New(slog.NewTextHandler(&buf, nil))})
		other := newClient(t, store, locking.Config{})
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		err := c.With(ctx, "job", func(fctx context.Context) error {
			time.Sleep(2 * time.Second)
			synctest.Wait()
			if n := strings.Count(buf.String(), "level=WARN"); n != 1 {
				t.Errorf("%d warnings 1 s after the context ended; want 1", n)
			}
			if _, err := other.Acquire(t.Context(), "job", locking.Wait(false)); !errors.Is(err, locking.ErrNotAcquired) {
				t.Errorf("Acquire by another owner while fn runs = %v; want ErrNotAcquired", err)
			}
			time.Sleep(58 * time.Second) // a minute in all: renewals every 10 s
			return fctx.Err()
		}, locking.Lease(30*time.Second))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("With = %v; want fn's own context.DeadlineExceeded", err)
		}
		n := strings.Count(buf.String(), "level=WARN")
		if n < 3 || n > 7 {
			t.Errorf("%d warnings over a minute of overrun; want the first and then about one every 10 s:\n%s", n, buf.String())
		}
		time.Sleep(time.Minute)
		if m := strings.Count(buf.String(), "level=WARN"); m != n {
			t.Errorf("%d more warnings after fn returned; want none", m-n)
		}
	})
}

// slowAcquire delays every Acquire, as a store across a network does.
type slowAcquire struct {
	locking.Backend
	delay time.Duration
}

func (b slowAcquire) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	time.Sleep(b.delay)
	return b.Backend.Acquire(ctx, r)
}

// TestBusyHintsAreShared: another instance holds the lock with 10 s of
// lease left. Two deliveries in this instance ask without waiting, the
// second while the first's call is in flight. Both are told the holder's
// remaining lease. Before the fix the second was told 0 (unknown).
func TestBusyHintsAreShared(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := memlock.New()
		holder := newClient(t, store, locking.Config{})
		l, err := holder.Acquire(t.Context(), "job", locking.Lease(10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		defer l.Release(t.Context())
		c := newClient(t, slowAcquire{Backend: store, delay: 5 * time.Millisecond}, locking.Config{})
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i := range errs {
			wg.Go(func() {
				time.Sleep(time.Duration(i) * time.Millisecond)
				_, errs[i] = c.Acquire(t.Context(), "job", locking.Wait(false))
			})
		}
		wg.Wait()
		for i, err := range errs {
			var nae *locking.NotAcquiredError
			if !errors.As(err, &nae) {
				t.Fatalf("delivery %d: %v; want *NotAcquiredError", i, err)
			}
			if nae.Remaining < 9*time.Second || nae.Remaining > 10*time.Second {
				t.Errorf("delivery %d: Remaining = %v; want the holder's ~10 s", i, nae.Remaining)
			}
		}
		// Later non-waiting callers are told too, without a backend call
		// racing the first.
		_, err = c.Acquire(t.Context(), "job", locking.Wait(false))
		var nae *locking.NotAcquiredError
		if !errors.As(err, &nae) || nae.Remaining < 9*time.Second {
			t.Errorf("a later delivery = %v; want the holder's remaining lease", err)
		}
	})
}

// TestDurationBounds: the client refuses durations above MaxLease in its
// Config and options, and its backoff arithmetic does not overflow at the
// largest values it accepts.
func TestDurationBounds(t *testing.T) {
	for _, cfg := range []locking.Config{
		{Lease: locking.MaxLease + 1},
		{MinBackoff: locking.MaxLease + 1, MaxBackoff: locking.MaxLease + 1},
		{MaxBackoff: 1 << 62},
	} {
		cfg.Strong = memlock.New()
		if _, err := locking.New(cfg); !errors.Is(err, locking.ErrInvalid) {
			t.Errorf("New(Lease %v, MinBackoff %v, MaxBackoff %v) = %v; want ErrInvalid", cfg.Lease, cfg.MinBackoff, cfg.MaxBackoff, err)
		}
	}
	synctest.Test(t, func(t *testing.T) {
		store := memlock.New()
		holder := newClient(t, store, locking.Config{})
		l, err := holder.Acquire(t.Context(), "job", locking.Lease(locking.MaxLease))
		if err != nil {
			t.Fatal(err)
		}
		defer l.Release(t.Context())
		c := newClient(t, store, locking.Config{MinBackoff: time.Hour, MaxBackoff: locking.MaxLease})
		start := time.Now()
		_, err = c.Acquire(t.Context(), "job", locking.MaxWait(locking.MaxLease))
		if !errors.Is(err, locking.ErrNotAcquired) {
			t.Fatalf("Acquire = %v; want ErrNotAcquired after MaxWait", err)
		}
		if d := time.Since(start); d != locking.MaxLease {
			t.Errorf("gave up after %v; want MaxWait %v exactly (backoff overflowed?)", d, locking.MaxLease)
		}
	})
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a logger.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestContextEndWarnsOnCloudRun: on Cloud Run (K_SERVICE set) a lock that
// ends with its context, not by Release, is warned about — once per id, at
// most every 10 s —; a released one is not, nor anything off Cloud Run.
func TestContextEndWarnsOnCloudRun(t *testing.T) {
	const line = "ended with the context it was acquired with"
	for _, cloudRun := range []bool{true, false} {
		t.Run(fmt.Sprintf("K_SERVICE set %v", cloudRun), func(t *testing.T) {
			if cloudRun {
				t.Setenv("K_SERVICE", "checkout")
			} else {
				t.Setenv("K_SERVICE", "")
			}
			synctest.Test(t, func(t *testing.T) {
				var logs syncBuffer
				c := newClient(t, memlock.New(), locking.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
				endWithContext := func(id string) {
					ctx, cancel := context.WithCancel(t.Context())
					l, err := c.Acquire(ctx, id)
					if err != nil {
						t.Fatal(err)
					}
					cancel()
					<-l.Done()
				}
				endWithContext("a")
				endWithContext("a") // the same id: not again
				l, err := c.Acquire(t.Context(), "released")
				if err != nil {
					t.Fatal(err)
				}
				if err := l.Release(t.Context()); err != nil {
					t.Fatal(err)
				}
				endWithContext("b") // another id within 10 s: held back
				time.Sleep(11 * time.Second)
				endWithContext("c") // after 10 s: logged
				got := strings.Count(logs.String(), line)
				want := 0
				if cloudRun {
					want = 2
				}
				if got != want {
					t.Errorf("%d warnings; want %d:\n%s", got, want, logs.String())
				}
				if cloudRun && (!strings.Contains(logs.String(), "lock_id=a") || !strings.Contains(logs.String(), "lock_id=c") || !strings.Contains(logs.String(), "warnings_not_logged=1")) {
					t.Errorf("want warnings for a and c, with b counted as not logged:\n%s", logs.String())
				}
			})
		})
	}
}

// TestLinesFollowTheDefaultLogger: a client made without Config.Logger logs
// to slog.Default() as it is at each line, so a slog.SetDefault after New
// (a program's JSON handler for Cloud Logging) applies to the lock's lines.
func TestLinesFollowTheDefaultLogger(t *testing.T) {
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	t.Setenv("K_SERVICE", "checkout")
	c, err := locking.New(locking.Config{Strong: memlock.New()})
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	slog.SetDefault(slog.New(slog.NewJSONHandler(&logs, nil)))
	ctx, cancel := context.WithCancel(t.Context())
	l, err := c.Acquire(ctx, "job")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	<-l.Done()
	if !strings.Contains(logs.String(), `"lock_id":"job"`) {
		t.Errorf("the lock's line did not go to the default logger set after New; got %q", logs.String())
	}
}
