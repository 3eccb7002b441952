package dslock

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Operator calls: List, Inspect and ForceRelease. They are not part of
// locking.Backend; cmd/taskguard uses them.

// ErrNotFound is returned by Inspect and ForceRelease when no entity exists
// for the lock id.
var ErrNotFound = errors.New("dslock: no such lock")

// ErrTokenMismatch is returned by ForceRelease when the lock is held under
// another token than the one the caller named: it changed hands since the
// caller looked.
var ErrTokenMismatch = errors.New("dslock: lock token changed")

// LockInfo describes one lock entity as read at one moment.
type LockInfo struct {
	// ID is the lock id as stored for people: invalid UTF-8 replaced, cut to
	// 1024 bytes.
	ID string
	// KeyName is the entity's key name (KeyName of the full id).
	KeyName string
	// Owner is the holder's random owner token.
	Owner string
	// Token is the fencing token of the holding.
	Token uint64
	// Version is the entity's version (it changes with every renewal).
	Version int64
	// RenewedAt is when the lock was last acquired or renewed, on the
	// writer's clock.
	RenewedAt time.Time
	// Lease is the lease granted then.
	Lease time.Duration
	// ExpiresAt is RenewedAt + Lease, on the writer's clock.
	ExpiresAt time.Time
	// Remaining is how much of the lease is left, judged as Acquire judges
	// it (on server times where the server gives them); zero or negative
	// when the lease has expired.
	Remaining time.Duration
	// Held reports Remaining > 0: no other owner can take the lock now
	// (short of StealAfter).
	Held bool
	// ReadAt is the server's time of the read, or the reader's clock where
	// the server gives no times.
	ReadAt time.Time
}

func (b *Backend) info(er *pb.EntityResult, readTime time.Time) (LockInfo, error) {
	rec, err := decode(er)
	if err != nil {
		return LockInfo{}, err
	}
	p := er.GetEntity().GetProperties()
	a := b.judge(rec, readTime)
	in := LockInfo{
		ID:        p[propID].GetStringValue(),
		KeyName:   er.GetEntity().GetKey().GetPath()[0].GetName(),
		Owner:     rec.owner,
		Token:     rec.fencing(),
		Version:   rec.version,
		RenewedAt: rec.renewedAt,
		Lease:     rec.lease,
		Remaining: a.remaining,
		Held:      a.remaining > 0,
		ReadAt:    readTime,
	}
	if ts := p[propExpiresAt].GetTimestampValue(); ts != nil {
		in.ExpiresAt = ts.AsTime()
	}
	if in.ReadAt.IsZero() {
		in.ReadAt = b.now()
	}
	return in, nil
}

// ListOptions select the locks List returns and bound what it reads.
type ListOptions struct {
	// Prefix keeps only locks whose stored id starts with it. The id is not
	// indexed, so the filter runs on this side: List reads entities that do
	// not match too, and they count against Limit.
	Prefix string
	// HeldOnly drops locks whose lease has expired.
	HeldOnly bool
	// Limit is the most entities one List call reads; zero means
	// DefaultListLimit. It bounds the call's time and its load on the store.
	Limit int
	// Cursor resumes a listing after the entities an earlier call read: its
	// Listing.Next. Empty starts at the beginning.
	Cursor string
}

// DefaultListLimit is ListOptions.Limit when zero.
const DefaultListLimit = 1000

// listPage is how many entities one List query page asks for at most.
const listPage = 300

// Listing is what one List call read.
type Listing struct {
	// Locks are the locks read that match the options, sorted by id.
	Locks []LockInfo
	// Read is how many entities the call read, matching or not.
	Read int
	// Next, when not empty, is the cursor (ListOptions.Cursor) of the
	// entities after those read: the call stopped at its Limit. Empty when
	// the end was reached.
	Next string
}

// ErrBadCursor is wrapped by List for a ListOptions.Cursor that is not one
// List returned. It wraps ErrBadOptions.
var ErrBadCursor = fmt.Errorf("%w: bad list cursor", ErrBadOptions)

