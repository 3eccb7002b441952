package dsfence_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/datastore"
	"go.uber.org/goleak"
	"google.golang.org/api/option"
	"google.golang.org/grpc"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/fence/dsfence"
)

var emulators *dstest.Set

func TestMain(m *testing.M) {
	emulators = dstest.StartSet(dstest.Legacy, dstest.Firestore)
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

// eachEmulator runs fn on both emulators, each emptied first; fn gets a
// client whose RPCs are counted by method in *rpcs.
func eachEmulator(t *testing.T, fn func(t *testing.T, c *datastore.Client, rpcs *counts)) {
	for _, m := range []dstest.Mode{dstest.Legacy, dstest.Firestore} {
		t.Run(m.String(), func(t *testing.T) {
			e := emulators.Get(t, m, true)
			var n counts
			cc, err := e.Dial(grpc.WithChainUnaryInterceptor(n.intercept))
			if err != nil {
				t.Fatal(err)
			}
			c, err := datastore.NewClient(t.Context(), e.ProjectID, option.WithGRPCConn(cc))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = c.Close()
				_ = cc.Close()
			})
			fn(t, c, &n)
		})
	}
}

// counts counts RPCs: all of them, and Lookups.
type counts struct{ all, lookups atomic.Int64 }

func (n *counts) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	n.all.Add(1)
	if method == "/google.datastore.v1.Datastore/Lookup" {
		n.lookups.Add(1)
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

type order struct {
	Items  []string
	Writer int64
}

// write puts an order for lockID in a transaction fenced with tok, the way
// the package documentation shows.
func write(ctx context.Context, c *datastore.Client, r dsfence.Records, lockID string, tok fence.Token) error {
	_, err := c.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
		if err := r.Check(tx, lockID, tok); err != nil {
			return err
		}
		_, err := tx.Put(datastore.NameKey("Order", lockID, nil), &order{Items: []string{"x"}, Writer: int64(tok.Value)})
		return err
	})
	return err
}

func readOrder(t *testing.T, c *datastore.Client, lockID string) int64 {
	t.Helper()
	var o order
	if err := c.Get(t.Context(), datastore.NameKey("Order", lockID, nil), &o); err != nil {
		t.Fatal(err)
	}
	return o.Writer
}

func TestRecordsCheck(t *testing.T) {
	eachEmulator(t, func(t *testing.T, c *datastore.Client, _ *counts) {
		ctx := t.Context()
		r := dsfence.Records{Namespace: "fence"}
		tok := func(v uint64) fence.Token { return fence.Token{LockID: "order-42", Value: v} }
		for _, step := range []struct {
			tok     fence.Token
			wantErr error
			writer  int64 // the order's writer after the step
		}{
			{tok(10), nil, 10},
			{tok(10), nil, 10}, // the same holding writes again
			{tok(12), nil, 12},
			{tok(11), fence.ErrStale, 12},
			{tok(3), locking.ErrLockLost, 12},
			{tok(12), nil, 12},
		} {
			err := write(ctx, c, r, "order-42", step.tok)
			if !errors.Is(err, step.wantErr) || (err == nil) != (step.wantErr == nil) {
				t.Fatalf("write with token %d: %v, want %v", step.tok.Value, err, step.wantErr)
			}
			if got := readOrder(t, c, "order-42"); got != step.writer {
				t.Fatalf("after token %d the order was written by %d, want %d", step.tok.Value, got, step.writer)
			}
		}
		var props datastore.PropertyList
		if err := c.Get(ctx, r.Key("order-42"), &props); err != nil {
			t.Fatal(err)
		}
		want := map[string]any{"format": fence.Format, "lockID": "order-42", "token": int64(12)}
		for _, p := range props {
			if want[p.Name] != p.Value || !p.NoIndex {
				t.Errorf("record property %s = %v (noindex %v), want %v unindexed", p.Name, p.Value, p.NoIndex, want[p.Name])
			}
		}
		if len(props) != len(want) {
			t.Errorf("record has %d properties, want %d", len(props), len(want))
		}
	})
}

