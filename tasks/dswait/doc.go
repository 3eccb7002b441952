// Package dswait keeps the wait lists of park mode (tasks.WithParking) in
// Firestore in Datastore mode, beside the locks of locking/dslock.
//
// # Layout
//
// Every entity is a root entity (no entity groups: writes for different
// waiters never conflict), in the List's namespace:
//
//   - KindRecord, one per waiter key and lock id (named by the hex SHA-256
//     of both): its state (waiting, running and by which runner, finished),
//     job, arrival and its body (up to 32 KiB; a larger one is kept apart);
//     while it waits, an indexed
//     property q (the lock id's hash, the arrival in nanoseconds, the hex
//     key) places it in its lock id's FIFO: the oldest waiter is a query of
//     that range ordered by q, one inequality and one order on one
//     property, served by the built-in indexes (no index.yaml). Lock ids are
//     spread over the index by their hash.
//   - KindBody, a body over 32 KiB in parts of at most 900,000 bytes,
//     written before the record that names it (a failure leaves unnamed
//     parts, never a record without its body), deleted when the task
//     finishes.
//   - KindRun, one per runner that claimed a record and has not finished it
//     (what a retry of that runner runs again).
//   - KindWake, at most one per lock id and kind (hand-off, safety): it
//     exists while the wake is pending. Arming inserts it (an insert that
//     fails when it exists decides between concurrent arms, with no
//     transaction); taking it deletes it in a transaction that checks its
//     generation.
//
// Park inserts the record with one non-transactional insert of one entity
// (all or nothing; the insert fails when the key has a record, which is then
// read); Claim, TakeClaim and Finish are transactions on the record, the run
// (and the wake), tried again after a conflict or an ABORTED answer (up to
// 40 attempts, with jittered pauses that double up to 500 ms).
//
// # Cost (Datastore RPCs; a transaction is 3: begin, lookup, commit)
//
// Counted at the wire by TestCost:
//
//   - Park: 1 insert (1 commit more for a body kept apart; for a key that
//     has a record the insert fails and 1 lookup reads it), then the safety
//     wake: 1 query and 1 lookup sent together, and 1 insert when it arms
//     one. A new waiter behind a pending safety wake: 3 RPCs in 2 round
//     trips.
//   - Peek: 1 query, and 1 lookup for a key, sent together.
//   - Arm: 1 query and 1 lookup sent together, 1 insert when it arms.
//   - TakeClaim (a wake's turn: its take and its claim): a transaction (and
//     1 lookup of a body kept apart).
//   - Take, Disarm: a transaction.
//   - Claim: a transaction (and 1 lookup of a body kept apart).
//   - Running: 1 lookup (2 for a body kept apart).
//   - Finish: a transaction (and 1 delete of a body kept apart).
//
// # Garbage collection
//
// Every entity has an unindexed expiresAt: FinishedRetention after a record
// finished, MaxWait after the last write otherwise. A TTL policy on
// expiresAt for each of Kinds deletes them (deploy/02-datastore.sh sets
// them). TTL is garbage collection only, never a correctness mechanism: a
// record's state is read, never inferred from expiresAt.
package dswait
