package dslock

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// abortOnce answers the first commit at the wire with ABORTED, after running
// meanwhile (another writer changing the entity in between; nil for none).
func abortOnce(meanwhile func(context.Context) error) func(*pb.CommitRequest) error {
	var fired atomic.Bool
	return func(*pb.CommitRequest) error {
		if !fired.CompareAndSwap(false, true) {
			return nil
		}
		if meanwhile != nil {
			if err := meanwhile(context.Background()); err != nil {
				return status.Errorf(codes.Internal, "test: meanwhile: %v", err)
			}
		}
		return status.Error(codes.Aborted, "injected: too much contention on these datastore entities")
	}
}

// codesOf lists the status codes of commits.
func codesOf(cs []wireCommit) []codes.Code {
	var out []codes.Code
	for _, c := range cs {
		out = append(out, c.code)
	}
	return out
}

// TestAbortedConditionalWrite injects ABORTED at the wire in answer to a
// conditional write while another writer changes the entity, so that the
// write's base version is stale: sent again unchanged it could only fail.
// Each call must read the entity again and write on what it read: no commit
// fails with FailedPrecondition, and the write after the abort is based on a
// fresh version.
func TestAbortedConditionalWrite(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		w, addr := startWire(t, e)
		b := dialWire(t, addr, e.ProjectID)
		other := dialWire(t, addr, e.ProjectID) // another instance, same owner token where it renews

		check := func(t *testing.T, cs []wireCommit, wantAfter int) {
			t.Helper()
			// cs: the other writer's commit (recorded first: it ran inside
			// the injection), our aborted one, then ours after a re-read.
			if len(cs) != 2+wantAfter {
				t.Fatalf("commits %v; want the other writer's, our aborted one and %d more", codesOf(cs), wantAfter)
			}
			if cs[0].code != codes.OK || cs[1].code != codes.Aborted || !cs[1].injected {
				t.Fatalf("commits %v; want the other writer's OK, then our injected ABORTED", codesOf(cs))
			}
			for _, c := range cs[2:] {
				if c.code != codes.OK {
					t.Errorf("commit after the abort answered %v; want OK (a fresh read, then a write on it)", c.code)
				}
				if c.bases[0] == cs[1].bases[0] {
					t.Errorf("the aborted write was sent again on its stale base version %d", c.bases[0])
				}
			}
		}

		t.Run("renew", func(t *testing.T) {
			r := req("abort-renew", time.Minute)
			g := mustAcquire(t, b, r)
			w.take()
			w.setInject(abortOnce(func(ctx context.Context) error { _, err := other.Renew(ctx, r); return err }))
			defer w.setInject(nil)
			rg, err := b.Renew(t.Context(), r)
			if err != nil || rg.Token != g.Token {
				t.Fatalf("Renew = %+v, %v; want renewed with token %d", rg, err, g.Token)
			}
			check(t, w.take(), 1)
		})

		t.Run("release", func(t *testing.T) {
			r := req("abort-release", time.Minute)
			mustAcquire(t, b, r)
			w.take()
			w.setInject(abortOnce(func(ctx context.Context) error { _, err := other.Renew(ctx, r); return err }))
			defer w.setInject(nil)
			if err := b.Release(t.Context(), r.ID, r.Owner); err != nil {
				t.Fatalf("Release: %v", err)
			}
			check(t, w.take(), 1)
			if _, found := stored(t, b, r.ID); found {
				t.Error("lock still stored after Release")
			}
		})

		t.Run("takeover lost to a rival", func(t *testing.T) {
			dead := req("abort-takeover", 20*time.Millisecond)
			mustAcquire(t, other, dead)
			time.Sleep(20*time.Millisecond + 3*testSkew + 30*time.Millisecond)
			rival := req(dead.ID, time.Minute)
			// Both know the lock is held (as waiters that polled it do):
			// each reads first and sends one takeover.
			name := b.key(dead.ID).GetPath()[0].GetName()
			b.hints.held(name, 0)
			other.hints.held(name, 0)
			w.take()
			w.setInject(abortOnce(func(ctx context.Context) error {
				g, err := other.Acquire(ctx, rival)
				if err == nil && !g.Acquired {
					err = errors.New("rival did not take over")
				}
				return err
			}))
			defer w.setInject(nil)
			g, err := b.Acquire(t.Context(), req(dead.ID, time.Minute))
			if err != nil || g.Acquired {
				t.Fatalf("Acquire = %+v, %v; want not acquired: the rival took over", g, err)
			}
			check(t, w.take(), 0)
		})
	})
}

