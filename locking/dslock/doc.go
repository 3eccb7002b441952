// Package dslock stores Strong locks in Cloud Datastore (Firestore in
// Datastore mode): a locking.Backend whose locks hold across every instance
// of every function that shares the database.
//
// Importing the package registers it with locking.Default for Strong locks
// when GOOGLE_CLOUD_PROJECT or DATASTORE_EMULATOR_HOST is set; the database,
// namespace and kind then come from TASKGUARD_DATASTORE_DATABASE,
// TASKGUARD_DATASTORE_NAMESPACE and TASKGUARD_DATASTORE_KIND. Or build one with
// New and pass it to locking.New.
//
// # Guarantees
//
// Every operation is a single-entity read or a single non-transactional
// commit whose mutation is either an Insert (fails if the entity exists) or
// conditional on an entity version (base_version with the FAIL conflict
// strategy): the version just read, or the version this Backend's own last
// write of the caller's holding produced. So:
//
//   - at most one owner holds a lock id at a time: a free lock is created by
//     exactly one Insert; an expired or stolen one is taken over by exactly
//     one of any number of concurrent takers (the others' commits fail with
//     FailedPrecondition and they see the lock held);
//   - Renew and Release act only while the entity still names the caller's
//     owner token and has not changed since it was read, or since the
//     caller's own last write of it (versions only grow, so an entity still
//     at that version holds exactly what that write stored): they never
//     extend or delete another owner's lock;
//   - a write whose outcome is unknown (timeout, lost connection) is resolved
//     by reading the entity back: an Acquire or Renew succeeds only when the
//     entity names the caller; a Release succeeds when the entity is gone or
//     was created anew, and reports ErrNotHeld when it names another owner
//     who took it over (same incarnation, see Entities), since the delete
//     cannot have landed then; an Acquire whose caller gave up (ctx ended)
//     deletes the lock it turns out to have written, so nothing is left held
//     for nobody; every entity carries a lease, so no failure leaves one held
//     for ever;
//   - every request is checked with locking.Request.Validate before any RPC:
//     0 < Lease <= locking.MaxLease and 0 <= StealAfter <= locking.MaxLease,
//     or an error wrapping locking.ErrInvalid; the lease is stored in whole
//     milliseconds rounded up (1 ns is held for 1 ms, never 0), and the
//     arithmetic of expiry saturates instead of wrapping around, so no
//     stored or skewed value turns a held lease into an expired one;
//   - transient errors (Unavailable, DeadlineExceeded, ResourceExhausted,
//     Internal) are retried with capped, jittered exponential backoff inside
//     the caller's ctx; each attempt is bounded by Options.RPCTimeout;
//   - contention is answered, not retried blindly: a write refused with
//     Aborted was not applied, and is followed by a fresh read and a write
//     judged on it (a conditional write whose base version went stale fails
//     however often it is sent again); a call that meets contention on every
//     one of its writes (at most 5), or Aborted on 5 reads in a row, ends:
//     Acquire reports the lock as not acquired (busy, as when held), Renew
//     and Release return an error. No call retries a contended entity until
//     its ctx ends.
//
// No transactions are used, so the same code runs on databases in optimistic
// and in pessimistic concurrency mode, and no transaction is ever left open
// (on the Firestore emulator an open transaction stalls later calls).
//
// Round trips: acquiring a free lock is 1 RPC (Insert); a held lock found by
// that Insert costs 1 more (a Lookup, to judge expiry and report how long the
// holder's lease runs). The Backend then remembers the id as held, and each
// further poll starts with the Lookup: 1 RPC while held, 2 when the lock is
// free again (Lookup, Insert) or expired (Lookup, conditional Update). Polls
// read rather than attempt a write, so that waiters never add writes to the
// one entity the holder renews (a store limits sustained writes per entity).
// The Backend keeps reading first after it acquired such a lock, and for a
// minute after it released it: its next Acquire of a lock that was contended
// here reads instead of sending an Insert that would fail on the next
// holder's entity. So a hand-off from one instance to another costs two
// writes on the lock's entity, the holder's Delete and the waiter's Insert,
// and no failed write, however often the lock changes hands; a failed Insert
// remains only where an instance meets a held lock it has not seen for a
// minute (its first try, 2 RPCs).
//
// Renew and Release are 1 RPC each when this Backend made the holding's last
// write (its Acquire or last Renew): it remembers that write's version and
// sends the Update or Delete conditional on it. This memory has no fixed
// cap, so it holds for any number of locks held at once: an entry (about 200
// bytes with its key) lives as long as its holding, and is freed when the
// holding is released or found lost, or a minute after its lease ended
// unrenewed. When nothing is remembered (another Backend acquired or renewed
// with the same owner token, or the holder renewed over a minute late) they
// are 2 (Lookup, conditional Update or Delete); when the remembered version
// is no longer current, or the direct write's outcome is unknown, the read
// follows the failed write: 3, or 2 when that read finds the lock lost.
//
// # Whose clock
//
// Expiry and StealAfter are judged on the server's clock wherever the server
// reports times, as Firestore in Datastore mode does (production and its
// emulator): the entity's update time is the commit time of the last acquire
// or renewal, and the Lookup's read time is "now". A lease has expired when
// readTime - updateTime >= lease. No client clock is read, so no margin is
// needed; the holder measures its lease from before it sends the write, so it
// stops trusting the lock no later than the server deems it expired.
//
// Where the server reports no times (the legacy Datastore emulator returns
// zero times), the writer's clock (the stored renewedAt) is compared with the
// reader's clock (Options.Now), and the skew margin Options.ClockSkew
// (DefaultClockSkew, 2s) is added to every lease and StealAfter: a taker
// whose clock runs up to the margin ahead of the holder's still waits out the
// whole lease.
//
// # Fencing tokens
//
// A holding's token is the entity version returned by the commit that
// acquired it. Datastore documents versions as increasing with every change
// of an entity, and the version reported for a missing entity as above any
// earlier one and below any later one; so tokens increase strictly per id
// across acquire, takeover, release, cleanup and re-creation. Both emulators
// behave so (the legacy one uses a global counter, Firestore in Datastore
// mode commit times in microseconds). Renewals change the version but not the
// token: the first renewal copies the acquisition's version into the token
// property, and Renew returns it.
//
// # Entities
//
// One entity per lock id, of kind Options.Kind (DefaultKind, "TaskguardLock")
// in namespace Options.Namespace of database Options.DatabaseID. Its key name
// is the lower-case hex SHA-256 of the id (see KeyName): no hot-spotting on
// sequential ids, no length limit. Properties:
//
//	id         string     unindexed  the lock id, for people (invalid UTF-8 replaced, cut to 1024 bytes)
//	owner      string     unindexed  the holder's owner token
//	expiresAt  timestamp  unindexed  renewedAt + lease (writer's clock): for a TTL policy and people
//	renewedAt  timestamp  unindexed  writer's clock at the last acquire or renewal
//	leaseMs    integer    unindexed  the lease granted then, in milliseconds (rounded up)
//	token      integer    unindexed  the fencing token, present once the holding was renewed
//	origin     integer    unindexed  the entity's incarnation, present once renewed or taken over
//
// The incarnation of an entity is the token of the holding whose Insert
// created it; takeovers and renewals copy it into origin, a delete ends it
// and the next Insert starts a higher one. Release uses it to tell a lock
// taken over from the caller (same incarnation) from one deleted by the
// caller's own delete and created again (see Backend.Release). An entity
// without origin is its holding's own incarnation.
//
// No property is indexed. Every acquire and renewal writes a later expiresAt;
// were it indexed, its index entries would always be appended at the end of
// one range, which caps a kind at about 500 writes per second across all
// lock ids (the store's guidance on monotonically increasing indexed
// values): 5,000 locks renewed every 10 seconds would reach it. Unindexed,
// a write touches the entity and its key's built-in index entry only, and
// the keys (SHA-256 hashes) are spread evenly. Cleanup scans the kind by
// key; a TTL policy needs no index on its field.
//
// # Cleanup
//
// Released locks are deleted at once; locks whose holders died stay until
// taken over. Backend.Cleanup deletes those whose lease ended more than a
// grace period ago (CleanupOptions.Grace, DefaultCleanupGrace = 15 minutes),
// never a live lease: it pages through a keys-only scan of the kind in key
// order, reads each page, judges each lease as Acquire does, and deletes the
// expired ones with deletes conditional on the version read, so a lock
// renewed or re-acquired in between survives. A run reads every lock entity:
// those held (released locks are deleted at once) and those abandoned. It
// stops when its ctx ends and starts over on the next run; it is idempotent;
// DryRun only counts. Its Report counts each scanned entity once, as live,
// or, expired, as deleted, skipped, failed, or unknown when the run ended
// while its delete was in flight. Each page costs three
// RPCs (query, lookup, commit) and holds up to 500 keys (the legacy emulator
// returns at most 300 per query batch). Run it from a scheduled function,
// daily or hourly.
//
// A Datastore TTL policy may collect expired entities as well (deletion
// happens typically within 24 hours after expiresAt, so it is garbage
// collection, never part of the locking):
//
//	gcloud firestore fields ttls update expiresAt --collection-group=TaskguardLock --enable-ttl
//
// A TTL deletion judges expiresAt on Google's clock against the writer's
// clock; a holder whose clock ran hours behind could lose a live lock to it
// (it would notice at its next renewal).
//
// # Operations
//
// List, Inspect and ForceRelease serve operators (the taskguard command's
// "locks" group): List reads lock entities, held or expired, at most
// ListOptions.Limit per call, and returns the cursor that continues; Inspect
// reads one; ForceRelease deletes one whoever holds it, with a delete
// conditional on the version it read, and reports the deletion's version as
// a fence between the removed holder's token and the next one. The removed
// holder finds out at its next renewal.
//
// # Emulators
//
// Both emulators of the Google Cloud CLI pass the same tests; package dstest
// starts them for tests. They differ where this package is careful: with the
// default conflict strategy the Firestore emulator applies a mutation whose
// base_version is stale (the legacy emulator and the API's documentation say
// it is skipped and flagged), but with the FAIL strategy both refuse it with
// FailedPrecondition, as the API documents for production; so this package
// always uses FAIL. A refused non-transactional commit of several mutations
// is not undone, though: on both emulators the mutations ahead of the refused
// one are applied and the rest are not, and the error names no key. Every
// write of this package but Cleanup's is a single mutation; Cleanup reads
// its page back after such a failure and counts what the store did (see
// Report).
package dslock
