// Package shop is an existing Cloud Run functions project that adds
// taskguard, as the README's "Add taskguard to an existing functions
// project" describes:
//
//   - Checkout, its own HTTP function, guarded per customer with
//     lockhttp: one checkout per customer at a time, across every instance;
//     the others are answered 429 with Retry-After. It writes the order
//     through the fence of the customer's lock (Orders), so a checkout
//     that lost its lock while frozen cannot write after the next one.
//   - send-receipt, its own Cloud Tasks job, enqueued by Checkout and run
//     by the ShopWorker function under the same customer lock.
//   - ShopCleanupLocks, taskguard's cleanup of expired Datastore locks.
//
// All of them share the process's one lock client, locking.Default():
// Datastore (package dslock) when GOOGLE_CLOUD_PROJECT or
// DATASTORE_EMULATOR_HOST is set, in memory for local runs and tests. On
// Cloud Run without Datastore every lock call fails with an error naming
// the fix rather than silently locking in memory.
package shop

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/lockhttp"
	"github.com/taskguard/taskguard/tasks"
)

// ReceiptJob is the name of the job that sends an order's receipt.
const ReceiptJob = "send-receipt"

// A Shop serves checkouts and sends receipts.
type Shop struct {
	// Locks is the lock client; locking.Default() when nil.
	Locks *locking.Client
	// Tasks enqueues the receipts: a *tasks.Client in production, a fake
	// in tests.
	Tasks tasks.Enqueuer
	// Work is how long a checkout's payment takes (a stand-in for calling
	// the payment provider).
	Work time.Duration
	// Orders keeps the charged orders; in memory when nil (set it before
	// the first checkout).
	Orders Orders
	// Log receives the shop's log lines; slog.Default() when nil.
	Log *slog.Logger

	mu       sync.Mutex
	mem      MemoryOrders   // the Orders when Orders is nil
	receipts map[string]int // order → receipts sent; guarded by mu
}

// Checkout is the HTTP function: POST /?customer=ID&order=ID charges the
// order and enqueues its receipt, holding the lock "customer/ID". It
// answers 200 {"order", "token"}; 429 with Retry-After while another
// checkout of the customer runs; 400 without a customer or order; 409 when
// the fence refused the charge (this checkout lost its lock and a later one
// has written).
func (s *Shop) Checkout() func(http.ResponseWriter, *http.Request) {
	return lockhttp.GuardFunc(s.Locks, lockhttp.Query("customer", "customer/"), s.checkout)
}

func (s *Shop) checkout(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	o := Order{Customer: r.URL.Query().Get("customer"), Order: r.URL.Query().Get("order")}
	if o.Order == "" {
		http.Error(w, "order is required", http.StatusBadRequest)
		return
	}
	tok := fence.FromContext(ctx) // the lock "customer/ID" that lockhttp holds
	select {
	case <-time.After(s.Work): // the payment
	case <-ctx.Done(): // the request ended, or the lock was lost
		http.Error(w, "checkout interrupted", http.StatusServiceUnavailable)
		return
	}
	switch err := s.orders().Charge(ctx, o, tok); {
	case errors.Is(err, fence.ErrStale):
		s.log().WarnContext(ctx, "charge refused: the lock was lost", "order", o.Order, "error", err)
		http.Error(w, "checkout lost its lock to a later one", http.StatusConflict)
		return
	case err != nil:
		s.log().ErrorContext(ctx, "charging failed", "order", o.Order, "error", err)
		http.Error(w, "could not record the order", http.StatusBadGateway)
		return
	}
	// The receipt runs under the customer's lock too, after this checkout.
	if _, err := s.Tasks.Enqueue(ctx, tasks.Task{Job: ReceiptJob, LockID: "customer/" + o.Customer, Name: o.Order, Payload: o}); err != nil && !errors.Is(err, tasks.ErrDuplicate) {
		s.log().ErrorContext(ctx, "enqueueing the receipt failed", "order", o.Order, "error", err)
		http.Error(w, "could not enqueue the receipt", http.StatusBadGateway)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"order": o.Order, "token": tok.Value})
}

// SendReceipt is the receipt job, run by the Worker under the task's lock,
// "customer/ID".
func (s *Shop) SendReceipt(ctx context.Context, d *tasks.Delivery) error {
	var o Order
	if err := d.Decode(&o); err != nil || o.Order == "" {
		return tasks.Permanent(fmt.Errorf("payload is not an order: %v", err))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.receipts == nil {
		s.receipts = map[string]int{}
	}
	s.receipts[o.Order]++
	s.log().InfoContext(ctx, "receipt sent", "order", o.Order, "customer", o.Customer, "token", d.Token)
	return nil
}

// Charged returns the fencing token the order was charged under, and
// whether it was.
func (s *Shop) Charged(ctx context.Context, orderID string) (uint64, bool, error) {
	return s.orders().Charged(ctx, orderID)
}

func (s *Shop) orders() Orders {
	if s.Orders != nil {
		return s.Orders
	}
	return &s.mem
}

// Receipts returns how many receipts were sent for the order.
func (s *Shop) Receipts(orderID string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.receipts[orderID]
}

func (s *Shop) log() *slog.Logger {
	if s.Log == nil {
		return slog.Default()
	}
	return s.Log
}
