// Package redislock keeps Weak locks in Valkey or Redis (Memorystore for
// Valkey, Memorystore for Redis, or any server speaking the Redis protocol
// with Lua scripting). It implements locking.Backend with
// github.com/redis/go-redis/v9.
//
// # Why go-redis
//
// go-redis is maintained by Redis, works with Valkey, and was already a
// dependency of this module. It offers everything this package needs: Lua
// scripts run by digest with a fallback to the source (Script.Run),
// cluster, TLS, and a per-connection credentials callback for the rotating
// access tokens of Memorystore IAM authentication. valkey-go would add a
// dependency whose strengths (client-side caching, automatic pipelining) do
// nothing for one script call per operation.
//
// # Guarantees: efficiency only
//
// A Weak lock stops two instances from doing the same work at once while
// the server keeps the lock's key. The server may lose it:
//
//   - A restart without persistence, or a failover to a replica. Redis and
//     Valkey replicate asynchronously, so a lock acquired just before the
//     primary failed may be missing on the promoted replica, and a second
//     owner can acquire it while the first still works. The first learns it
//     at its next renewal (every third of the lease), when Renew returns
//     locking.ErrNotHeld and the lock's Done channel closes.
//   - Eviction under memory pressure. Lock keys always have a TTL, so the
//     volatile-* and allkeys-* maxmemory policies may evict them; prefer
//     noeviction for an instance that holds locks.
//
// This package deliberately does not implement Redlock over several
// independent servers: it does not make the lock safe for correctness
// either. Use Weak locks where overlapping work is wasteful but harmless;
// use a Strong lock where it would be wrong.
//
// # Operations and round trips
//
// Each operation is one Lua script on one key, which the server runs
// atomically: one round trip (two when the server does not have the script
// cached yet, after a restart or failover: EVALSHA answers NOSCRIPT and the
// source is sent with EVAL). The commands each script runs:
//
//   - Acquire: GET, TIME and SET when the lock is free (never held or
//     released); GET and PTTL when it is held, and then TIME and SET when it
//     takes over (the holder's lease ran out, or it has not acquired or
//     renewed for more than StealAfter). When busy, Grant.Remaining is the
//     holder's remaining lease. The first Acquire turned away by a holding
//     also marks it as waited for (SETRANGE).
//   - Renew: GET, PTTL and SET, if owner holds the lock.
//   - Release: GET, PTTL and SETRANGE (which marks the record released in
//     place, keeping its TTL), if owner holds the lock, and PUBLISH when a
//     waiter was turned away; GET alone (or GET and PTTL) when it does not.
//
// # Announced releases
//
// Backend is a locking.Notifier: the release of a holding that a waiter was
// turned away from is published on the id's channel (ReleaseChannel), and
// Watch wakes the waiting locking client at once, in any process. A process
// subscribes once per waited id, on one pub/sub connection per Backend that
// is closed when nothing is waited for; its local waiters share it, since
// only one of them polls. Pub/sub delivers at most once and nothing while a
// connection is down, so the client still polls every locking.SafetyPoll
// (2 to 3 s) and when the holder's lease runs out: a lost announcement, a
// reconnect, a restart or a failover delays a hand-off, never loses it. A
// (re)subscription also wakes the waiter. In a cluster PUBLISH reaches every
// node. A client without Subscribe (a bare redis.Scripter) makes Watch fail
// with ErrNoPubSub, and waiters poll.
//
// An uncontended acquire and release thus costs two round trips and six
// commands on the server, against two and three for github.com/bsm/redislock,
// which keeps no fencing counter and no record of past holdings
// (BenchmarkAcquireRelease measures both).
//
// # Ambiguous outcomes
//
// go-redis retries a command whose connection broke (its MaxRetries), also
// after the server ran the script and only the reply was lost. The scripts
// make such retries harmless:
//
//   - an Acquire retried by the owner it already granted the lock to renews
//     that holding and returns its token;
//   - a Release retried after its first attempt released the lock returns
//     nil, also if other owners acquired the id in the meantime: each
//     Release call draws a nonce, and the record keeps the nonces of the
//     last four calls that released a holding of the id (so fewer than four
//     other releases may come in between). It returns ErrNotHeld only when
//     the owner's holding ended otherwise: its lease ran out, it was taken
//     over, or another, earlier Release call released it.
//
// An Acquire whose caller gave up before the reply came (its context ended)
// may still have been granted; Release with the same owner gives it back.
//
// # Clocks
//
// Only the server's clock counts: the record's TTL (PTTL) tells whether a
// lease has run out, how much of it remains and how long ago the holder last
// acquired or renewed it; TIME is read only to issue a token. Instances'
// clocks are never compared. Leases and StealAfter are sent in whole
// milliseconds, rounded up, never down to zero. A lease of L ms holds at
// least L ms, like a key set with PX L: a lease of 1 ns holds 1 to 2 ms.
// StealAfter S (S ms rounded up) steals a holding once the server's clock
// shows more than S whole milliseconds since its last acquire or renewal:
// between S and S + 2 ms after it, never before. StealAfter of 1 ns thus
// steals 1 to 2 ms after the last acquire or renewal; it never means "do
// not steal".
//
// # Fencing tokens
//
// The record of an id keeps the last token issued for it; it outlives every
// holding by a day (it expires a day after the last lease ran out, or would
// have run out had it not been released). A new token is the larger of the
// last token plus one and the server's time in microseconds. Tokens
// strictly increase while the record lasts, and still increase when it was
// lost to a restart, an eviction or a failover to a replica that missed the
// latest writes, provided the server's clock has not gone back. That is not
// a guarantee; Weak locks are for efficiency only.
//
// Grant.TookOver is true for a steal and when the record shows that the
// previous holding was never released (its lease ran out).
//
// # Keys
//
// Ids are hashed, so any id works: the record of an id is the string key
// Prefix+"{"+H+"}:lock", where H is the unpadded base64url SHA-256 of the
// id and Prefix defaults to "taskguard:". The braces are a cluster hash tag,
// so that anything else a later version keeps for an id shares its slot. The
// record is "<h|r><4 release nonces> <token> <lease ms> <owner>", fixed width
// up to the owner (1 + 48 + 1 + 16 + 1 + 9 + 1 bytes): whether the last
// holding is out (h) or was released (r), the nonces of the last four
// Release calls that released a holding, its token, its last lease, and its
// owner. Its TTL is the lease plus a day from the last acquire or renewal;
// a release leaves it as it is.
//
// Versions before this layout kept "<token> <µs> <owner>" under the same key
// (with the lease as TTL) and the fence in a second key, "...}:fence". While
// both run (a rolling update), this version reads a holding of the earlier
// one as busy until it expires, and the earlier one reads this version's
// records as busy (for up to a day after the released lease would have run
// out) unless it steals them with StealAfter; fencing tokens keep growing
// across the change, as both floor them with the server's time in
// microseconds.
//
// # Configuration
//
// Importing this package registers FromEnv with locking.RegisterProvider,
// so locking.Default keeps Weak locks in Valkey when VALKEY_ADDR or
// REDIS_ADDR is set:
//
//	VALKEY_ADDR, REDIS_ADDR          host:port, or redis://[user:pass@]host:port[/db],
//	                                 or rediss://... for TLS
//	VALKEY_PASSWORD, REDIS_PASSWORD  AUTH password (Memorystore: the auth token)
//	VALKEY_USERNAME, REDIS_USERNAME  ACL user name
//	VALKEY_TLS=true                  TLS (Memorystore in-transit encryption)
//	VALKEY_TLS_CA_FILE               PEM file of the server's CA (Memorystore's
//	                                 certificate authority); default: system roots
//	VALKEY_CLUSTER=true              cluster protocol (Memorystore for Valkey in
//	                                 cluster mode; the address is the discovery endpoint)
//	VALKEY_IAM_AUTH=true             authenticate with the service account's OAuth
//	                                 access token (needs roles/memorystore.dbConnectionUser);
//	                                 connections are renewed every 30 minutes so the
//	                                 one-hour tokens stay fresh
//	VALKEY_LOCK_PREFIX               key prefix (default "taskguard:")
//
// Cloud Run reaches Memorystore through Direct VPC egress or a Serverless
// VPC Access connector.
//
// Tests can start a real redis-server with package redistest.
package redislock