func TestRecordsBadInput(t *testing.T) {
	eachEmulator(t, func(t *testing.T, c *datastore.Client, rpcs *counts) {
		ctx := t.Context()
		var r dsfence.Records
		// Records another application wrote at the keys of some lock ids.
		foreign := map[string]*datastore.PropertyList{
			"no-marker":     {{Name: "lockID", Value: "no-marker"}, {Name: "token", Value: int64(1)}},
			"other-marker":  {{Name: "format", Value: "acme-fence/2"}, {Name: "lockID", Value: "other-marker"}, {Name: "token", Value: int64(1)}},
			"string-token":  {{Name: "format", Value: fence.Format}, {Name: "lockID", Value: "string-token"}, {Name: "token", Value: "7"}},
			"extra-field":   {{Name: "format", Value: fence.Format}, {Name: "lockID", Value: "extra-field"}, {Name: "token", Value: int64(1)}, {Name: "owner", Value: "x"}},
			"negative":      {{Name: "format", Value: fence.Format}, {Name: "lockID", Value: "negative"}, {Name: "token", Value: int64(-4)}},
			"other-lock-id": {{Name: "format", Value: fence.Format}, {Name: "lockID", Value: "somebody-else"}, {Name: "token", Value: int64(1)}},
		}
		for id, props := range foreign {
			if _, err := c.Put(ctx, r.Key(id), props); err != nil {
				t.Fatal(err)
			}
		}
		for _, tc := range []struct {
			name, lockID string
			tok          fence.Token
			want         error
		}{
			{"zero token", "a", fence.Token{}, fence.ErrInvalid},
			{"token 0", "a", fence.Token{LockID: "a"}, fence.ErrInvalid},
			{"token of another lock", "a", fence.Token{LockID: "b", Value: 9}, fence.ErrWrongLock},
			{"record without marker", "no-marker", fence.Token{LockID: "no-marker", Value: 9}, fence.ErrForeign},
			{"record with another marker", "other-marker", fence.Token{LockID: "other-marker", Value: 9}, fence.ErrForeign},
			{"record with a string token", "string-token", fence.Token{LockID: "string-token", Value: 9}, fence.ErrForeign},
			{"record with an extra field", "extra-field", fence.Token{LockID: "extra-field", Value: 9}, fence.ErrForeign},
			{"record with a negative token", "negative", fence.Token{LockID: "negative", Value: 9}, fence.ErrForeign},
			{"record of another lock id", "other-lock-id", fence.Token{LockID: "other-lock-id", Value: 9}, fence.ErrWrongLock},
		} {
			t.Run(tc.name, func(t *testing.T) {
				before := rpcs.lookups.Load()
				err := write(ctx, c, r, tc.lockID, tc.tok)
				if !errors.Is(err, tc.want) {
					t.Fatalf("write: %v, want %v", err, tc.want)
				}
				if errors.Is(err, fence.ErrInvalid) || errors.Is(err, fence.ErrWrongLock) && tc.tok.LockID != tc.lockID {
					if n := rpcs.lookups.Load() - before; n != 0 {
						t.Errorf("bad input cost %d lookups, want 0", n)
					}
				}
				var o order
				if err := c.Get(ctx, datastore.NameKey("Order", tc.lockID, nil), &o); !errors.Is(err, datastore.ErrNoSuchEntity) {
					t.Fatalf("the refused write landed: %+v, %v", o, err)
				}
			})
		}
		for id, props := range foreign {
			var got datastore.PropertyList
			if err := c.Get(ctx, r.Key(id), &got); err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(asMap(got), asMap(*props)) {
				t.Errorf("foreign record %s was changed: %v, was %v", id, got, *props)
			}
		}
		if err := dsfence.Check(nil, "a", fence.Token{LockID: "a", Value: 1}); !errors.Is(err, fence.ErrInvalid) {
			t.Errorf("Check(nil tx) = %v, want ErrInvalid", err)
		}
	})
}

// TestCheckCost measures what Check adds to a transaction: one Lookup RPC,
// no other RPC.
func TestCheckCost(t *testing.T) {
	eachEmulator(t, func(t *testing.T, c *datastore.Client, rpcs *counts) {
		ctx := t.Context()
		run := func(tok fence.Token, check bool) (all, lookups int64) {
			a, l := rpcs.all.Load(), rpcs.lookups.Load()
			_, err := c.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
				if check {
					if err := dsfence.Check(tx, "cost", tok); err != nil {
						return err
					}
				}
				_, err := tx.Put(datastore.NameKey("Order", "cost", nil), &order{Writer: int64(tok.Value)})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			return rpcs.all.Load() - a, rpcs.lookups.Load() - l
		}
		plainAll, _ := run(fence.Token{LockID: "cost", Value: 1}, false)
		for _, v := range []uint64{5, 5, 6} { // a new record, an equal token, a raise
			all, lookups := run(fence.Token{LockID: "cost", Value: v}, true)
			if all != plainAll+1 || lookups != 1 {
				t.Errorf("token %d: a fenced transaction cost %d RPCs (%d lookups), an unfenced one %d; want one Lookup more", v, all, lookups, plainAll)
			}
		}
	})
}

func asMap(props datastore.PropertyList) map[string]any {
	m := make(map[string]any, len(props))
	for _, p := range props {
		m[p.Name] = p.Value
	}
	return m
}

type fencedOrder struct {
	Items []string
	Fence dsfence.Field
}

