package dswait_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/datastore"
	"go.uber.org/goleak"
	"google.golang.org/api/option"
	"google.golang.org/grpc"

	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/dswait"
	"github.com/taskguard/taskguard/tasks/waitlisttest"
)

var emulators *dstest.Set

func TestMain(m *testing.M) {
	emulators = dstest.StartSet(dstest.Firestore, dstest.Legacy)
	code := m.Run()
	emulators.Close()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			os.Stderr.WriteString("goleak: " + err.Error() + "\n")
			code = 1
		}
	}
	os.Exit(code)
}

// newList returns a List on the emulator of mode m, on a fresh namespace.
func newList(t *testing.T, m dstest.Mode) tasks.WaitList {
	t.Helper()
	l, err := dswait.New(emulatorClient(t, emulators.Get(t, m, true)), dswait.Options{Namespace: "dswait"})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// emulatorClient is a Datastore client of the emulator e, through a
// connection dialled with opts, closed when tb ends.
func emulatorClient(tb testing.TB, e *dstest.Emulator, opts ...grpc.DialOption) *datastore.Client {
	tb.Helper()
	cc, err := e.Dial(opts...)
	if err != nil {
		tb.Fatal(err)
	}
	client, err := datastore.NewClient(tb.Context(), e.ProjectID, option.WithGRPCConn(cc))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		_ = client.Close()
		_ = cc.Close()
	})
	return client
}

func TestConformance(t *testing.T) {
	for _, m := range []dstest.Mode{dstest.Firestore, dstest.Legacy} {
		t.Run(m.String(), func(t *testing.T) {
			waitlisttest.Run(t, func(t *testing.T) tasks.WaitList { return newList(t, m) })
		})
	}
}

func TestRetention(t *testing.T) {
	for _, m := range []dstest.Mode{dstest.Firestore, dstest.Legacy} {
		t.Run(m.String(), func(t *testing.T) {
			l := newList(t, m).(*dswait.List)
			var mu sync.Mutex
			now := time.Now()
			dswait.SetClock(l, func() time.Time { mu.Lock(); defer mu.Unlock(); return now })
			waitlisttest.RunRetention(t, l, func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() })
		})
	}
}

// rpcLog records the methods of the RPCs of a connection.
type rpcLog struct {
	mu      sync.Mutex
	methods []string
}

func (r *rpcLog) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	r.mu.Lock()
	r.methods = append(r.methods, path.Base(method))
	r.mu.Unlock()
	return invoker(ctx, method, req, reply, cc, opts...)
}

// take returns the methods recorded since the last take.
func (r *rpcLog) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.methods
	r.methods = nil
	return m
}

