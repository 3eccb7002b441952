package dslock

import (
	"context"
	"errors"
	"fmt"
	"unicode/utf8"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking"
)

// errContended is returned by Renew and Release when the entity changed under
// every one of maxWrites conditional writes while still naming the caller as
// owner (a caller renewing one holding from several goroutines at once), or
// when the store kept answering ABORTED (contention) to the writes or reads
// of one call. Acquire reports the lock as not acquired instead.
var errContended = errors.New("dslock: lock entity kept changing")

// maxWrites bounds the conditional writes of one call when other writers
// keep winning; Acquire then reports the lock as not acquired.
const maxWrites = 4

// validate refuses what no Backend serves: it wraps locking.ErrInvalid. A
// request (Acquire, Renew) must pass locking.Request.Validate (non-empty id
// and owner, 0 < Lease <= locking.MaxLease, 0 <= StealAfter <=
// locking.MaxLease); every owner must be UTF-8, as Datastore strings are.
func validate(id, owner string, r *locking.Request) error {
	if r != nil {
		if err := r.Validate(); err != nil {
			return fmt.Errorf("dslock: %w", err)
		}
	}
	switch {
	case id == "":
		return fmt.Errorf("dslock: %w: empty id", locking.ErrInvalid)
	case owner == "" || !utf8.ValidString(owner):
		return fmt.Errorf("dslock: %w: owner %q is empty or not UTF-8", locking.ErrInvalid, owner)
	}
	return nil
}

// Acquire takes the lock for r.Owner when no entity exists for r.ID, when the
// stored lease has expired, or when r.StealAfter > 0 and the holder has not
// acquired or renewed within it (see the package documentation for whose
// clock judges this). It implements locking.Backend.
//
// A free lock costs one RPC: a non-transactional commit inserting the
// entity, which fails with AlreadyExists when it exists. A held lock is then
// read (2 RPCs); after that, this Backend remembers the id as held and the
// next Acquire of it reads first, so a poll of a held lock costs 1 RPC and a
// takeover 2 (read, then an update conditional on the version read). It
// keeps reading first while it holds such a lock and for a minute after
// releasing it, so that it never sends an Insert that fails on the next
// holder's entity (see the package documentation).
//
// Contention is answered with a fresh read: a write refused with Aborted is
// not sent again as it was. When every write of the call meets contention
// (at most 5), or the store answers Aborted to 5 reads in a row, Acquire
// returns a Grant with Acquired false and a nil error: the lock is busy, and
// the caller's waiting (locking.Client's backoff, within its MaxWait)
// decides whether to try again.
//
// Two takers of one expired lock cannot both win: each update is
// conditional on the version both read, and only the first commit keeps it.
// When a write's outcome is unknown (timeout, lost connection), Acquire reads
// the entity back and reports success only when it names r.Owner. If ctx
// ends while such a write is unresolved, Acquire reads back on a short
// detached context and deletes the entity if the write did land, so no lock
// is left held for a caller that was told it failed; it then returns an
// error wrapping ctx's error.
func (b *Backend) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := validate(r.ID, r.Owner, &r); err != nil {
		return locking.Grant{}, err
	}
	if ctx.Err() != nil {
		return locking.Grant{}, ctxErr(ctx, "acquire")
	}
	k := b.key(r.ID)
	name := k.GetPath()[0].GetName()
	create := !b.hints.expectHeld(name)
	unsure := false   // a write of ours may have applied unseen
	var lastErr error // why the last write failed, if it did not conflict
	for writes := 0; ; writes++ {
		if create {
			res, err := b.commit(ctx, "acquire", &pb.Mutation{Operation: &pb.Mutation_Insert{Insert: b.entity(k, r.ID, r.Owner, r.Lease, 0)}})
			switch {
			case err == nil:
				b.held.put(name, r.Owner, holding{version: int64(version(res)), token: version(res), origin: version(res)}, r.Lease)
				return locking.Grant{Acquired: true, Token: version(res)}, nil
			case errors.Is(err, errAmbiguous):
				unsure, lastErr = true, err
			case status.Code(err) == codes.AlreadyExists, status.Code(err) == codes.Aborted:
				// Held, or being written by another: read it.
			default:
				return locking.Grant{}, b.abandon(ctx, k, r.Owner, unsure, err)
			}
		}

		asked := b.now()
		rec, found, readTime, err := b.lookup(ctx, "acquire", k)
		if errors.Is(err, errContended) && !unsure {
			// The store keeps answering ABORTED: busy, as a held lock is.
			b.hints.held(name, 0)
			return locking.Grant{}, nil
		}
		if err != nil {
			return locking.Grant{}, b.abandon(ctx, k, r.Owner, unsure, err)
		}
		if found && rec.owner == r.Owner {
			// Only a write of ours stores our owner token: one whose
			// response was lost, or an earlier Acquire with this owner.
			// A takeover, unlike an Insert, stored an incarnation older
			// than its own token.
			b.held.put(name, r.Owner, holding{version: rec.version, token: rec.fencing(), origin: rec.incarnation()}, r.Lease)
			return locking.Grant{Acquired: true, Token: rec.fencing(), TookOver: rec.incarnation() != rec.fencing()}, nil
		}
		if !found {
			if writes >= maxWrites {
				if lastErr == nil { // others keep creating and deleting it
					return locking.Grant{}, nil
				}
				// Free, yet creates keep failing: a fault, not contention.
				return locking.Grant{}, fmt.Errorf("dslock: acquire %q: lock is free but could not be created: %w", r.ID, lastErr)
			}
			create = true
			continue
		}
		a := b.judge(rec, readTime)
		stealable := r.StealAfter > 0 && a.since >= r.StealAfter
		if (a.remaining > 0 && !stealable) || writes >= maxWrites {
			b.hints.held(name, a.remaining)
			return locking.Grant{Remaining: max(a.remaining, 0), Age: holdAge(rec, readTime, asked)}, nil
		}
		// The takeover keeps the entity's incarnation: it replaces the
		// holder without a delete.
		res, err := b.commit(ctx, "take over", conditional(&pb.Mutation{Operation: &pb.Mutation_Update{Update: b.entityOf(k, r.ID, r.Owner, r.Lease, 0, rec.incarnation())}}, rec.version))
		switch {
		case err == nil:
			b.held.put(name, r.Owner, holding{version: int64(version(res)), token: version(res), origin: rec.incarnation()}, r.Lease)
			return locking.Grant{Acquired: true, Token: version(res), TookOver: true}, nil
		case errors.Is(err, errAmbiguous):
			unsure, lastErr = true, err
		case conflict(err):
			// Another writer changed or deleted the entity since our read:
			// read again and judge afresh.
		default:
			return locking.Grant{}, b.abandon(ctx, k, r.Owner, unsure, err)
		}
		create = false
	}
}

