package dslock

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

type hookFunc = func(ctx context.Context, method string, n int, invoke func(context.Context) error) error

// applyThenFail sends the n-th call of method, then reports code as if the
// response were lost.
func applyThenFail(method string, n int, code codes.Code) hookFunc {
	return func(ctx context.Context, m string, k int, invoke func(context.Context) error) error {
		if m == method && k == n {
			if err := invoke(ctx); err != nil {
				return err
			}
			return status.Error(code, "injected: response lost after the write applied")
		}
		return invoke(ctx)
	}
}

// failFirst fails the first times calls of method with code without sending
// them.
func failFirst(method string, times int, code codes.Code) hookFunc {
	return func(ctx context.Context, m string, k int, invoke func(context.Context) error) error {
		if m == method && k < times {
			return status.Error(code, "injected: not sent")
		}
		return invoke(ctx)
	}
}

// TestFaults injects faults between the backend and the emulator: writes
// whose outcome is lost, refused and failed calls, and a caller giving up
// while its write is in flight.
func TestFaults(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		other := newBackend(t, e, Options{})
		var log rpcLog
		b := newBackend(t, e, Options{RPCTimeout: 2 * time.Second}, log.intercept)
		free := func(t *testing.T, id string) {
			t.Helper()
			r := req(id, time.Minute)
			mustAcquire(t, other, r)
			if err := other.Release(t.Context(), id, r.Owner); err != nil {
				t.Fatal(err)
			}
		}
		held := func(t *testing.T, id, owner string) record {
			t.Helper()
			rec, found := stored(t, other, id)
			if !found || rec.owner != owner {
				t.Fatalf("%q: found=%v owner=%q; want held by %q", id, found, rec.owner, owner)
			}
			return rec
		}

		t.Run("acquire applied, response lost", func(t *testing.T) {
			r := req("f-acquire-lost", time.Minute)
			log.setHook(applyThenFail("Commit", 0, codes.DeadlineExceeded))
			g, err := b.Acquire(t.Context(), r)
			if err != nil || !g.Acquired {
				t.Fatalf("Acquire = %+v, %v; want acquired after reading back our own write", g, err)
			}
			rec := held(t, r.ID, r.Owner)
			if g.Token != uint64(rec.version) {
				t.Errorf("token %d; want the version of our write %d", g.Token, rec.version)
			}
			log.setHook(nil)
			if rg, err := b.Renew(t.Context(), r); err != nil || rg.Token != g.Token {
				t.Errorf("Renew = %+v, %v; want token %d", rg, err, g.Token)
			}
		})

		t.Run("acquire not applied, connection failed", func(t *testing.T) {
			r := req("f-acquire-unsent", time.Minute)
			log.setHook(failFirst("Commit", 1, codes.Unavailable))
			log.take()
			g, err := b.Acquire(t.Context(), r)
			if err != nil || !g.Acquired {
				t.Fatalf("Acquire = %+v, %v; want acquired on the second try", g, err)
			}
			held(t, r.ID, r.Owner)
			t.Logf("RPCs: %v", log.take())
		})

		t.Run("acquire not applied, another took it meanwhile", func(t *testing.T) {
			r, rival := req("f-acquire-rival", time.Minute), req("f-acquire-rival", time.Minute)
			log.setHook(func(ctx context.Context, m string, k int, invoke func(context.Context) error) error {
				if m == "Commit" && k == 0 {
					mustAcquire(t, other, rival)
					return status.Error(codes.Unavailable, "injected: not sent")
				}
				return invoke(ctx)
			})
			g, err := b.Acquire(t.Context(), r)
			if err != nil || g.Acquired {
				t.Fatalf("Acquire = %+v, %v; must not report a lock another owner holds", g, err)
			}
			held(t, r.ID, rival.Owner)
		})

		t.Run("acquire applied, then the caller gave up", func(t *testing.T) {
			r := req("f-acquire-abandoned", time.Minute)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			log.setHook(func(cctx context.Context, m string, k int, invoke func(context.Context) error) error {
				if m == "Commit" && k == 0 {
					err := invoke(cctx)
					cancel()
					if err != nil {
						return err
					}
					return status.Error(codes.Canceled, "injected: cancelled in flight")
				}
				return invoke(cctx)
			})
			g, err := b.Acquire(ctx, r)
			if !errors.Is(err, context.Canceled) || g.Acquired {
				t.Fatalf("Acquire = %+v, %v; want context.Canceled", g, err)
			}
			if _, found := stored(t, other, r.ID); found {
				t.Errorf("the lock written for a caller that gave up was left held")
			}
		})

		t.Run("takeover applied, response lost", func(t *testing.T) {
			old := req("f-takeover-lost", 50*time.Millisecond)
			mustAcquire(t, other, old)
			time.Sleep(old.Lease + 3*testSkew)
			r := req(old.ID, time.Minute)
			log.setHook(applyThenFail("Commit", 1, codes.Unavailable)) // Commit 0 is the insert that finds it exists
			g, err := b.Acquire(t.Context(), r)
			if err != nil || !g.Acquired || !g.TookOver {
				t.Fatalf("Acquire = %+v, %v; want taken over", g, err)
			}
			held(t, r.ID, r.Owner)
		})

		t.Run("takeover not applied, released meanwhile, insert's response lost", func(t *testing.T) {
			// TookOver is read from the entity our write left, not from
			// which write we sent last: here the takeover never lands, the
			// old holder releases, and our Insert of the free lock lands
			// unseen.
			old := req("f-takeover-then-insert", 50*time.Millisecond)
			mustAcquire(t, other, old)
			time.Sleep(old.Lease + 3*testSkew)
			r := req(old.ID, time.Minute)
			log.setHook(func(ctx context.Context, m string, k int, invoke func(context.Context) error) error {
				switch {
				case m != "Commit":
				case k == 1: // the takeover (Commit 0 is the Insert that finds the entity)
					if err := other.Release(ctx, old.ID, old.Owner); err != nil {
						t.Errorf("old holder's Release: %v", err)
					}
					return status.Error(codes.Unavailable, "injected: not sent")
				case k == 2: // the Insert of the now free lock
					if err := invoke(ctx); err != nil {
						return err
					}
					return status.Error(codes.Unavailable, "injected: response lost after the write applied")
				}
				return invoke(ctx)
			})
			g, err := b.Acquire(t.Context(), r)
			if err != nil || !g.Acquired || g.TookOver {
				t.Fatalf("Acquire = %+v, %v; want acquired, not a takeover (the lock was released first)", g, err)
			}
			held(t, r.ID, r.Owner)
		})

		t.Run("renew applied, response lost", func(t *testing.T) {
			log.setHook(nil)
			r := req("f-renew-lost", time.Minute)
			g := mustAcquire(t, b, r)
			before := held(t, r.ID, r.Owner)
			log.setHook(applyThenFail("Commit", 0, codes.DeadlineExceeded))
			rg, err := b.Renew(t.Context(), r)
			if err != nil || rg.Token != g.Token {
				t.Fatalf("Renew = %+v, %v; want token %d", rg, err, g.Token)
			}
			if after := held(t, r.ID, r.Owner); after.version <= before.version {
				t.Errorf("entity not rewritten by the renewal")
			}
		})

		t.Run("release applied, response lost", func(t *testing.T) {
			log.setHook(nil)
			r := req("f-release-lost", time.Minute)
			mustAcquire(t, b, r)
			log.setHook(applyThenFail("Commit", 0, codes.Unavailable))
			if err := b.Release(t.Context(), r.ID, r.Owner); err != nil {
				t.Fatalf("Release = %v; want nil after reading back", err)
			}
			if _, found := stored(t, other, r.ID); found {
				t.Errorf("still held after release")
			}
		})

		t.Run("release not applied, another took over meanwhile", func(t *testing.T) {
			// The delete never reaches the store; by the time the caller
			// reads back, its lease ran out and another owner took the
			// entity over (an update, not a delete and re-create).
			log.setHook(nil)
			r := req("f-release-lost-lock", 50*time.Millisecond)
			mustAcquire(t, b, r)
			rival := req(r.ID, time.Minute)
			log.setHook(func(ctx context.Context, m string, k int, invoke func(context.Context) error) error {
				if m == "Commit" && k == 0 {
					time.Sleep(r.Lease + 3*testSkew)
					if g := mustAcquire(t, other, rival); !g.TookOver {
						t.Errorf("rival's Acquire = %+v; want a takeover", g)
					}
					return status.Error(codes.Unavailable, "injected: not sent")
				}
				return invoke(ctx)
			})
			if err := b.Release(t.Context(), r.ID, r.Owner); !errors.Is(err, locking.ErrNotHeld) {
				t.Fatalf("Release = %v; want ErrNotHeld: the delete did not land and the lock was another's", err)
			}
			held(t, r.ID, rival.Owner)
		})

		t.Run("release applied, response lost, another acquired meanwhile", func(t *testing.T) {
			log.setHook(nil)
			r := req("f-release-lost-reacquired", time.Minute)
			mustAcquire(t, b, r)
			rival := req(r.ID, time.Minute)
			log.setHook(func(ctx context.Context, m string, k int, invoke func(context.Context) error) error {
				if m == "Commit" && k == 0 {
					if err := invoke(ctx); err != nil {
						return err
					}
					mustAcquire(t, other, rival)
					return status.Error(codes.Unavailable, "injected: response lost after the write applied")
				}
				return invoke(ctx)
			})
			if err := b.Release(t.Context(), r.ID, r.Owner); err != nil {
				t.Fatalf("Release = %v; want nil: the delete landed before the rival's acquire", err)
			}
			held(t, r.ID, rival.Owner)
		})

		t.Run("renew not applied, another took over meanwhile", func(t *testing.T) {
			log.setHook(nil)
			r := req("f-renew-lost-lock", 50*time.Millisecond)
			mustAcquire(t, b, r)
			rival := req(r.ID, time.Minute)
			log.setHook(func(ctx context.Context, m string, k int, invoke func(context.Context) error) error {
				if m == "Commit" && k == 0 {
					time.Sleep(r.Lease + 3*testSkew)
					mustAcquire(t, other, rival)
					return status.Error(codes.DeadlineExceeded, "injected: not sent")
				}
				return invoke(ctx)
			})
			if _, err := b.Renew(t.Context(), r); !errors.Is(err, locking.ErrNotHeld) {
				t.Fatalf("Renew = %v; want ErrNotHeld", err)
			}
			held(t, r.ID, rival.Owner)
		})

		t.Run("transient errors retried", func(t *testing.T) {
			for _, tc := range []struct {
				method string
				code   codes.Code
			}{
				{"Lookup", codes.Unavailable},
				{"Lookup", codes.DeadlineExceeded},
				{"Commit", codes.Aborted},
				{"Commit", codes.ResourceExhausted},
			} {
				t.Run(tc.method+"/"+tc.code.String(), func(t *testing.T) {
					id := "f-transient-" + tc.method + tc.code.String()
					free(t, id)
					r := req(id, time.Minute)
					log.setHook(failFirst(tc.method, 2, tc.code))
					log.take()
					g := mustAcquire(t, b, r)
					if g2, err := b.Acquire(t.Context(), req(id, time.Minute)); err != nil || g2.Acquired {
						t.Fatalf("second Acquire through %v = %+v, %v; want held", tc.code, g2, err)
					}
					if _, err := b.Renew(t.Context(), r); err != nil {
						t.Fatalf("Renew through %v: %v", tc.code, err)
					}
					if err := b.Release(t.Context(), id, r.Owner); err != nil {
						t.Fatalf("Release through %v: %v", tc.code, err)
					}
					if g.Token == 0 {
						t.Errorf("zero token")
					}
					// Without faults: 4 commits (acquire, the other owner's
					// insert, renew, release) and 1 lookup (the other owner's
					// Acquire finding it held); each fault adds one retry
					// (after an ABORTED commit, a read and a new commit).
					normal := map[string]int{"Commit": 4, "Lookup": 1}[tc.method]
					n := 0
					for _, m := range log.take() {
						if m == tc.method {
							n++
						}
					}
					if n != normal+2 {
						t.Errorf("%d %s calls; want %d (2 injected failures retried)", n, tc.method, normal+2)
					}
				})
			}
		})

		t.Run("permanent error returned", func(t *testing.T) {
			log.setHook(failFirst("Lookup", 1<<30, codes.PermissionDenied))
			_, err := b.Renew(t.Context(), req("f-denied", time.Minute))
			if status.Code(err) != codes.PermissionDenied {
				t.Errorf("Renew = %v; want PermissionDenied passed through", err)
			}
			if errors.Is(err, locking.ErrNotHeld) {
				t.Errorf("a failed read must not be reported as ErrNotHeld")
			}
		})

		t.Run("faults outlast ctx", func(t *testing.T) {
			log.setHook(failFirst("Lookup", 1<<30, codes.Unavailable))
			ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
			defer cancel()
			_, err := b.Renew(ctx, req("f-forever", time.Minute))
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Renew under endless faults = %v; want the context's deadline", err)
			}
			log.setHook(nil)
		})
	})
}