// List reads the lock entities of the Backend's kind and namespace, held or
// expired, in key order (the keys are hashes of the ids, so in no order of
// the ids), at most opts.Limit of them, from opts.Cursor on. It pages
// through one query, one RPC per page of up to 300 entities. Entities this
// package did not write (no owner) are skipped. Page through every lock with
// the returned Listing.Next. It returns what it read so far and ctx's error
// when ctx ends.
func (b *Backend) List(ctx context.Context, opts ListOptions) (Listing, error) {
	var out Listing
	limit := opts.Limit
	if limit < 0 {
		return out, fmt.Errorf("%w: negative list limit %d", ErrBadOptions, limit)
	}
	if limit == 0 {
		limit = DefaultListLimit
	}
	cursor, err := base64.RawURLEncoding.DecodeString(opts.Cursor)
	if err != nil {
		return out, fmt.Errorf("%w %q: %v", ErrBadCursor, opts.Cursor, err)
	}
	defer func() {
		slices.SortFunc(out.Locks, func(x, y LockInfo) int { return strings.Compare(x.ID, y.ID) })
	}()
	for out.Read < limit {
		req := &pb.RunQueryRequest{
			ProjectId:   b.project,
			DatabaseId:  b.database,
			PartitionId: &pb.PartitionId{ProjectId: b.project, DatabaseId: b.database, NamespaceId: b.namespace},
			QueryType: &pb.RunQueryRequest_Query{Query: &pb.Query{
				Kind:        []*pb.KindExpression{{Name: b.kind}},
				Order:       []*pb.PropertyOrder{{Property: &pb.PropertyReference{Name: "__key__"}}},
				StartCursor: cursor,
				Limit:       wrapperspb.Int32(int32(min(listPage, limit-out.Read))),
			}},
		}
		res, err := read(ctx, b, "list", func(ctx context.Context, c pb.DatastoreClient) (*pb.RunQueryResponse, error) {
			return c.RunQuery(ctx, req)
		})
		if err != nil {
			if status.Code(err) == codes.InvalidArgument && len(cursor) > 0 {
				return out, fmt.Errorf("%w %q: %w", ErrBadCursor, opts.Cursor, err)
			}
			return out, err
		}
		bt := res.GetBatch()
		readTime := serverTime(bt.GetReadTime())
		out.Read += len(bt.GetEntityResults())
		for _, er := range bt.GetEntityResults() {
			in, err := b.info(er, readTime)
			if err != nil {
				continue // not a lock entity of ours
			}
			if !strings.HasPrefix(in.ID, opts.Prefix) || (opts.HeldOnly && !in.Held) {
				continue
			}
			out.Locks = append(out.Locks, in)
		}
		// An empty page ends the query; the legacy emulator reports
		// MORE_RESULTS_AFTER_LIMIT even on its last page.
		if len(bt.GetEntityResults()) == 0 || bt.GetMoreResults() == pb.QueryResultBatch_NO_MORE_RESULTS {
			return out, nil
		}
		cursor = bt.GetEndCursor()
	}
	out.Next = base64.RawURLEncoding.EncodeToString(cursor)
	return out, nil
}

// Inspect reads the lock id (one RPC). It returns an error wrapping
// ErrNotFound when no entity exists for it (free, released or cleaned up),
// and one wrapping ErrMalformed for an entity this package did not write.
func (b *Backend) Inspect(ctx context.Context, id string) (LockInfo, error) {
	if id == "" {
		return LockInfo{}, fmt.Errorf("%w: empty id", ErrBadOptions)
	}
	in, _, err := b.inspect(ctx, "inspect", id)
	return in, err
}

// Probe implements locking.Prober: one lookup (Inspect), judged as
// Acquire judges the lease (on the server's read time).
func (b *Backend) Probe(ctx context.Context, id string) (bool, time.Duration, error) {
	in, err := b.Inspect(ctx, id)
	switch {
	case errors.Is(err, ErrNotFound):
		return false, 0, nil
	case err != nil:
		return false, 0, err
	case !in.Held:
		return false, 0, nil
	}
	return true, in.Remaining, nil
}

