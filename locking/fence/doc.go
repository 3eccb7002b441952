// Package fence makes a write conditional on a lock's fencing token, so
// that a holder that lost its lock without knowing it — an instance frozen
// past its lease, as Cloud Run does to an instance once its answer is sent —
// cannot land a write after the next holder's.
//
// A fence belongs to the resource, not to the lock: it remembers which lock
// id guards the resource and the highest token it has accepted, and it
// refuses a lower token. Check it in the same transaction as the write it
// guards; a refused check aborts the transaction, so the write never lands.
// The stores are in subpackages: dsfence for Cloud Datastore (Firestore in
// Datastore mode), sqlfence for PostgreSQL through database/sql, redisfence
// for a fenced SET on Valkey and Redis. This
// package holds what they share: the Token value, the rule (State.Admit)
// and the errors.
//
// Tokens of one lock id must all come from the same store: a Strong lock's
// tokens are not comparable with a Weak lock's, and a fence fed both would
// refuse at random. Tokens equal to the highest accepted are accepted: a
// holder writes as often as it likes during its holding.
package fence
