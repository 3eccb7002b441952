// Package locking guards work so that it runs at most once at a time per
// lock id, across every goroutine, instance and function that shares a
// backend.
//
//	err := locking.With(ctx, "user-42", func(ctx context.Context) error {
//		return refreshToken(ctx, 42)
//	})
//
// With acquires the lock, runs the function and releases the lock, also on
// error and panic. Acquire and Lock.Release are the lower-level pair.
//
// # Kinds
//
// Strong locks (the default) are for correctness. Their backend is
// consistent (Cloud Datastore in production, package dslock): while one owner
// holds an id, no other acquisition of it succeeds. Weak locks are for
// efficiency: they keep most duplicate work from overlapping, cheaply
// (memcached, package mclock; Valkey or Redis, package redislock), but a
// restart, eviction or failover of the store can let two owners in. Use Weak
// only where overlapping work is wasteful, not harmful.
//
// # Leases
//
// Every lock has a lease (DefaultLease unless Config.Lease or the Lease
// option says otherwise, at most MaxLease). While the lock is held it is
// renewed in the background every third of the lease, so work may run as
// long as it needs to; if the holder dies, the lease runs out and another
// owner may take the lock over. StealAfter keeps djangae's steal_after_ms
// for callers that want to take over a lock whose holder has not renewed it
// recently.
//
// # The life of a lock
//
// A lock ends with Release, when With's function returns, when the context
// it was acquired with by Acquire ends, or when it is lost. With holds its
// lock for as long as its function runs, never less: when With's context
// ends, the function's context is cancelled but the lock stays held and
// renewed until the function returns, and a warning is logged while it
// overruns. A lock from Acquire is released when its context ends; code that
// goes on running after that is unguarded. On Cloud Run a lock left to end
// with a request's context is released after the answer, when the instance's
// CPU may be throttled, so later (up to a lease later): Release it before
// answering, or use With. The client warns when that happens (K_SERVICE set).
//
// A held lock runs no goroutine of its own between renewals: one timer per
// client starts each renewal when it is due, and the end of its context is
// watched with context.AfterFunc. Lock.Context is a context that ends as the
// lock does, with the end as its cause (ErrLockLost when lost, ErrNotHeld
// when released), as etcd's concurrency.Session.Ctx; it costs no goroutine
// either. Release (and the end of the lock's context) cancels a
// renewal under way and waits for it, and a failed Acquire gives back what
// the store may have granted inside the call. Nothing of a lock runs after Release returns
// or Acquire fails, unless a backend ignores its context (then Release waits
// for it at most 10 seconds, and a give-back at most 2).
//
// Every end-of-life call (Release, the release when a context ends, the
// return of a grant nobody will hold) runs on a context detached from the
// caller's and bounded by 10 seconds, so a Release deferred with a context
// that has ended still releases. An Acquire that returns an error leaves
// nothing held, even when the store applied it and the reply was lost or the
// context ended as the grant arrived. A context that ends while a renewal is
// in flight ends the lock as released, not lost; a renewal still pending when
// the lease ran out is given back once it returns.
//
// Locks are not re-entrant: taking an id that an enclosing With in the same
// context chain holds fails at once with ErrReentrant.
//
// # Loss
//
// A lock is lost when renewals fail until its lease runs out, or when
// another owner took it over (StealAfter, or an expired lease). Loss is
// signalled: Lock.Done closes, and With cancels the function's context with
// cause ErrLockLost and returns an error wrapping ErrLockLost. The holder
// counts the lease from when it sent each request and declares the lock lost
// a tenth of a lease before that count ends, so it is told before anyone else
// can take the lock over, unless the machines' clocks run at rates more than
// 10% apart or the holder's process is paused (a long garbage collection, a
// frozen instance). Nothing can rule the pause out; the fencing token can
// make it harmless.
//
// # Fencing tokens
//
// Lock.Token (FromContext(ctx).Token() inside With) is a number strictly
// greater than every token issued before for the same id. Send it with every
// write to the resource the lock protects, and have the resource refuse a
// write whose token is lower than the highest it has accepted (for example a
// Datastore transaction that compares it with a stored value). A holder that
// lost its lock without knowing it is then fenced off. Each backend documents
// whether its tokens survive restarts; Strong backends' do.
//
// # Waiting
//
// A held lock is waited for until it is acquired, MaxWait passes or the
// context is done, never busy-spinning. On a backend that announces
// releases (a Notifier, such as package redislock) the waiter is woken by
// the announcement and polls only every SafetyPoll, in case one was lost. On
// other backends the pause between polls grows with the time already
// waited: a tenth of it, jittered, within Config.MinBackoff and
// Config.MaxBackoff, so that short waits notice a release quickly and long
// waits cost little. Where the backend tells a busy poll how old the holding
// is (Grant.Age) and this Client has held the id after waiting for it
// before, one poll is timed to reach the store a quarter of MinBackoff after
// the holding should end if it lasts as long as the longest of the Client's
// last three holdings of the id, and at most 2 more follow at MinBackoff
// while it is still held: holdings of one id tend to last alike. Such aims
// come at most once per longest gap of the schedule, and a wait in which
// 2 holdings outlast their aims aims no more. Callers of one Client waiting for the same id queue
// in-process behind a single poller; when a holder in this process releases,
// the next local waiter tries at once. Those local hand-offs are bounded, as
// sync.Mutex bounds them in starvation mode, so that waiters in other
// processes are not starved: after 4 hand-offs in a row that together lasted
// 10·MinBackoff (200 ms) or more, the next local waiter leaves the lock free
// for one window — a tenth of the run, plus MinBackoff (MinBackoff alone on a
// Notifier) — in which a waiter elsewhere that began waiting during the run
// polls. Wait(false) fails at once with a
// *NotAcquiredError (errors.Is ErrNotAcquired), whose Remaining hints how
// long the holder's lease runs (also when another caller in this process
// learnt it): the tasks package turns that into a Retry-After.
//
// # Observability
//
// A Client records OpenTelemetry metrics and spans through
// Config.MeterProvider and Config.TracerProvider, or the global providers
// when those are nil (no-ops until the program installs an SDK; until then,
// as with no-op providers, telemetry costs the client no clock reading,
// span or allocation). A lock's metrics are recorded if the providers
// listened when its Acquire began. Metric
// names start with "taskguard.lock.": acquire.duration and wait.duration
// (histograms, seconds, by outcome: acquired, busy, timeout, canceled,
// error), polls, renewals, takeovers, lost, releases, held, and
// backend.calls and backend.duration (every Backend call, by operation).
// Their attributes are the lock kind and a small set of outcomes, never the
// lock id, so the number of time series stays bounded however many ids are
// used. Spans "taskguard.lock.acquire", "taskguard.lock.hold" (With's
// function) and "taskguard.lock.release" are children of the span in the
// caller's context, and do carry the lock id and token as attributes. See
// docs/observability.md for the full list and for exporting to Cloud
// Monitoring and Cloud Trace.
//
// # Not guaranteed
//
//   - Mutual exclusion is only as strong as the backend: Weak locks can
//     overlap, and an in-memory backend excludes nothing across processes.
//   - A holder paused longer than its lease can run after losing its lock
//     and before noticing; only a fencing token checked by the resource
//     protects against that.
//   - Waiters are not served in order across instances.
//
// # Backends
//
// A Backend is a handful of atomic operations on one store; everything
// above is written once in this package. Package lockingtest is the
// conformance suite every backend passes; memlock is the in-memory backend,
// the double for tests. Optional capabilities (Notifier, InProcessBackend)
// are found through decorators that implement Wrapper's Unwrap.
//
// # The default client
//
// Acquire and With use Default: one client per process, built on first use
// from the environment by the backend packages the program imports (import
// _ "github.com/taskguard/taskguard/locking/dslock" and set
// GOOGLE_CLOUD_PROJECT for Datastore). Share it — or one client of your own,
// given to every part that takes locks — rather than building a second:
// locks exclude each other only through a shared store. When the
// environment names no Strong store, Strong locks are in this process's
// memory (one store for the whole process), with a WARN line; where the
// environment says production (K_SERVICE, K_REVISION, CLOUD_RUN_JOB or
// GAE_SERVICE set) that is refused instead: every lock call fails with an
// error wrapping ErrNoStrongBackend that names the fix, unless
// TASKGUARD_ALLOW_MEMORY=1 accepts locks that hold within one instance only.
package locking

// The files, in reading order: backend.go (the contract a store meets, and
// its optional capabilities), errors.go, options.go, client.go (Config, New,
// Acquire, With), acquire.go (the loop of one Acquire), queue.go (the
// in-process queue of one id), pace.go (when to poll and retry), lock.go (a
// held lock's life: renewal, release, loss), telemetry.go, default.go (the
// process's client from the environment) and memory.go (its in-memory store).
