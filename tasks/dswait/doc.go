// Package dswait keeps the wait lists of park mode (tasks.WithParking) in
// Firestore in Datastore mode, beside the locks of locking/dslock.
//
// # Layout
//
// Every lock id has an entity group, the ancestor key
// (KindList, hex SHA-256 of the lock id), that need not exist as an entity.
// Under it:
//
//   - one KindWaiter entity per waiting delivery, named by its arrival
//     (zero-padded Unix nanoseconds) and its hex-encoded key, so that key
//     order is FIFO order; it holds the waiter's key, arrival and task body
//     (unindexed) and exists only while the waiter waits;
//   - one KindState entity per waiter key (named by the hex SHA-256 of the
//     key) holding the record's state (waiting, running and by which runner,
//     finished), the name of its KindWaiter entity, and expiresAt.
//
// Oldest is an ancestor query (strongly consistent, served by the built-in
// indexes: no index.yaml) on KindWaiter with limit 1. Park creates both
// entities in one commit of insert mutations; Claim and Finish are
// transactions on the KindState entity (and the KindWaiter entity), tried
// again after a conflict (up to 12 attempts, with jittered pauses).
//
// # Cost (Datastore RPCs, each a round trip)
//
//   - Park: 1 lookup, then, when the key is new, 1 commit (2 inserts).
//   - Oldest: 1 query reading at most 1 entity.
//   - State: 1 lookup.
//   - Claim, Finish: a transaction of 1 lookup and 1 commit (a Coalesce
//     record is deleted by its Claim).
//
// # Garbage collection
//
// expiresAt is set on every KindState entity: FinishedRetention after a
// record finished, MaxWait after it was parked or claimed (a record stuck
// that long is abandoned). A TTL policy on expiresAt for the collection
// group KindState deletes them (gcloud firestore fields ttls update
// expiresAt --collection-group=TaskguardWaitState --enable-ttl); KindWaiter
// entities are deleted when claimed. TTL is garbage collection only, never a
// correctness mechanism: a record's state is read, never inferred from
// expiresAt.
package dswait
