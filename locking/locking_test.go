package locking_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// counting wraps a backend, counts its calls and can fail renewals.
type counting struct {
	locking.Backend
	acquires, renews, releases atomic.Int64
	failRenew                  atomic.Bool
}

var errUnavailable = errors.New("store unavailable")

func (c *counting) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	c.acquires.Add(1)
	return c.Backend.Acquire(ctx, r)
}

func (c *counting) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	c.renews.Add(1)
	if c.failRenew.Load() {
		return locking.Grant{}, errUnavailable
	}
	return c.Backend.Renew(ctx, r)
}

func (c *counting) Release(ctx context.Context, id, owner string) error {
	c.releases.Add(1)
	return c.Backend.Release(ctx, id, owner)
}

func newClient(t *testing.T, b locking.Backend, cfg locking.Config) *locking.Client {
	t.Helper()
	cfg.Strong = b
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c, err := locking.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRenewalSchedule checks, on a fake clock, that a held lock is renewed
// every third of its lease and that renewals stop with Release.
func TestRenewalSchedule(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := &counting{Backend: memlock.New()}
		c := newClient(t, b, locking.Config{})
		l, err := c.Acquire(t.Context(), "job", locking.Lease(30*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(95 * time.Second) // renewals at 10, 20, …, 90 s
		if n := b.renews.Load(); n != 9 {
			t.Errorf("%d renewals in 95 s of a 30 s lease; want 9 (every 10 s)", n)
		}
		if err := l.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Minute)
		if n := b.renews.Load(); n != 9 {
			t.Errorf("renewals went on after Release: %d", n)
		}
	})
}

// TestLossBeforeTakeover checks that a holder whose renewals fail is told,
// through Done and With's context, before its lease could be taken over.
func TestLossBeforeTakeover(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := &counting{Backend: memlock.New()}
		c := newClient(t, b, locking.Config{})
		const lease = 30 * time.Second
		start := time.Now()
		b.failRenew.Store(true)
		var cancelledAt time.Time
		var cause error
		err := c.With(t.Context(), "job", func(ctx context.Context) error {
			<-ctx.Done()
			cancelledAt, cause = time.Now(), context.Cause(ctx)
			return ctx.Err()
		}, locking.Lease(lease))
		if !errors.Is(err, locking.ErrLockLost) || !errors.Is(cause, locking.ErrLockLost) {
			t.Fatalf("With = %v (cause %v); want ErrLockLost", err, cause)
		}
		if got, want := cancelledAt.Sub(start), lease-lease/10; got != want {
			t.Errorf("fn cancelled after %v; want %v (lease minus a tenth)", got, want)
		}
		if b.renews.Load() < 3 {
			t.Errorf("only %d renewal attempts before giving up; failed renewals must be retried", b.renews.Load())
		}
	})
}

// TestTransientRenewalFailure checks that a renewal failing for a while,
// but succeeding before the lease runs out, keeps the lock.
func TestTransientRenewalFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := &counting{Backend: memlock.New()}
		c := newClient(t, b, locking.Config{})
		l, err := c.Acquire(t.Context(), "job", locking.Lease(30*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		b.failRenew.Store(true)
		time.Sleep(20 * time.Second)
		b.failRenew.Store(false)
		time.Sleep(60 * time.Second)
		if err := l.Err(); err != nil {
			t.Fatalf("lock lost after renewals recovered: %v", err)
		}
		if err := l.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
	})
}

// TestMaxWaitPrecision checks on a fake clock that MaxWait gives up at the
// deadline, after a last try there.
func TestMaxWaitPrecision(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := memlock.New()
		holder := newClient(t, store, locking.Config{})
		l, err := holder.Acquire(t.Context(), "job")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Release(t.Context())
		b := &counting{Backend: store}
		waiter := newClient(t, b, locking.Config{MinBackoff: 100 * time.Millisecond, MaxBackoff: time.Second})
		start := time.Now()
		_, err = waiter.Acquire(t.Context(), "job", locking.MaxWait(5*time.Second))
		if !errors.Is(err, locking.ErrNotAcquired) {
			t.Fatalf("err = %v; want ErrNotAcquired", err)
		}
		if d := time.Since(start); d != 5*time.Second {
			t.Errorf("gave up after %v; want exactly MaxWait on a fake clock", d)
		}
		// At most one poll per MinBackoff, at least one per MaxBackoff.
		if n := b.acquires.Load(); n < 5 || n > 51 {
			t.Errorf("%d polls in 5 s with backoff 100ms..1s; want between 5 and 51", n)
		}
	})
}

