package shop_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/protobuf/types/known/durationpb"

	"example.com/shop"
	"github.com/taskguard/taskguard/app"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

var quiet = slog.New(slog.DiscardHandler)

// fakeTasks keeps what the shop enqueues.
type fakeTasks struct{ got []tasks.Task }

func (f *fakeTasks) Enqueue(_ context.Context, t tasks.Task) (string, error) {
	f.got = append(f.got, t)
	return "task-" + t.Name, nil
}

func memLocks(t *testing.T) *locking.Client {
	t.Helper()
	c, err := locking.New(locking.Config{Strong: memlock.New(), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

type answer struct {
	status     int
	retryAfter string
	body       string
}

func post(t *testing.T, url string) answer {
	t.Helper()
	resp, err := http.Post(url, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, resp.Header.Get("Retry-After"), string(b)}
}

// TestCheckoutAndReceipt runs the shop on the in-memory backend: a checkout
// while another holder has the customer's lock is answered 429 with
// Retry-After and charges nothing; once it is free the checkout charges and
// enqueues the receipt, which the Worker runs under the same lock.
func TestCheckoutAndReceipt(t *testing.T) {
	locks := memLocks(t)
	q := &fakeTasks{}
	s := &shop.Shop{Locks: locks, Tasks: q, Log: quiet}
	srv := httptest.NewServer(http.HandlerFunc(s.Checkout()))
	defer srv.Close()

	held, err := locks.Acquire(t.Context(), "customer/z", locking.Lease(30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if a := post(t, srv.URL+"/?customer=z&order=o1"); a.status != http.StatusTooManyRequests || a.retryAfter == "" {
		t.Errorf("checkout while the customer's lock is held = %+v; want 429 with Retry-After", a)
	}
	if _, charged, _ := s.Charged(t.Context(), "o1"); charged || len(q.got) != 0 {
		t.Fatalf("a refused checkout charged or enqueued")
	}
	if err := held.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	a := post(t, srv.URL+"/?customer=z&order=o1")
	var out struct{ Token uint64 }
	if a.status != http.StatusOK || json.Unmarshal([]byte(a.body), &out) != nil || out.Token == 0 {
		t.Fatalf("checkout = %+v; want 200 with the lock's token", a)
	}
	if tok, _, _ := s.Charged(t.Context(), "o1"); tok != out.Token || len(q.got) != 1 {
		t.Fatalf("charged with token %d, %d tasks enqueued; want token %d, 1 task", tok, len(q.got), out.Token)
	}

	// The receipt: the enqueued task, delivered as Cloud Tasks would.
	a2, err := app.New(t.Context(), app.Config{}, quiet, app.WithLocks(locks), app.WithJob(shop.ReceiptJob, s.SendReceipt))
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	req, err := taskstest.NewRequest(q.got[0])
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	a2.Worker().ServeHTTP(rec, req)
	if rec.Code != tasks.StatusDone || s.Receipts("o1") != 1 {
		t.Errorf("receipt delivery = %d, %d receipts; want %d and 1", rec.Code, s.Receipts("o1"), tasks.StatusDone)
	}
}

// TestReceiptThroughEmulator runs the real path on the Cloud Tasks
// emulator: Checkout enqueues with a tasks.Client that finds the emulator
// through CLOUD_TASKS_EMULATOR_HOST, and the emulator delivers the task to
// the Worker over HTTP.
func TestReceiptThroughEmulator(t *testing.T) {
	const queue = "projects/shop-project/locations/here/queues/receipts"
	emu := taskstest.Start(t, taskstest.Options{})
	admin, err := emu.NewClient(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.CreateQueue(t.Context(), &cloudtaskspb.CreateQueueRequest{Parent: "projects/shop-project/locations/here",
		Queue: &cloudtaskspb.Queue{Name: queue, RetryConfig: &cloudtaskspb.RetryConfig{MinBackoff: durationpb.New(10 * time.Millisecond)}}}); err != nil {
		t.Fatal(err)
	}
	t.Setenv(tasks.EnvEmulatorHost, emu.Addr())

	locks := memLocks(t)
	s := &shop.Shop{Locks: locks, Log: quiet}
	a, err := app.New(t.Context(), app.Config{}, quiet, app.WithLocks(locks), app.WithJob(shop.ReceiptJob, s.SendReceipt))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	mux := http.NewServeMux()
	mux.HandleFunc("/Checkout", s.Checkout())
	mux.Handle("/ShopWorker", a.Worker())
	srv := httptest.NewServer(mux)
	defer srv.Close()
	c, err := tasks.NewClient(t.Context(), tasks.Config{Queue: queue, WorkerURL: srv.URL + "/ShopWorker", ServiceAccount: "tasks@shop-project.iam.gserviceaccount.com"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s.Tasks = c

	if a := post(t, srv.URL+"/Checkout?customer=y&order=o2"); a.status != http.StatusOK {
		t.Fatalf("checkout = %+v; want 200", a)
	}
	if err := emu.WaitIdle(t.Context(), queue); err != nil {
		t.Fatal(err)
	}
	if n := s.Receipts("o2"); n != 1 {
		t.Errorf("%d receipts sent for o2; want 1", n)
	}
}

// TestStaleCheckoutRefused: a later holder of the customer's lock has
// charged with a higher token (here, written straight to the orders); a
// checkout holding an older token is refused 409 by the fence, and its
// order is not charged.
func TestStaleCheckoutRefused(t *testing.T) {
	orders := &shop.MemoryOrders{}
	s := &shop.Shop{Locks: memLocks(t), Tasks: &fakeTasks{}, Orders: orders, Log: quiet}
	srv := httptest.NewServer(http.HandlerFunc(s.Checkout()))
	defer srv.Close()
	later := fence.Token{LockID: "customer/w", Value: 1 << 50}
	if err := orders.Charge(t.Context(), shop.Order{Customer: "w", Order: "o0"}, later); err != nil {
		t.Fatal(err)
	}
	if a := post(t, srv.URL+"/?customer=w&order=o1"); a.status != http.StatusConflict {
		t.Errorf("checkout with a stale token = %+v; want 409", a)
	}
	if _, charged, _ := s.Charged(t.Context(), "o1"); charged {
		t.Errorf("the stale checkout's order was charged")
	}
	if a := post(t, srv.URL+"/?customer=v&order=o2"); a.status != http.StatusOK {
		t.Errorf("checkout of another customer = %+v; want 200", a)
	}
}

func TestMemoryOrdersFence(t *testing.T) {
	var m shop.MemoryOrders
	ctx := t.Context()
	o := shop.Order{Customer: "c", Order: "o"}
	for _, step := range []struct {
		tok  fence.Token
		want error
	}{
		{fence.Token{LockID: "customer/c", Value: 4}, nil},
		{fence.Token{LockID: "customer/c", Value: 3}, fence.ErrStale},
		{fence.Token{}, fence.ErrInvalid},
		{fence.Token{LockID: "customer/d", Value: 9}, fence.ErrWrongLock},
		{fence.Token{LockID: "customer/c", Value: 6}, nil},
	} {
		if err := m.Charge(ctx, o, step.tok); !errors.Is(err, step.want) || (err == nil) != (step.want == nil) {
			t.Fatalf("Charge(%+v) = %v, want %v", step.tok, err, step.want)
		}
	}
	if tok, ok, _ := m.Charged(ctx, "o"); !ok || tok != 6 {
		t.Fatalf("Charged = %d, %v; want 6", tok, ok)
	}
}
