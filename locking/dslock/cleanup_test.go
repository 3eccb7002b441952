package dslock

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

const (
	staleLease = 20 * time.Millisecond
	testGrace  = 50 * time.Millisecond
	// staleWait lets a staleLease lease end more than testGrace ago on
	// either clock path.
	staleWait = staleLease + testGrace + 3*testSkew + 50*time.Millisecond
)

// insertStale writes n lock entities with short leases in batched commits.
func insertStale(t *testing.T, b *Backend, prefix string, n int) {
	t.Helper()
	for lo := 0; lo < n; lo += MaxCleanupBatch {
		var muts []*pb.Mutation
		for i := lo; i < min(n, lo+MaxCleanupBatch); i++ {
			id := fmt.Sprintf("%s-%d", prefix, i)
			muts = append(muts, &pb.Mutation{Operation: &pb.Mutation_Insert{Insert: b.entity(b.key(id), id, "stale-owner", staleLease, 0)}})
		}
		if _, err := b.commit(t.Context(), "test: insert", muts...); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCleanup(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		t.Run("expired deleted, live kept, dry run deletes nothing", func(t *testing.T) {
			if err := e.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			b := newBackend(t, e, Options{})
			live := req("live", time.Minute)
			mustAcquire(t, b, live)
			insertStale(t, b, "stale", 5)
			time.Sleep(staleWait)

			dry, err := b.Cleanup(t.Context(), CleanupOptions{Grace: testGrace, DryRun: true})
			if err != nil {
				t.Fatal(err)
			}
			if dry.Expired != 5 || dry.Deleted != 0 || !dry.Finished || !dry.DryRun {
				t.Errorf("dry run report %+v; want 5 expired, 0 deleted, finished", dry)
			}
			if n := countKind(t, b); n != 6 {
				t.Fatalf("%d entities after a dry run; want all 6", n)
			}
			rep, err := b.Cleanup(t.Context(), CleanupOptions{Grace: testGrace})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Scanned != 6 || rep.Live != 1 || rep.Deleted != 5 || rep.Skipped != 0 || rep.Errors != 0 || !rep.Finished {
				t.Errorf("report %+v; want 6 scanned, the live one left alone, 5 deleted, finished", rep)
			}
			if n := countKind(t, b); n != 1 {
				t.Errorf("%d entities left; want the live one", n)
			}
			if _, err := b.Renew(t.Context(), live); err != nil {
				t.Errorf("live lock after cleanup: %v", err)
			}
			again, err := b.Cleanup(t.Context(), CleanupOptions{Grace: testGrace})
			if err != nil || again.Deleted != 0 || !again.Finished {
				t.Errorf("second run %+v, %v; want nothing to delete", again, err)
			}
		})

		t.Run("expired but within grace kept", func(t *testing.T) {
			if err := e.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			b := newBackend(t, e, Options{})
			insertStale(t, b, "recent", 3)
			time.Sleep(staleWait)
			rep, err := b.Cleanup(t.Context(), CleanupOptions{Grace: time.Hour})
			if err != nil || rep.Deleted != 0 || countKind(t, b) != 3 {
				t.Errorf("report %+v, %v; want nothing deleted within the grace period", rep, err)
			}
		})

		t.Run("renewed or re-acquired during cleanup survive", func(t *testing.T) {
			if err := e.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			var log rpcLog
			cleaner := newBackend(t, e, Options{}, log.intercept)
			other := newBackend(t, e, Options{})
			held := make([]locking.Request, 4)
			for i := range held {
				held[i] = req(fmt.Sprintf("race-%d", i), staleLease)
				mustAcquire(t, other, held[i])
			}
			time.Sleep(staleWait)
			var renewed, reacquired locking.Request
			log.setHook(func(ctx context.Context, method string, n int, invoke func(context.Context) error) error {
				if method == "Commit" && n == 0 {
					// Between the cleaner's read and its delete: the holder of
					// race-0 renews; race-1 is released and acquired anew.
					// A long lease: should the cleaner retry its commit and
					// read again, the renewed lock must not have expired anew.
					renewed = held[0]
					renewed.Lease = time.Minute
					if _, err := other.Renew(ctx, renewed); err != nil {
						return fmt.Errorf("hook renew: %w", err)
					}
					if err := other.Release(ctx, held[1].ID, held[1].Owner); err != nil {
						return fmt.Errorf("hook release: %w", err)
					}
					reacquired = req(held[1].ID, time.Minute)
					if g, err := other.Acquire(ctx, reacquired); err != nil || !g.Acquired {
						return fmt.Errorf("hook acquire: %v %v", g, err)
					}
				}
				return invoke(ctx)
			})
			rep, err := cleaner.Cleanup(t.Context(), CleanupOptions{Grace: testGrace})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Deleted != 2 || rep.Skipped != 2 || !rep.Finished {
				t.Errorf("report %+v; want 2 deleted, 2 skipped", rep)
			}
			if _, err := other.Renew(t.Context(), renewed); err != nil {
				t.Errorf("lock renewed during cleanup was deleted: %v", err)
			}
			if _, err := other.Renew(t.Context(), reacquired); err != nil {
				t.Errorf("lock re-acquired during cleanup was deleted: %v", err)
			}
			for _, r := range held[2:] {
				if _, found := stored(t, cleaner, r.ID); found {
					t.Errorf("expired %q survived", r.ID)
				}
			}
		})

		t.Run("more than 1000 in one run", func(t *testing.T) {
			if err := e.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			var log rpcLog
			b := newBackend(t, e, Options{}, log.intercept)
			const n = 1234
			insertStale(t, b, "many", n)
			live := req("live", time.Minute)
			mustAcquire(t, b, live)
			time.Sleep(staleWait)
			log.take()
			rep, err := b.Cleanup(t.Context(), CleanupOptions{Grace: testGrace})
			if err != nil {
				t.Fatal(err)
			}
			calls := log.take()
			if rep.Scanned != n+1 || rep.Live != 1 || rep.Deleted != n || !rep.Finished {
				t.Errorf("report %+v; want %d scanned, %d deleted, the live one left alone", rep, n+1, n)
			}
			if left := countKind(t, b); left != 1 {
				t.Errorf("%d entities left; want the live one", left)
			}
			t.Logf("cleanup of %d: %d RPCs, %v", n, len(calls), rep.Elapsed)
		})

		t.Run("bounded by ctx, resumes next run", func(t *testing.T) {
			if err := e.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			var log rpcLog
			b := newBackend(t, e, Options{}, log.intercept)
			const n = 1100
			insertStale(t, b, "bounded", n)
			time.Sleep(staleWait)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			log.setHook(func(cctx context.Context, method string, k int, invoke func(context.Context) error) error {
				err := invoke(cctx)
				if method == "Commit" && k == 0 {
					cancel() // the deadline arrives right after the first page
				}
				return err
			})
			rep, err := b.Cleanup(ctx, CleanupOptions{Grace: testGrace})
			if !errors.Is(err, context.Canceled) || rep.Finished {
				t.Fatalf("Cleanup past its context = %+v, %v; want unfinished and context.Canceled", rep, err)
			}
			// One page: up to MaxCleanupBatch keys (the legacy emulator
			// returns at most 300 per query batch).
			if rep.Deleted == 0 || rep.Deleted > MaxCleanupBatch || rep.Deleted != rep.Scanned {
				t.Errorf("report %+v before stopping; want one page scanned and deleted", rep)
			}
			log.setHook(nil)
			rest, err := b.Cleanup(t.Context(), CleanupOptions{Grace: testGrace})
			if err != nil || !rest.Finished || rep.Deleted+rest.Deleted != n {
				t.Errorf("next run %+v, %v; want the remaining %d deleted", rest, err, n-rep.Deleted)
			}
		})

		t.Run("a commit refused part-way is counted as the store applied it", func(t *testing.T) {
			if err := e.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			var log rpcLog
			cleaner := newBackend(t, e, Options{}, log.intercept)
			other := newBackend(t, e, Options{})
			held := make([]locking.Request, 5)
			for i := range held {
				held[i] = req(fmt.Sprintf("partial-%d", i), staleLease)
				mustAcquire(t, other, held[i])
			}
			time.Sleep(staleWait)
			renewed := held[2]
			renewed.Lease = time.Minute
			log.setHook(func(ctx context.Context, method string, n int, invoke func(context.Context) error) error {
				if method == "Commit" && n == 0 {
					// Between the read and the delete the middle lock is
					// renewed: the commit fails on its delete, after the
					// deletes ahead of it were applied.
					if _, err := other.Renew(ctx, renewed); err != nil {
						return fmt.Errorf("hook renew: %w", err)
					}
				}
				return invoke(ctx)
			})
			rep, err := cleaner.Cleanup(t.Context(), CleanupOptions{Grace: testGrace})
			if err != nil {
				t.Fatal(err)
			}
			left := countKind(t, cleaner)
			if left != 1 {
				t.Errorf("%d entities left; want the renewed one", left)
			}
			if rep.Deleted != len(held)-left || rep.Skipped != 1 || rep.Errors != 0 || rep.Unknown != 0 {
				t.Errorf("report %+v; want %d deleted (what the store deleted), 1 skipped", rep, len(held)-left)
			}
		})

		t.Run("a run cut during its commit counts the page as unknown, not errors", func(t *testing.T) {
			if err := e.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			var log rpcLog
			b := newBackend(t, e, Options{}, log.intercept)
			const n = 700
			insertStale(t, b, "cut", n)
			time.Sleep(staleWait)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			log.setHook(func(cctx context.Context, method string, k int, invoke func(context.Context) error) error {
				if method == "Commit" && k == 0 {
					// The commit reaches the store; the run's deadline
					// arrives before its answer does.
					if err := invoke(cctx); err != nil {
						return err
					}
					cancel()
					return status.Error(codes.Canceled, "injected: answer lost at the deadline")
				}
				return invoke(cctx)
			})
			rep, err := b.Cleanup(ctx, CleanupOptions{Grace: testGrace})
			if !errors.Is(err, context.Canceled) || rep.Finished {
				t.Fatalf("Cleanup cut during its commit = %+v, %v; want unfinished and context.Canceled", rep, err)
			}
			log.setHook(nil)
			gone := n - countKind(t, b)
			if gone == 0 || rep.Errors != 0 || rep.Deleted+rep.Unknown != gone || rep.Unknown == 0 {
				t.Errorf("report %+v with %d entities deleted by the store; want them counted as deleted or unknown, no errors", rep, gone)
			}
		})

		t.Run("errors counted, transient ones retried", func(t *testing.T) {
			if err := e.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			var log rpcLog
			b := newBackend(t, e, Options{}, log.intercept)
			insertStale(t, b, "faulty", 7)
			time.Sleep(staleWait)
			log.setHook(failFirst("Commit", 1, codes.PermissionDenied))
			rep, err := b.Cleanup(t.Context(), CleanupOptions{Grace: testGrace})
			if status.Code(err) != codes.PermissionDenied || rep.Errors != 7 || rep.Deleted != 0 || !rep.Finished {
				t.Errorf("Cleanup with a refused delete = %+v, %v; want 7 errors, PermissionDenied, finished", rep, err)
			}
			if n := countKind(t, b); n != 7 {
				t.Errorf("%d entities after a failed delete; want 7", n)
			}
			log.setHook(failFirst("Commit", 2, codes.Aborted))
			rep, err = b.Cleanup(t.Context(), CleanupOptions{Grace: testGrace})
			if err != nil || rep.Deleted != 7 || rep.Errors != 0 {
				t.Errorf("Cleanup through transient aborts = %+v, %v; want all 7 deleted", rep, err)
			}
			log.setHook(nil)
		})

		t.Run("bad options", func(t *testing.T) {
			b := newBackend(t, e, Options{})
			for _, o := range []CleanupOptions{{Grace: -1}, {BatchSize: -1}, {BatchSize: MaxCleanupBatch + 1}} {
				if _, err := b.Cleanup(t.Context(), o); !errors.Is(err, ErrBadOptions) || !errors.Is(err, locking.ErrInvalid) {
					t.Errorf("Cleanup(%+v) = %v; want ErrBadOptions", o, err)
				}
			}
		})
	})
}