func TestField(t *testing.T) {
	eachEmulator(t, func(t *testing.T, c *datastore.Client, _ *counts) {
		ctx := t.Context()
		key := datastore.NameKey("FencedOrder", "o1", nil)
		write := func(lockID string, tok fence.Token) error {
			_, err := c.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
				var o fencedOrder
				if err := tx.Get(key, &o); err != nil && !errors.Is(err, datastore.ErrNoSuchEntity) {
					return err
				}
				if err := o.Fence.Admit(lockID, tok); err != nil {
					return err
				}
				o.Items = append(o.Items, fmt.Sprint(tok.Value))
				_, err := tx.Put(key, &o)
				return err
			})
			return err
		}
		tok := func(v uint64) fence.Token { return fence.Token{LockID: "o1", Value: v} }
		for _, step := range []struct {
			lockID string
			tok    fence.Token
			want   error
		}{
			{"o1", tok(4), nil},
			{"o1", tok(4), nil},
			{"o1", tok(8), nil},
			{"o1", tok(7), fence.ErrStale},
			{"o1", fence.Token{}, fence.ErrInvalid},
			{"o1", fence.Token{LockID: "o2", Value: 99}, fence.ErrWrongLock},
			{"o2", fence.Token{LockID: "o2", Value: 99}, fence.ErrWrongLock}, // the entity is fenced by o1
		} {
			if err := write(step.lockID, step.tok); !errors.Is(err, step.want) || (err == nil) != (step.want == nil) {
				t.Fatalf("write(%q, %+v) = %v, want %v", step.lockID, step.tok, err, step.want)
			}
		}
		var o fencedOrder
		if err := c.Get(ctx, key, &o); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(o.Items) != "[4 4 8]" || o.Fence != (dsfence.Field{Format: fence.Format, LockID: "o1", Token: 8}) {
			t.Fatalf("order = %+v, want items [4 4 8] fenced at 8 by o1", o)
		}
		// An entity whose fence fields another application wrote.
		for _, f := range []dsfence.Field{{LockID: "o1", Token: 3}, {Format: "x", LockID: "o1", Token: 3}, {Format: fence.Format, LockID: "o1", Token: -1}} {
			if err := f.Admit("o1", tok(9)); !errors.Is(err, fence.ErrForeign) {
				t.Errorf("Admit on %+v = %v, want ErrForeign", f, err)
			}
		}
	})
}

// TestRacingTransactions interleaves two holders: the stale one checks the
// fence (its token is still the highest), then the next holder tries to
// raise the fence and write while the stale transaction is open, then the
// stale one tries to commit. Whatever the store decides, writes land in
// token order: either the next holder commits and the stale commit is
// refused (the legacy emulator's optimistic transactions: the stale one is
// retried and its check refuses the token), or the open stale transaction's
// locks make the next holder's transaction fail (Firestore's pessimistic
// ones: "concurrent transaction"), the stale write lands first, and the next
// holder's retry lands after it and fences it off.
func TestRacingTransactions(t *testing.T) {
	eachEmulator(t, func(t *testing.T, c *datastore.Client, _ *counts) {
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		defer cancel()
		stale, next := fence.Token{LockID: "race", Value: 5}, fence.Token{LockID: "race", Value: 7}
		if err := write(ctx, c, dsfence.Records{}, "race", stale); err != nil {
			t.Fatal(err)
		}
		attempts := 0
		var nextErr error
		_, err := c.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
			attempts++
			if err := dsfence.Check(tx, "race", stale); err != nil {
				return err
			}
			if attempts == 1 {
				nextErr = write(ctx, c, dsfence.Records{}, "race", next)
			}
			_, err := tx.Put(datastore.NameKey("Order", "race", nil), &order{Writer: 5})
			return err
		})
		t.Logf("stale transaction: %d attempts, %v; next holder's write: %v", attempts, err, nextErr)
		switch {
		case nextErr == nil:
			if !errors.Is(err, fence.ErrStale) {
				t.Fatalf("the next holder committed, then the stale transaction ended with %v; want ErrStale", err)
			}
		case err != nil:
			t.Fatalf("both transactions failed: stale %v, next %v", err, nextErr)
		default:
			if w := readOrder(t, c, "race"); w != 5 {
				t.Fatalf("the stale transaction committed first but the order was written by %d", w)
			}
			if err := write(ctx, c, dsfence.Records{}, "race", next); err != nil {
				t.Fatalf("the next holder's retry: %v", err)
			}
			if err := write(ctx, c, dsfence.Records{}, "race", stale); !errors.Is(err, fence.ErrStale) {
				t.Fatalf("the stale holder's next write: %v, want ErrStale", err)
			}
		}
		if w := readOrder(t, c, "race"); w != 7 {
			t.Fatalf("the order was last written by %d, want 7", w)
		}
	})
}