// TestPersistentContention: a store that answers ABORTED to every write (or
// every read) of one lock makes each call end within a bounded number of
// RPCs, although ctx has no deadline: Acquire as busy (not acquired, no
// error), Renew and Release with an error.
func TestPersistentContention(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		w, addr := startWire(t, e)
		b := dialWire(t, addr, e.ProjectID)
		held := req("contended-held", time.Minute)
		mustAcquire(t, b, held)
		w.take()
		w.setInject(func(*pb.CommitRequest) error {
			return status.Error(codes.Aborted, "injected: too much contention")
		})
		defer w.setInject(nil)
		// The calls run on a context without deadline; the test's own
		// timeout is the only bound, and an endless retry would reach it.
		ctx := context.WithoutCancel(t.Context())
		start := time.Now()

		g, err := b.Acquire(ctx, req("contended-free", time.Minute))
		if err != nil || g.Acquired {
			t.Errorf("Acquire under endless ABORTED = %+v, %v; want not acquired (busy), no error", g, err)
		}
		if n := len(w.take()); n > maxWrites+1 {
			t.Errorf("Acquire sent %d commits; want at most %d", n, maxWrites+1)
		}
		if _, err := b.Renew(ctx, held); !errors.Is(err, errContended) || status.Code(err) != codes.Aborted {
			t.Errorf("Renew under endless ABORTED = %v; want errContended carrying ABORTED", err)
		}
		if n := len(w.take()); n > maxWrites+2 {
			t.Errorf("Renew sent %d commits; want at most %d", n, maxWrites+2)
		}
		if err := b.Release(ctx, held.ID, held.Owner); !errors.Is(err, errContended) {
			t.Errorf("Release under endless ABORTED = %v; want errContended", err)
		}
		if n := len(w.take()); n > maxWrites+2 {
			t.Errorf("Release sent %d commits; want at most %d", n, maxWrites+2)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("the three calls took %v under contention; want a prompt answer", d)
		}

		t.Run("reads", func(t *testing.T) {
			var log rpcLog
			rb := newBackend(t, e, Options{}, log.intercept)
			r := req("contended-reads", time.Minute)
			mustAcquire(t, rb, r)
			rb.hints.held(rb.key(r.ID).GetPath()[0].GetName(), 0) // read first
			rb.held.drop(rb.key(r.ID).GetPath()[0].GetName(), r.Owner, holding{})
			log.setHook(failFirst("Lookup", 1<<30, codes.Aborted))
			defer log.setHook(nil)
			g, err := rb.Acquire(ctx, req(r.ID, time.Minute))
			if err != nil || g.Acquired {
				t.Errorf("Acquire with every read ABORTED = %+v, %v; want not acquired (busy), no error", g, err)
			}
			if _, err := rb.Renew(ctx, r); !errors.Is(err, errContended) {
				t.Errorf("Renew with every read ABORTED = %v; want errContended", err)
			}
		})
	})
}