// TestContextEndsLock checks that a lock lives no longer than the context it
// was acquired with: it is released and Done closes.
func TestContextEndsLock(t *testing.T) {
	b := memlock.New()
	c := newClient(t, b, locking.Config{})
	ctx, cancel := context.WithCancel(t.Context())
	l, err := c.Acquire(ctx, "job")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-l.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after the context ended")
	}
	if err := l.Err(); !errors.Is(err, locking.ErrNotHeld) || errors.Is(err, locking.ErrLockLost) {
		t.Errorf("Err() = %v; want ErrNotHeld, not ErrLockLost", err)
	}
	if n := b.Held(); n != 0 {
		t.Errorf("%d locks held after the context ended; want 0", n)
	}
	if err := l.Release(t.Context()); !errors.Is(err, locking.ErrNotHeld) {
		t.Errorf("Release after the context ended = %v; want ErrNotHeld", err)
	}
}

// TestLocalWaitersCoalesce checks that waiters of one client for one id
// leave the polling to one of them, and that a release in this process hands
// the lock to the next local waiter without a backend poll in between.
func TestLocalWaitersCoalesce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := memlock.New()
		b := &counting{Backend: store}
		local := newClient(t, b, locking.Config{MinBackoff: 100 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
		remote := newClient(t, store, locking.Config{})
		rl, err := remote.Acquire(t.Context(), "job")
		if err != nil {
			t.Fatal(err)
		}
		const waiters = 10
		var (
			wg   sync.WaitGroup
			mu   sync.Mutex
			errs []error
		)
		for range waiters {
			wg.Go(func() {
				l, err := local.Acquire(t.Context(), "job")
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					return
				}
				time.Sleep(time.Second)
				if err := l.Release(context.Background()); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			})
		}
		time.Sleep(10 * time.Second)
		if n := b.acquires.Load(); n > 101 {
			t.Errorf("%d polls in 10 s by %d local waiters at 100 ms backoff; want one poller (≤ 101)", n, waiters)
		}
		before := b.acquires.Load()
		if err := rl.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
		// One poll finds the remote release; each of the other nine local
		// hand-offs costs exactly one Acquire, with no polling between.
		if n := b.acquires.Load() - before; n > waiters+1 {
			t.Errorf("%d backend acquisitions for %d local hand-offs; want at most %d", n, waiters, waiters+1)
		}
	})
}

