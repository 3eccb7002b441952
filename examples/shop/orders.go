package shop

import (
	"context"
	"errors"
	"sync"

	"cloud.google.com/go/datastore"

	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/fence/dsfence"
)

// Orders keeps the charged orders. A charge is written through the fence
// of its customer's lock, so that a checkout that lost the lock while it
// was frozen — Cloud Run throttles an instance's CPU once it has answered —
// cannot write after the next checkout of the customer.
type Orders interface {
	// Charge records o as charged under tok, the token of the lock
	// "customer/ID". It refuses a token lower than the customer's highest
	// with an error matching fence.ErrStale (nothing written).
	Charge(ctx context.Context, o Order, tok fence.Token) error
	// Charged returns the token order id was charged under, and whether it
	// was.
	Charged(ctx context.Context, id string) (uint64, bool, error)
}

// Order is what Checkout charges and the receipt job sends.
type Order struct {
	Customer string `json:"customer"`
	Order    string `json:"order"`
}

// lockID is the id of the lock that guards the customer's orders.
func (o Order) lockID() string { return "customer/" + o.Customer }

// DatastoreOrders keeps orders as entities of kind OrderKind, fenced by a
// dsfence record per customer lock, in one transaction per charge.
type DatastoreOrders struct {
	Client *datastore.Client
}

// OrderKind is the entity kind of DatastoreOrders.
const OrderKind = "ShopOrder"

type orderEntity struct {
	Customer string
	Token    int64
}

// Charge writes the order in a transaction that checks the fence first: one
// Lookup more than the write alone.
func (d DatastoreOrders) Charge(ctx context.Context, o Order, tok fence.Token) error {
	_, err := d.Client.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
		if err := dsfence.Check(tx, o.lockID(), tok); err != nil {
			return err
		}
		_, err := tx.Put(datastore.NameKey(OrderKind, o.Order, nil), &orderEntity{Customer: o.Customer, Token: int64(tok.Value)})
		return err
	})
	return err
}

// Charged reads the order's entity.
func (d DatastoreOrders) Charged(ctx context.Context, id string) (uint64, bool, error) {
	var e orderEntity
	switch err := d.Client.Get(ctx, datastore.NameKey(OrderKind, id, nil), &e); {
	case errors.Is(err, datastore.ErrNoSuchEntity):
		return 0, false, nil
	case err != nil:
		return 0, false, err
	}
	return uint64(e.Token), true, nil
}

// MemoryOrders keeps orders in memory, for local runs and tests, behind the
// same fence rule (fence.State per customer lock). Its zero value is ready.
type MemoryOrders struct {
	mu      sync.Mutex
	fences  map[string]fence.State // lock id → fence; guarded by mu
	charges map[string]uint64      // order → token; guarded by mu
}

// Charge admits tok by the fence rule and records the order.
func (m *MemoryOrders) Charge(_ context.Context, o Order, tok fence.Token) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	next, _, err := m.fences[o.lockID()].Admit(o.lockID(), tok)
	if err != nil {
		return err
	}
	if m.fences == nil {
		m.fences, m.charges = map[string]fence.State{}, map[string]uint64{}
	}
	m.fences[o.lockID()] = next
	m.charges[o.Order] = tok.Value
	return nil
}

// Charged returns the order's token.
func (m *MemoryOrders) Charged(_ context.Context, id string) (uint64, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	tok, ok := m.charges[id]
	return tok, ok, nil
}
