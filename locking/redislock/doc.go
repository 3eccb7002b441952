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
// Each operation is one Lua script, which the server runs atomically: one
// round trip (two when the server does not have the script cached yet,
// after a restart or failover: EVALSHA answers NOSCRIPT and the source is
// sent with EVAL).
//
//   - Acquire: if the lock key is free (absent or expired), or its holder
//     has not acquired or renewed it within StealAfter, issue a token and
//     SET the key with PX lease; otherwise answer busy with the key's PTTL
//     as Grant.Remaining.
//   - Renew: if owner holds the key, SET it again with PX lease.
//   - Release: if owner holds the key, DEL it.
//
// # Clocks
//
// Only the server's clock counts: its key expiry ends leases, and its TIME
// dates acquisitions and renewals for StealAfter. Instances' clocks are
// never compared. Leases are sent in milliseconds, rounded up.
//
// # Fencing tokens
//
// A fence key per id records the last token, whether that holding was
// released, and its owner; it lives a day past the lease. A new token is the
// larger of the last token plus one and the server's time in microseconds.
// Tokens strictly increase while the fence key lasts, and still increase
// when it was lost to a restart, an eviction or a failover to a stale
// replica, provided the server's clock has not gone back. That is not a
// guarantee; Weak locks are for efficiency only.
//
// Grant.TookOver is true for a steal and when the fence key shows that the
// previous holding was never released (its lease ran out).
//
// # Keys
//
// Ids are hashed, so any id works: the lock is Prefix+"{"+H+"}:lock" and
// the fence Prefix+"{"+H+"}:fence", where H is the unpadded base64url
// SHA-256 of the id and Prefix defaults to "taskguard:". The braces are a
// cluster hash tag: both keys of an id live in one slot, as a script that
// touches both requires in cluster mode. The lock holds
// "<token> <time µs> <owner>", the fence "<token> <h|r> <owner>".
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