func (b *Backend) inspect(ctx context.Context, op, id string) (LockInfo, *pb.Key, error) {
	k := b.key(id)
	res, err := read(ctx, b, op, func(ctx context.Context, c pb.DatastoreClient) (*pb.LookupResponse, error) {
		return c.Lookup(ctx, &pb.LookupRequest{ProjectId: b.project, DatabaseId: b.database, Keys: []*pb.Key{k}})
	})
	if err != nil {
		return LockInfo{}, k, err
	}
	if len(res.GetFound()) == 0 {
		return LockInfo{}, k, fmt.Errorf("dslock: %s %q: %w", op, id, ErrNotFound)
	}
	in, err := b.info(res.GetFound()[0], serverTime(res.GetReadTime()))
	if err != nil {
		return LockInfo{}, k, fmt.Errorf("dslock: %s %q: %w", op, id, err)
	}
	return in, k, nil
}

// Released is what ForceRelease removed.
type Released struct {
	// Lock is the holding that was removed, as read just before.
	Lock LockInfo
	// Fence is the version Datastore reported for the deletion: strictly
	// greater than Lock.Token and than every token issued for the id so far,
	// and lower than every token issued later. A resource that refuses
	// writes with tokens below Fence refuses the removed holder's. Zero when
	// the server reported no version.
	Fence uint64
}

// ForceRelease removes the lock id whoever holds it: an operator's tool for
// a stuck lock. It reads the entity and deletes it with a delete conditional
// on the version read (2 RPCs), so it removes exactly the holding it read;
// when token is not zero, only if that holding's token is token (otherwise
// an error wrapping ErrTokenMismatch).
//
// The removed holder is not told at once: its next renewal finds the lock
// gone and its Done channel closes (locking.ErrLockLost). Until then it may
// still believe it holds the lock; so the next holder's token is larger than
// the removed one's (entity versions grow across delete and re-creation; see
// Fencing tokens in the package documentation), and Released.Fence, the
// deletion's version, lies between the two.
//
// It returns an error wrapping ErrNotFound when no entity exists for id.
// When a delete's outcome is unknown and a read-back finds the lock gone,
// it reports success with Fence zero. When the entity changes between the read and the delete (renewed, taken
// over), it reads it again, up to a few times; a renewal does not change the
// token, so a token check still holds.
func (b *Backend) ForceRelease(ctx context.Context, id string, token uint64) (Released, error) {
	if id == "" {
		return Released{}, fmt.Errorf("%w: empty id", ErrBadOptions)
	}
	var (
		unsure bool     // a delete of ours may have applied unseen
		last   LockInfo // the holding that delete was for
	)
	for writes := 0; ; writes++ {
		in, k, err := b.inspect(ctx, "force release", id)
		if unsure && errors.Is(err, ErrNotFound) {
			return Released{Lock: last}, nil
		}
		if err != nil {
			return Released{}, err
		}
		if token != 0 && in.Token != token {
			return Released{Lock: in}, fmt.Errorf("dslock: force release %q: %w: held under token %d, not %d", id, ErrTokenMismatch, in.Token, token)
		}
		if writes >= maxWrites {
			return Released{Lock: in}, fmt.Errorf("dslock: force release %q: %w", id, errContended)
		}
		res, err := b.commit(ctx, "force release", conditional(&pb.Mutation{Operation: &pb.Mutation_Delete{Delete: k}}, in.Version))
		switch {
		case err == nil:
			b.hints.forget(k.GetPath()[0].GetName())
			return Released{Lock: in, Fence: version(res)}, nil
		case errors.Is(err, errAmbiguous):
			// Read again: gone means our delete landed unseen (or the
			// holder released it meanwhile; either way it is gone).
			unsure, last = true, in
		case conflict(err):
			// Renewed or taken over since the read: judge afresh.
			unsure = false
		default:
			return Released{Lock: in}, err
		}
	}
}
