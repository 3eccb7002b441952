// Package mclock keeps Weak locks in memcached. It implements
// locking.Backend with github.com/bradfitz/gomemcache.
//
// # Guarantees: efficiency only
//
// A Weak lock stops two instances from doing the same work at once while
// memcached keeps the lock's item. memcached may lose it: a restart, an
// eviction under memory pressure, a node replaced by Memorystore. Then a
// second owner can acquire the lock while the first still works; the first
// learns it at its next renewal (every third of the lease), when Renew
// returns locking.ErrNotHeld and the lock's Done channel closes. Use Weak
// locks where overlapping work is wasteful but harmless; use a Strong lock
// where it would be wrong.
//
// # Operations and round trips
//
// Each lock is one item, created only by add (which fails if the item
// exists) and changed only by cas (which fails if the item changed since it
// was read), so no check-then-write race exists anywhere:
//
//   - Acquire: incr on the fence counter (the token), then add of the lock
//     item with the lease as expiry. 2 round trips; 3 on an id's first use
//     (the counter is created). When add finds an item: gets, then a cas
//     that replaces a release tombstone or a holder older than StealAfter
//     (4 round trips), or a busy answer (3).
//   - Renew: gets, owner check, cas with the new expiry: 2 round trips.
//   - Release: gets, owner check, cas to a tombstone: 2 round trips.
//     memcached's delete takes no cas, so a delete after the owner check
//     could delete a lock stolen in between; the cas cannot.
//
// A command whose reply is lost (timeout, reset connection) is sent again,
// and a write that then conflicts is resolved by reading the item: an add
// or cas of ours that landed is recognised by our owner in the item; a
// release that landed by its tombstone, or, when another owner acquired the
// lock in between, by the new holder's record, which names the token of the
// last release before it. So a release that happened is not reported as
// ErrNotHeld, and one that did not (the lock was stolen or expired first)
// is.
//
// # Clocks
//
// memcached's own clock decides when a lease ends. Its expiry field is
// whole seconds on a clock that ticks once a second, so an item stored with
// expiry n vanishes anywhere from n-1 to n seconds later (measured on
// memcached 1.6.18: 0.11 to 0.96 s for n = 1). Leases are therefore rounded
// up to whole seconds plus one: a lock is held for at least its lease and at
// most two seconds longer. A lease is never sent as 0 ("never expires") or
// below (already expired), which is what truncating 999 ms gives; 1 ns is
// held for one to two seconds.
//
// Leases and StealAfter are at most locking.MaxLease (a day): a request
// beyond it, or otherwise refused by locking.Request.Validate, fails with an
// error wrapping ErrInvalidRequest and locking.ErrInvalid before any
// command. A day is far under memcached's 30-day limit of relative expiries
// (longer ones would be sent as absolute Unix times from this machine's
// clock, capped at January 2038), and the arithmetic on stored leases
// saturates rather than wraps around. StealAfter of 1 ns steals a lock not
// renewed within 1 ns on the taker's clock.
//
// StealAfter and Grant.Remaining compare the acquire or renewal time that
// the holder wrote into the item with the taker's wall clock: memcached does
// not tell an item's age. Clock skew between instances shifts StealAfter by
// the skew (Cloud Run instances keep NTP time, typically within
// milliseconds); no margin is applied, as a steal that comes a little early
// costs a Weak lock only some duplicated work. Remaining is an estimate for
// scheduling retries.
//
// # Fencing tokens
//
// Tokens come from a per-id counter item (incr). Acquire draws one before
// writing the lock item; when the item it then replaces (a tombstone or a
// stolen holder's) carries a token as high, someone was granted the lock in
// between, and Acquire draws a new token before its cas, so tokens increase
// in the order the lock is granted. It lives 7 days from its
// creation and, like any item, can be evicted or lost on restart; it is then
// created again holding the current time in microseconds, so tokens usually
// keep increasing across such a reset. That depends on the instances'
// clocks and is not a guarantee, which is one more reason why Weak locks are
// for efficiency only.
//
// Grant.TookOver is true for a steal, and for an acquisition that finds
// neither a lock item nor a release tombstone while the fence counter
// exists, that is, when the previous lease ran out. It is best effort: after
// an eviction it may be wrong.
//
// # Keys
//
// Ids are hashed, so any id works and keys stay short and legal (at most
// 250 bytes, no spaces or control characters): the lock item is
// Prefix+"lock:"+H and the counter Prefix+"fence:"+H, where H is the
// unpadded base64url SHA-256 of the id (43 bytes) and Prefix defaults to
// "taskguard:". A lock item holds "1 <token> <time µs> <lease µs> <owner>",
// or "2 <token> <time µs> <lease µs> <released> <owner>" when the lock was
// acquired over a release tombstone (released is the tombstone's token;
// versions before the second form read such an item as foreign, held since
// the epoch); after a release it holds "released <token>" for 7 days.
//
// With several servers, gomemcache spreads keys over them by hash: every
// instance must list the same servers in the same order, or two instances
// may look for one lock on different servers.
//
// # Context and errors
//
// gomemcache takes no context: ctx is checked before every command, and the
// client's Timeout (DefaultTimeout from FromEnv) bounds each command.
// Network errors are retried up to three times with backoff while ctx
// allows; a retried write is made safe by re-reading the item.
//
// # Configuration
//
// Importing this package registers FromEnv with locking.RegisterProvider,
// so locking.Default keeps Weak locks in memcached when MEMCACHE_SERVERS is
// set:
//
//	MEMCACHE_SERVERS      comma-separated host:port, e.g. 10.0.0.3:11211
//	MEMCACHE_TIMEOUT      per-command timeout, a Go duration (default 500ms)
//	MEMCACHE_LOCK_PREFIX  key prefix (default "taskguard:")
//
// Memorystore for Memcached is reached from Cloud Run through Direct VPC
// egress or a Serverless VPC Access connector; it takes no new instances
// from 2027 and shuts down in 2029, so new deployments should prefer
// Memorystore for Valkey with package redislock.
//
// Tests can start a real memcached with package mctest.
package mclock