// TestLocalNoWait checks that a non-waiting caller behind a local holder is
// refused without a backend call, with the holder's remaining lease.
func TestLocalNoWait(t *testing.T) {
	b := &counting{Backend: memlock.New()}
	c := newClient(t, b, locking.Config{})
	l, err := c.Acquire(t.Context(), "job", locking.Lease(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release(t.Context())
	before := b.acquires.Load()
	_, err = c.Acquire(t.Context(), "job", locking.Wait(false))
	var nae *locking.NotAcquiredError
	if !errors.As(err, &nae) {
		t.Fatalf("err = %v; want *NotAcquiredError", err)
	}
	if nae.Remaining <= 50*time.Second || nae.Remaining > time.Minute {
		t.Errorf("Remaining = %v; want close to the holder's 1m lease", nae.Remaining)
	}
	if n := b.acquires.Load() - before; n != 0 {
		t.Errorf("%d backend calls for a local non-waiting refusal; want 0", n)
	}
}

// TestStress runs many goroutines over a few ids with several clients on
// one memlock store; only the holder touches each counter (the race
// detector would see any overlap), and tokens increase in entry order.
func TestStress(t *testing.T) {
	store := memlock.New()
	const (
		clients, goroutines, ids, rounds = 4, 16, 4, 50
	)
	type section struct {
		inside, entries int
		last            uint64
	}
	sections := make([]section, ids)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for range clients {
		c := newClient(t, store, locking.Config{MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond})
		for g := range goroutines {
			wg.Go(func() {
				for r := range rounds {
					i := (g + r) % ids
					err := c.With(t.Context(), fmt.Sprint("stress-", i), func(ctx context.Context) error {
						sec := &sections[i]
						sec.inside++
						defer func() { sec.inside-- }()
						if sec.inside != 1 {
							return fmt.Errorf("id %d: %d holders at once", i, sec.inside)
						}
						tok := locking.FromContext(ctx).Token()
						if tok <= sec.last {
							return fmt.Errorf("id %d: token %d entered after %d", i, tok, sec.last)
						}
						sec.last = tok
						sec.entries++
						return nil
					})
					if err != nil {
						mu.Lock()
						errs = append(errs, err)
						mu.Unlock()
					}
				}
			})
		}
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, s := range sections {
		total += s.entries
	}
	if want := clients * goroutines * rounds; total != want {
		t.Errorf("%d sections ran; want %d", total, want)
	}
	if n := store.Held(); n != 0 {
		t.Errorf("%d locks left held; want 0", n)
	}
}

// TestDefault checks the default client: the in-memory backend when the
// environment names none, said in one log line, and SetDefault.
func TestDefault(t *testing.T) {
	var buf bytes.Buffer
	prev := slog.Default()
	slog.SetDefault(slog.New(slog.NewJSONHandler(&buf, nil)))
	t.Cleanup(func() { slog.SetDefault(prev); locking.SetDefault(nil) })
	locking.SetDefault(nil)

	if err := locking.With(t.Context(), "default-job", func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if err := locking.With(t.Context(), "default-job", func(context.Context) error { return nil }, locking.Kind(locking.Weak)); err != nil {
		t.Fatalf("Weak on the default client: %v", err)
	}
	if n := bytes.Count(buf.Bytes(), []byte("locking: client ready")); n != 1 {
		t.Errorf("default client logged its choice %d times; want once:\n%s", n, buf.String())
	}
	if !bytes.Contains(buf.Bytes(), []byte(`"strong_backend":"memory (this process only)"`)) {
		t.Errorf("log does not name the in-memory backend:\n%s", buf.String())
	}
	c := newClient(t, memlock.New(), locking.Config{})
	locking.SetDefault(c)
	if locking.Default() != c {
		t.Errorf("Default() did not return the client set by SetDefault")
	}
}

// TestNewRejectsBadConfig checks New's validation.
func TestNewRejectsBadConfig(t *testing.T) {
	b := memlock.New()
	for name, cfg := range map[string]locking.Config{
		"no backend":       {},
		"negative lease":   {Strong: b, Lease: -1},
		"negative backoff": {Strong: b, MinBackoff: -1},
		"max below min":    {Strong: b, MinBackoff: time.Second, MaxBackoff: time.Millisecond},
	} {
		if _, err := locking.New(cfg); !errors.Is(err, locking.ErrInvalid) {
			t.Errorf("%s: New = %v; want ErrInvalid", name, err)
		}
	}
}

// testProviderEnv switches the provider this test file registers: "ok" names
// a memlock store, "bad" an invalid environment, anything else nothing.
const testProviderEnv = "LOCKING_TEST_PROVIDER"

var testProviderStore = memlock.New()

func init() {
	locking.RegisterProvider(locking.Weak, "test-provider", func() (locking.Backend, bool, error) {
		switch os.Getenv(testProviderEnv) {
		case "ok":
			return testProviderStore, true, nil
		case "bad":
			return nil, true, errors.New("TEST_ADDR is not host:port")
		}
		return nil, false, nil
	})
}

func TestFromEnvironment(t *testing.T) {
	t.Run("provider named", func(t *testing.T) {
		t.Setenv(testProviderEnv, "ok")
		var buf bytes.Buffer
		c, err := locking.FromEnvironment(locking.Config{Logger: slog.New(slog.NewJSONHandler(&buf, nil))})
		if err != nil {
			t.Fatal(err)
		}
		if c.Backend(locking.Weak) != testProviderStore {
			t.Errorf("Weak backend is not the provider's")
		}
		if !bytes.Contains(buf.Bytes(), []byte(`"weak_backend":"test-provider"`)) {
			t.Errorf("log line does not name the provider: %s", buf.String())
		}
	})
	t.Run("invalid environment", func(t *testing.T) {
		t.Setenv(testProviderEnv, "bad")
		if _, err := locking.FromEnvironment(locking.Config{Logger: slog.New(slog.DiscardHandler)}); err == nil || !strings.Contains(err.Error(), "TEST_ADDR") {
			t.Fatalf("FromEnvironment = %v; want the provider's error", err)
		}
		locking.SetDefault(nil)
		t.Cleanup(func() { locking.SetDefault(nil) })
		err := locking.With(t.Context(), "x", func(context.Context) error { return nil })
		if err == nil || !strings.Contains(err.Error(), "TEST_ADDR") {
			t.Fatalf("default client with an invalid environment: With = %v; want the provider's error", err)
		}
	})
}