// abandon returns err after making sure that an unresolved write of owner
// (unsure) did not leave the lock held for a caller about to be told that
// Acquire failed: it reads the entity on a detached context bounded by the
// RPC timeout and deletes it, conditionally, if it names owner.
func (b *Backend) abandon(ctx context.Context, k *pb.Key, owner string, unsure bool, err error) error {
	if !unsure {
		return err
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.timeout)
	defer cancel()
	b.held.drop(k.GetPath()[0].GetName(), owner, holding{})
	rec, found, _, lerr := b.lookup(dctx, "acquire: undo", k)
	if lerr != nil || !found || rec.owner != owner {
		return err
	}
	if _, derr := b.commit(dctx, "acquire: undo", conditional(&pb.Mutation{Operation: &pb.Mutation_Delete{Delete: k}}, rec.version)); derr != nil {
		// The lock stays held until its lease expires.
		return fmt.Errorf("%w (and the lock it may hold could not be released: %v)", err, derr)
	}
	return err
}

// Renew extends the lease of r.Owner's holding of r.ID to r.Lease from now,
// judged as at acquisition. It returns the fencing token of the acquisition,
// and an error wrapping locking.ErrNotHeld when the entity is gone or names
// another owner. A lease that expired but was not taken over or cleaned up
// is still r.Owner's and is renewed. Under contention (the entity kept
// changing under 5 conditional writes, or the store kept answering Aborted)
// it returns an error, not ErrNotHeld: the caller may renew again later. It
// implements locking.Backend.
//
// When this Backend made the last write of the holding (the acquisition or
// the previous renewal), Renew sends the update conditional on that write's
// version at once: 1 RPC. Otherwise, or when that version is no longer
// current or the write's outcome is unknown, it reads the entity and updates
// it conditionally on the version read: 2 RPCs (3 after a failed direct
// write).
func (b *Backend) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := validate(r.ID, r.Owner, &r); err != nil {
		return locking.Grant{}, err
	}
	if ctx.Err() != nil {
		return locking.Grant{}, ctxErr(ctx, "renew")
	}
	k := b.key(r.ID)
	name := k.GetPath()[0].GetName()
	if h, ok := b.held.get(name, r.Owner); ok {
		// The entity is still at h.version only if no write followed ours,
		// so it still names r.Owner with token h.token.
		res, err := b.commit(ctx, "renew", conditional(&pb.Mutation{Operation: &pb.Mutation_Update{Update: b.entityOf(k, r.ID, r.Owner, r.Lease, h.token, h.origin)}}, h.version))
		switch {
		case err == nil:
			b.held.put(name, r.Owner, holding{version: int64(version(res)), token: h.token, origin: h.origin}, r.Lease)
			return locking.Grant{Acquired: true, Token: h.token}, nil
		case errors.Is(err, errAmbiguous), conflict(err):
			// Read and decide below.
			b.held.drop(name, r.Owner, h)
		default:
			return locking.Grant{}, err
		}
	}
	var last error // the last write's failure
	for writes := 0; ; writes++ {
		rec, found, _, err := b.lookup(ctx, "renew", k)
		if err != nil {
			return locking.Grant{}, err
		}
		if !found || rec.owner != r.Owner {
			b.held.drop(name, r.Owner, holding{})
			return locking.Grant{}, fmt.Errorf("dslock: renew %q: %w", r.ID, locking.ErrNotHeld)
		}
		if writes >= maxWrites {
			return locking.Grant{}, contendedErr("renew", r.ID, last)
		}
		token, origin := rec.fencing(), rec.incarnation()
		res, err := b.commit(ctx, "renew", conditional(&pb.Mutation{Operation: &pb.Mutation_Update{Update: b.entityOf(k, r.ID, r.Owner, r.Lease, token, origin)}}, rec.version))
		switch {
		case err == nil:
			b.held.put(name, r.Owner, holding{version: int64(version(res)), token: token, origin: origin}, r.Lease)
			return locking.Grant{Acquired: true, Token: token}, nil
		case errors.Is(err, errAmbiguous), conflict(err):
			// Read again: if it is still ours (our own write landed
			// unseen), renew once more; if not, report it lost.
			last = err
		default:
			return locking.Grant{}, err
		}
	}
}