// TestCost counts at the wire the RPCs of each step of a parked task's way,
// as the package documentation states them (a transaction is 3: begin,
// lookup, commit).
func TestCost(t *testing.T) {
	e := emulators.Get(t, dstest.Firestore, true)
	var log rpcLog
	l, err := dswait.New(emulatorClient(t, e, grpc.WithChainUnaryInterceptor(log.intercept)), dswait.Options{Namespace: "cost"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, id := t.Context(), "cost"
	safety := time.Now().Add(time.Hour)
	step := func(name string, want int, f func() error) {
		t.Helper()
		log.take()
		if err := f(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := log.take(); len(got) != want {
			t.Errorf("%s: %d RPCs %v; the documentation says %d", name, len(got), got, want)
		} else {
			t.Logf("%s: %d RPCs %v", name, len(got), got)
		}
	}
	var h tasks.Wake
	step("Park of the first waiter (arms the safety wake)", 4, func() error {
		_, _, _, err := l.Park(ctx, id, tasks.Waiter{Key: "q/a", Job: "j", Arrived: time.Now(), Body: []byte("{}")}, safety)
		return err
	})
	step("Park behind a pending safety wake", 3, func() error {
		_, _, _, err := l.Park(ctx, id, tasks.Waiter{Key: "q/b", Job: "j", Arrived: time.Now(), Body: []byte("{}")}, safety)
		return err
	})
	step("Park again of a waiting key (a duplicate)", 4, func() error {
		_, created, _, err := l.Park(ctx, id, tasks.Waiter{Key: "q/b", Job: "j", Arrived: time.Now(), Body: []byte("{}")}, safety)
		if err == nil && created {
			err = errors.New("created a record again")
		}
		return err
	})
	step("Arm of a hand-off (the releasing holder's)", 3, func() (err error) {
		h, err = l.Arm(ctx, id, tasks.Handoff, time.Now())
		return err
	})
	step("Arm with a hand-off pending", 2, func() error {
		_, err := l.Arm(ctx, id, tasks.Handoff, time.Now())
		return err
	})
	step("Peek of the oldest waiter", 1, func() error {
		_, _, _, _, err := l.Peek(ctx, id, "")
		return err
	})
	step("TakeClaim (the wake's take and claim)", 3, func() error {
		_, ok, err := l.TakeClaim(ctx, id, h.Kind, h.Gen, "q/a", "wake-1")
		if err == nil && !ok {
			err = errors.New("claimed nothing")
		}
		return err
	})
	step("FinishClaim (a run's step to the oldest waiter: its query sent with the begin)", 4, func() error {
		_, ok, err := l.FinishClaim(ctx, id, "q/a", "wake-1")
		if err == nil && !ok {
			err = errors.New("claimed nothing")
		}
		return err
	})
	step("Finish", 3, func() error { return l.Finish(ctx, id, "q/b", "wake-1") })
	step("Park of a finished key (a late duplicate)", 2, func() error {
		st, _, _, err := l.Park(ctx, id, tasks.Waiter{Key: "q/a", Job: "j", Arrived: time.Now(), Body: []byte("{}")}, safety)
		if err == nil && st != tasks.Finished {
			err = fmt.Errorf("state %v, want finished", st)
		}
		return err
	})
	step("Running", 1, func() error {
		_, _, err := l.Running(ctx, id, "wake-1")
		return err
	})
}

// BenchmarkHeadAsRecordsPileUp measures the head query (Peek of the oldest
// waiter: the median of 20) on the Firestore emulator as a lock id's
// records pile up: none; n waiting; after the n were claimed and finished
// (their records out of the queried index range); and with n finished
// records of another lock id besides. A query that scanned the records it
// skips would grow from one figure to the next.
func BenchmarkHeadAsRecordsPileUp(b *testing.B) {
	const n = 1000
	client := emulatorClient(b, emulators.Get(b, dstest.Firestore, true))
	for b.Loop() {
		l, err := dswait.New(client, dswait.Options{Namespace: fmt.Sprintf("pileup-%d", time.Now().UnixNano())})
		if err != nil {
			b.Fatal(err)
		}
		ctx, id := b.Context(), "hot"
		head := func(metric string) {
			var ds []time.Duration
			for range 20 {
				start := time.Now()
				if _, _, _, _, err := l.Peek(ctx, id, ""); err != nil {
					b.Fatal(err)
				}
				ds = append(ds, time.Since(start))
			}
			slices.Sort(ds)
			b.ReportMetric(float64(ds[len(ds)/2])/1e6, metric)
		}
		head("empty-ms")
		t0 := time.Now()
		for i := range n {
			w := tasks.Waiter{Key: fmt.Sprintf("q/%d", i), Job: "j", Arrived: t0.Add(time.Duration(i)), Body: []byte("{}")}
			if _, _, _, err := l.Park(ctx, id, w, t0.Add(time.Hour)); err != nil {
				b.Fatal(err)
			}
		}
		head("waiting-ms")
		for i := range n {
			key := fmt.Sprintf("q/%d", i)
			if _, ok, err := l.Claim(ctx, id, key, "r"); err != nil || !ok {
				b.Fatalf("claim %s: %v %v", key, ok, err)
			}
			if err := l.Finish(ctx, id, key, "r"); err != nil {
				b.Fatal(err)
			}
		}
		head("after-claimed-ms")
		for i := range n {
			if err := l.Finish(ctx, "other", fmt.Sprintf("q/o%d", i), ""); err != nil {
				b.Fatal(err)
			}
		}
		head("other-finished-ms")
	}
}
