package dslock

import (
	"context"
	"errors"
	"fmt"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// DefaultCleanupGrace is how long past the end of its lease a lock entity is
// kept when CleanupOptions.Grace is zero.
const DefaultCleanupGrace = 15 * time.Minute

// MaxCleanupBatch is the largest CleanupOptions.BatchSize: Datastore commits
// take at most 500 mutations.
const MaxCleanupBatch = 500

// cleanupRetries bounds how often one batch is re-read and re-committed when
// some of its entities change under the conditional delete.
const cleanupRetries = 3

// CleanupOptions configure one Cleanup run.
type CleanupOptions struct {
	// Grace is how long after its lease ended an entity must have stayed
	// unrenewed before it is deleted; zero means DefaultCleanupGrace.
	Grace time.Duration
	// DryRun counts what would be deleted and deletes nothing.
	DryRun bool
	// BatchSize is how many keys one query page, lookup and commit handle;
	// zero means MaxCleanupBatch.
	BatchSize int
}

// Report says what one Cleanup run did.
type Report struct {
	// Scanned is how many lock entities the scan returned: every entity
	// of the kind, held or not.
	Scanned int
	// Live is how many of those were, when read, held or past their lease
	// by less than the grace period (or gone already): left alone.
	Live int
	// Expired is how many were, when read, past their lease by more than
	// the grace period (what a dry run would delete).
	Expired int
	// Deleted is how many entities were deleted. It includes expired
	// entities found gone when a page is read again after a commit that
	// failed part-way (see Cleanup): the store applied their deletes, unless
	// their holders released them in the same instant, which is the same
	// outcome.
	Deleted int
	// Skipped is how many expired entities were left in place: renewed,
	// re-acquired or released between the read and the delete.
	Skipped int
	// Errors is how many expired entities could not be deleted because of
	// errors (see the error Cleanup returned); none of them was deleted.
	Errors int
	// Unknown is how many expired entities were sent in a delete whose
	// outcome is unknown: the run ended (or the connection failed) after the
	// commit was sent and before it could be read back. Some or all of them
	// may be deleted; a later run deletes those that remain.
	Unknown int
	// Elapsed is the run's wall time.
	Elapsed time.Duration
	// Finished reports that the query was run to its end; false when ctx
	// ended first (the next run continues, as deleted entities no longer
	// match).
	Finished bool
	// DryRun echoes CleanupOptions.DryRun.
	DryRun bool
}

// Cleanup deletes lock entities whose lease ended more than opts.Grace ago,
// page by page: a keys-only query over the kind in key order (the built-in
// key index; no property of a lock entity is indexed, see the package
// documentation) lists every lock entity, a lookup of each page reads them,
// the lease is judged as Acquire judges it (on server times where the server
// gives them) plus the grace period, and the expired ones are deleted in one
// commit per page, each delete conditional on the version just read. Held
// locks are read and left alone (Report.Live): a run reads every lock
// entity, which is as many as there are locks held plus those abandoned
// (released locks are deleted at once). An entity renewed, re-acquired or released after the
// read makes the conditional commit fail with FailedPrecondition, naming no
// key; the deletes ahead of that entity in the commit may nevertheless have
// been applied (both emulators apply them, and the rest not). The page is
// then read and judged again: an entity found gone counts as Deleted, the
// changed one survives and counts as Skipped, and the others are deleted by
// the next commit. A live lease is never deleted.
//
// Each scanned entity is counted once: in Live, or, when expired, in Deleted,
// Skipped (it changed, or kept changing past the retries), Errors (a read or
// commit failed and it was not deleted) or Unknown (its delete was sent but
// the outcome could not be read back, as when ctx ends during the commit).
//
// Cleanup is idempotent and safe to run from several places at once. It
// stops when ctx ends and returns the Report so far (Finished false) with an
// error wrapping ctx's error; a later run starts again from the first key
// and finds the deleted entities gone. Errors on single pages are counted in the Report
// and returned joined after the run; transient RPC errors are retried inside
// ctx.
func (b *Backend) Cleanup(ctx context.Context, opts CleanupOptions) (Report, error) {
	start := time.Now()
	rep := Report{DryRun: opts.DryRun}
	grace := opts.Grace
	if grace < 0 || opts.BatchSize < 0 || opts.BatchSize > MaxCleanupBatch {
		return rep, fmt.Errorf("%w: cleanup grace %v, batch size %d", ErrBadOptions, opts.Grace, opts.BatchSize)
	}
	if grace == 0 {
		grace = DefaultCleanupGrace
	}
	batch := opts.BatchSize
	if batch == 0 {
		batch = MaxCleanupBatch
	}
	var errs []error
	var cursor []byte
	for {
		if ctx.Err() != nil {
			rep.Elapsed = time.Since(start)
			return rep, errors.Join(append(errs, ctxErr(ctx, "cleanup"))...)
		}
		keys, next, done, err := b.scanKeys(ctx, batch, cursor)
		if err != nil {
			rep.Elapsed = time.Since(start)
			return rep, errors.Join(append(errs, err)...)
		}
		rep.Scanned += len(keys)
		if len(keys) > 0 {
			if err := b.cleanPage(ctx, keys, grace, opts.DryRun, &rep); err != nil {
				if ctx.Err() != nil {
					rep.Elapsed = time.Since(start)
					return rep, errors.Join(append(errs, ctxErr(ctx, "cleanup"))...)
				}
				errs = append(errs, err)
			}
		}
		if done {
			rep.Finished = true
			rep.Elapsed = time.Since(start)
			return rep, errors.Join(errs...)
		}
		cursor = next
	}
}

// scanKeys runs one page of the keys-only scan of the kind, in key order.
// The keys are SHA-256 hashes, spread evenly: no page is a hot range.
func (b *Backend) scanKeys(ctx context.Context, limit int, cursor []byte) (keys []*pb.Key, next []byte, done bool, err error) {
	q := &pb.Query{
		Kind:        []*pb.KindExpression{{Name: b.kind}},
		Projection:  []*pb.Projection{{Property: &pb.PropertyReference{Name: "__key__"}}},
		Order:       []*pb.PropertyOrder{{Property: &pb.PropertyReference{Name: "__key__"}, Direction: pb.PropertyOrder_ASCENDING}},
		StartCursor: cursor,
		Limit:       wrapperspb.Int32(int32(limit)),
	}
	req := &pb.RunQueryRequest{
		ProjectId:   b.project,
		DatabaseId:  b.database,
		PartitionId: &pb.PartitionId{ProjectId: b.project, DatabaseId: b.database, NamespaceId: b.namespace},
		QueryType:   &pb.RunQueryRequest_Query{Query: q},
	}
	res, err := read(ctx, b, "cleanup: scan", func(ctx context.Context, c pb.DatastoreClient) (*pb.RunQueryResponse, error) {
		return c.RunQuery(ctx, req)
	})
	if err != nil {
		return nil, nil, false, err
	}
	bt := res.GetBatch()
	for _, er := range bt.GetEntityResults() {
		k := er.GetEntity().GetKey()
		// The legacy emulator's kind queries return the kind's entities
		// of every database (and a Lookup of another database's key then
		// never answers): keep those of this Backend's partition only.
		if p := k.GetPartitionId(); p.GetDatabaseId() != b.database || p.GetNamespaceId() != b.namespace {
			continue
		}
		keys = append(keys, k)
	}
	// An empty page ends the query; the legacy emulator reports
	// MORE_RESULTS_AFTER_LIMIT even on its last page.
	done = len(bt.GetEntityResults()) == 0 || bt.GetMoreResults() == pb.QueryResultBatch_NO_MORE_RESULTS
	return keys, bt.GetEndCursor(), done, nil
}

// cleanPage reads keys back, deletes the expired ones conditionally, and
// retries with a fresh read when some changed in between.
func (b *Backend) cleanPage(ctx context.Context, keys []*pb.Key, grace time.Duration, dryRun bool, rep *Report) error {
	pending := keys
	unsure := false // the previous commit may have applied
	for attempt := 0; ; attempt++ {
		found, readTime, err := b.lookupMany(ctx, pending)
		if err != nil {
			if unsure {
				// The deletes just sent may have been applied.
				rep.Unknown += len(pending)
			} else {
				rep.Errors += len(pending)
			}
			return err
		}
		var muts []*pb.Mutation
		var cands []*pb.Key
		for _, k := range pending {
			er, ok := found[k.GetPath()[0].GetName()]
			switch {
			case !ok && unsure:
				rep.Deleted++ // our own delete, applied unseen (or a release just as it)
				continue
			case !ok && attempt == 0:
				rep.Live++ // released since the scan
				continue
			case !ok:
				rep.Skipped++ // released between our read and our delete
				continue
			}
			rec, err := decode(er)
			if err != nil {
				if attempt == 0 {
					rep.Live++ // not ours to judge
				} else {
					rep.Skipped++
				}
				continue
			}
			if a := b.judge(rec, readTime); a.remaining+grace > 0 {
				if attempt == 0 {
					rep.Live++
				} else {
					rep.Skipped++ // renewed or re-acquired since our read
				}
				continue
			}
			cands = append(cands, k)
			muts = append(muts, conditional(&pb.Mutation{Operation: &pb.Mutation_Delete{Delete: k}}, rec.version))
		}
		if attempt == 0 {
			rep.Expired += len(cands)
		}
		if dryRun || len(muts) == 0 {
			return nil
		}
		if attempt >= cleanupRetries {
			// Entities keep changing; leave the rest to the next run.
			rep.Skipped += len(cands)
			return nil
		}
		_, err = b.commit(ctx, "cleanup: delete", muts...)
		switch {
		case err == nil:
			rep.Deleted += len(muts)
			return nil
		case errors.Is(err, errAmbiguous):
			unsure = true
		case conflict(err):
			// At least one entity changed since the read. The commit was
			// refused from that entity on, but the deletes ahead of it may
			// have been applied: read the candidates again.
			unsure = true
		default:
			rep.Errors += len(cands)
			return err
		}
		pending = cands
	}
}

// lookupMany reads keys (at most 1000), following deferred keys, and returns
// the found entities by key name and the server's read time.
func (b *Backend) lookupMany(ctx context.Context, keys []*pb.Key) (map[string]*pb.EntityResult, time.Time, error) {
	found := make(map[string]*pb.EntityResult, len(keys))
	var readTime time.Time
	for len(keys) > 0 {
		res, err := read(ctx, b, "cleanup: lookup", func(ctx context.Context, c pb.DatastoreClient) (*pb.LookupResponse, error) {
			return c.Lookup(ctx, &pb.LookupRequest{ProjectId: b.project, DatabaseId: b.database, Keys: keys})
		})
		if err != nil {
			return nil, time.Time{}, err
		}
		for _, er := range res.GetFound() {
			found[er.GetEntity().GetKey().GetPath()[0].GetName()] = er
		}
		// With deferred keys the reads may span several read times; the
		// earliest is the safe one to judge expiry by.
		if rt := serverTime(res.GetReadTime()); readTime.IsZero() || rt.Before(readTime) {
			readTime = rt
		}
		keys = res.GetDeferred()
	}
	return found, readTime, nil
}