// Release deletes the entity of id if, and only if, it names owner. It
// returns an error wrapping locking.ErrNotHeld when the entity is gone or
// names another owner, and never deletes another owner's entity; under
// contention (as for Renew) it returns another error and the lock stays
// held until its lease ends. It implements locking.Backend.
//
// A delete whose outcome is unknown (timeout, lost connection) is resolved
// by reading the entity back. Still owner's: the delete did not land, and is
// sent again. Another owner's entity of the same incarnation (see the package
// documentation): it was taken over, never deleted, so the delete did not
// land either and the lock was lost: ErrNotHeld. Gone, or created anew since:
// the delete is taken to have landed, and Release returns nil. (That is
// wrong only if, between the delete and the read-back, the lock expired or
// was stolen and the new holder's entity was deleted too; the lock is free
// or another's then, as after a release.)
//
// When this Backend made the last write of the holding, Release sends the
// delete conditional on that write's version at once: 1 RPC. Otherwise, or
// when that version is no longer current or the delete's outcome is
// unknown, it reads the entity and deletes it conditionally on the version
// read: 2 RPCs (3 after a failed direct delete, 2 when that read finds the
// lock no longer ours).
func (b *Backend) Release(ctx context.Context, id, owner string) error {
	if err := validate(id, owner, nil); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return ctxErr(ctx, "release")
	}
	k := b.key(id)
	name := k.GetPath()[0].GetName()
	unsure := false // a delete of ours may have landed unseen
	var mine uint64 // incarnation of owner's holding, once known
	var last error  // the last delete's failure
	if h, ok := b.held.get(name, owner); ok {
		mine = h.origin
		_, err := b.commit(ctx, "release", conditional(&pb.Mutation{Operation: &pb.Mutation_Delete{Delete: k}}, h.version))
		switch {
		case err == nil:
			b.held.drop(name, owner, holding{})
			b.hints.released(name)
			return nil
		case errors.Is(err, errAmbiguous):
			unsure, last = true, err
		case conflict(err):
			last = err
		default:
			return err
		}
		b.held.drop(name, owner, h)
	}
	for writes := 0; ; writes++ {
		rec, found, _, err := b.lookup(ctx, "release", k)
		if err != nil {
			return err
		}
		if !found || rec.owner != owner {
			b.held.drop(name, owner, holding{})
			if !unsure {
				return fmt.Errorf("dslock: release %q: %w", id, locking.ErrNotHeld)
			}
			if found && mine != 0 && rec.incarnation() == mine {
				return fmt.Errorf("dslock: release %q: %w (taken over before the delete landed)", id, locking.ErrNotHeld)
			}
			return nil
		}
		mine = rec.incarnation()
		if writes >= maxWrites {
			return contendedErr("release", id, last)
		}
		_, err = b.commit(ctx, "release", conditional(&pb.Mutation{Operation: &pb.Mutation_Delete{Delete: k}}, rec.version))
		switch {
		case err == nil:
			b.held.drop(name, owner, holding{})
			b.hints.released(name)
			return nil
		case errors.Is(err, errAmbiguous):
			unsure, last = true, err
		case conflict(err):
			last = err
		default:
			return err
		}
	}
}

// contendedErr is the error of a Renew or Release of id that gave up after
// maxWrites conflicting writes; last, the final write's failure, is wrapped
// too, so that status.Code reads ABORTED when the store answered that.
func contendedErr(op, id string, last error) error {
	if last == nil {
		return fmt.Errorf("dslock: %s %q: %w", op, id, errContended)
	}
	return fmt.Errorf("dslock: %s %q: %w (last write: %w)", op, id, errContended, last)
}

func version(res *pb.CommitResponse) uint64 {
	return uint64(res.GetMutationResults()[0].GetVersion())
}
