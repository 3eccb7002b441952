package dslock

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// errAmbiguous marks a write whose outcome is unknown: the request may have
// been applied although no response arrived (timeout, lost connection,
// cancellation while in flight). Callers resolve it by reading back.
var errAmbiguous = errors.New("dslock: write outcome unknown")

const (
	backoffMin = 20 * time.Millisecond
	backoffMax = time.Second
)

// maxAborts bounds how many ABORTED answers in a row one read takes before
// it reports the entity as contended (errContended) instead of retrying.
const maxAborts = 5

// transient reports whether an RPC failing with code c may succeed when
// repeated.
func transient(c codes.Code) bool {
	switch c {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Aborted, codes.ResourceExhausted, codes.Internal:
		return true
	}
	return false
}

// mayHaveApplied reports whether a failed write with code c may nevertheless
// have been applied. Aborted and ResourceExhausted are refusals decided
// before the write; Unavailable, DeadlineExceeded, Canceled, Internal and
// Unknown may come after the server received it.
func mayHaveApplied(c codes.Code) bool {
	switch c {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.Internal, codes.Unknown:
		return true
	}
	return false
}

// sleep waits for the n-th backoff (full jitter, capped) or until ctx ends.
func sleep(ctx context.Context, n int) error {
	d := backoffMin << min(n, 10)
	d = min(d, backoffMax)
	d = time.Duration(rand.Int64N(int64(d)) + 1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// ctxErr wraps the context's error (cause included) for returning to callers.
func ctxErr(ctx context.Context, op string) error {
	return fmt.Errorf("dslock: %s: %w", op, context.Cause(ctx))
}

// read runs a read-only RPC with per-attempt timeouts, retrying transient
// failures with backoff until ctx ends. Reads are always safe to repeat.
func read[T any](ctx context.Context, b *Backend, op string, call func(context.Context, pb.DatastoreClient) (T, error)) (T, error) {
	var zero T
	c, err := b.client(ctx)
	if err != nil {
		return zero, err
	}
	aborts := 0
	for n := 0; ; n++ {
		actx, cancel := context.WithTimeout(b.outgoing(ctx), b.timeout)
		res, err := call(actx, c)
		cancel()
		if err == nil {
			return res, nil
		}
		if ctx.Err() != nil {
			return zero, ctxErr(ctx, op)
		}
		if !transient(status.Code(err)) {
			return zero, fmt.Errorf("dslock: %s: %w", op, err)
		}
		if status.Code(err) == codes.Aborted {
			// Contention: bounded, so that a hot entity ends in an
			// answer within the caller's budget, not in retries until
			// ctx ends.
			if aborts++; aborts >= maxAborts {
				return zero, fmt.Errorf("dslock: %s: %w: %w", op, errContended, err)
			}
		} else {
			aborts = 0
		}
		if sleep(ctx, n) != nil {
			return zero, ctxErr(ctx, op)
		}
	}
}

// commit sends one non-transactional commit. A refusal for load
// (ResourceExhausted) is retried with backoff inside ctx. A refusal for
// contention (Aborted: the write was not applied, and another writer is at
// the entity) is returned after a short jittered pause, for the caller to
// read the entity again and decide afresh (see conflict): a conditional write
// whose base version went stale fails however often it is repeated, and a
// fresh read is what tells a stale write from a busy store. A failure after
// which the write may have applied returns an error wrapping errAmbiguous and
// is not repeated here: repeating a conditional write could fail on the
// version its own first attempt created, so the caller reads the entity back
// instead. Other errors (AlreadyExists, FailedPrecondition, NotFound, ...)
// are returned wrapped; status.Code still reads them.
func (b *Backend) commit(ctx context.Context, op string, muts ...*pb.Mutation) (*pb.CommitResponse, error) {
	req := &pb.CommitRequest{
		ProjectId:  b.project,
		DatabaseId: b.database,
		Mode:       pb.CommitRequest_NON_TRANSACTIONAL,
		Mutations:  muts,
	}
	client, err := b.client(ctx)
	if err != nil {
		return nil, err
	}
	for n := 0; ; n++ {
		actx, cancel := context.WithTimeout(b.outgoing(ctx), b.timeout)
		res, err := client.Commit(actx, req)
		cancel()
		if err == nil {
			return res, nil
		}
		c := status.Code(err)
		switch {
		case mayHaveApplied(c):
			return nil, fmt.Errorf("%w: %s: %w", errAmbiguous, op, err)
		case ctx.Err() != nil:
			return nil, ctxErr(ctx, op)
		case c == codes.Aborted:
			if sleep(ctx, 0) != nil {
				return nil, ctxErr(ctx, op)
			}
			return nil, fmt.Errorf("dslock: %s: %w", op, err)
		case transient(c):
			if sleep(ctx, n) != nil {
				return nil, ctxErr(ctx, op)
			}
		default:
			return nil, fmt.Errorf("dslock: %s: %w", op, err)
		}
	}
}

// lookup reads the entity at k. found is false when it does not exist.
// readTime is the server's time of the read, zero when the server gives none.
func (b *Backend) lookup(ctx context.Context, op string, k *pb.Key) (rec record, found bool, readTime time.Time, err error) {
	res, err := read(ctx, b, op, func(ctx context.Context, c pb.DatastoreClient) (*pb.LookupResponse, error) {
		return c.Lookup(ctx, &pb.LookupRequest{ProjectId: b.project, DatabaseId: b.database, Keys: []*pb.Key{k}})
	})
	if err != nil {
		return record{}, false, time.Time{}, err
	}
	readTime = serverTime(res.GetReadTime())
	if len(res.GetFound()) == 0 {
		return record{}, false, readTime, nil
	}
	rec, err = decode(res.GetFound()[0])
	if err != nil {
		return rec, true, readTime, fmt.Errorf("%w (key %s)", err, k.GetPath()[0].GetName())
	}
	return rec, true, readTime, nil
}

// conditional makes m apply only while the entity still has version base.
// FAIL makes a conflict fail the whole commit with FailedPrecondition. The
// default (SERVER_VALUE) is documented to skip the conflicting mutation and
// flag it, and the legacy emulator does so, but the Firestore emulator in
// Datastore mode applies the stale write anyway; FAIL is honoured by both.
func conditional(m *pb.Mutation, base int64) *pb.Mutation {
	m.ConflictDetectionStrategy = &pb.Mutation_BaseVersion{BaseVersion: base}
	m.ConflictResolutionStrategy = pb.Mutation_FAIL
	return m
}

// conflict reports whether err says the entity changed, or is being changed,
// under a write that was not applied: another version (FailedPrecondition),
// no entity left (NotFound), or contention (Aborted). The answer to each is
// the same: read the entity again and judge afresh. (The service does not
// document which code a FAIL-strategy conflict gets; both emulators answer
// FailedPrecondition.)
func conflict(err error) bool {
	c := status.Code(err)
	return c == codes.FailedPrecondition || c == codes.NotFound || c == codes.Aborted
}