// TestIndexSettings shows the index settings of every entity this package
// writes, as they reach the wire: no property is indexed, so no acquire,
// renewal or takeover writes a monotonically increasing indexed value (the
// store caps a kind at ~500 writes/s when one is). It renews 5,000 held
// locks, as a busy deployment would every few seconds, and checks every
// property of every entity written; and it shows at the store that expiresAt
// cannot be queried, so nothing can have indexed it.
func TestIndexSettings(t *testing.T) {
	const held = 5000
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		w, addr := startWire(t, e)
		b := dialWire(t, addr, e.ProjectID)
		other := dialWire(t, addr, e.ProjectID)
		ctx := t.Context()

		// Every kind of write: Insert, takeover, renewals (direct and
		// after a read), Release.
		dead := req("idx-dead", time.Millisecond)
		mustAcquire(t, other, dead)
		time.Sleep(3*testSkew + 30*time.Millisecond)
		taker := req(dead.ID, time.Minute)
		if g := mustAcquire(t, b, taker); !g.TookOver {
			t.Fatalf("Acquire = %+v; want a takeover", g)
		}
		if _, err := other.Renew(ctx, taker); err != nil { // renewal after a read
			t.Fatal(err)
		}
		reqs := make([]locking.Request, held)
		var eg errgroup.Group
		eg.SetLimit(16)
		for i := range reqs {
			reqs[i] = req(fmt.Sprintf("idx-%d", i), time.Minute)
			eg.Go(func() error {
				g, err := b.Acquire(ctx, reqs[i])
				if err == nil && !g.Acquired {
					err = fmt.Errorf("%s not acquired", reqs[i].ID)
				}
				return err
			})
		}
		if err := eg.Wait(); err != nil {
			t.Fatal(err)
		}
		for i := range reqs {
			eg.Go(func() error { _, err := b.Renew(ctx, reqs[i]); return err })
		}
		if err := eg.Wait(); err != nil {
			t.Fatal(err)
		}
		if err := b.Release(ctx, reqs[0].ID, reqs[0].Owner); err != nil {
			t.Fatal(err)
		}

		entities, indexed := 0, map[string]int{}
		for _, c := range w.take() {
			for _, m := range c.req.GetMutations() {
				var ent *pb.Entity
				switch op := m.GetOperation().(type) {
				case *pb.Mutation_Insert:
					ent = op.Insert
				case *pb.Mutation_Update:
					ent = op.Update
				case *pb.Mutation_Upsert:
					ent = op.Upsert
				default:
					continue
				}
				entities++
				for name, v := range ent.GetProperties() {
					if !v.GetExcludeFromIndexes() {
						indexed[name]++
					}
				}
			}
		}
		if entities < 2*held+2 {
			t.Errorf("%d entities written; want at least %d (acquire and renew of each lock, a takeover, a renewal)", entities, 2*held+2)
		}
		if len(indexed) != 0 {
			t.Errorf("indexed properties written (property: entities): %v; want none", indexed)
		}
		t.Logf("%d entities written (%d locks acquired and renewed); indexed properties: %v", entities, held, indexed)

		// At the store: an inequality on expiresAt finds nothing, though
		// every lock entity has one.
		res, err := b.rpc.RunQuery(b.outgoing(ctx), &pb.RunQueryRequest{
			ProjectId:   b.project,
			PartitionId: &pb.PartitionId{ProjectId: b.project},
			QueryType: &pb.RunQueryRequest_Query{Query: &pb.Query{
				Kind: []*pb.KindExpression{{Name: b.kind}},
				Filter: &pb.Filter{FilterType: &pb.Filter_PropertyFilter{PropertyFilter: &pb.PropertyFilter{
					Property: &pb.PropertyReference{Name: propExpiresAt},
					Op:       pb.PropertyFilter_GREATER_THAN,
					Value:    &pb.Value{ValueType: &pb.Value_NullValue{}},
				}}},
			}},
		})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(res.GetBatch().GetEntityResults()); n != 0 {
			t.Errorf("a query on expiresAt found %d entities; want none (unindexed)", n)
		}
		if n := countKind(t, b); n < held {
			t.Errorf("%d lock entities stored; want at least %d", n, held)
		}
	})
}
