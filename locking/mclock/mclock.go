package mclock

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/bradfitz/gomemcache/memcache"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/internal/lockkey"
)

// DefaultPrefix starts every key when Options.Prefix is empty.
const DefaultPrefix = "taskguard:"

// MaxPrefixLen is the longest Options.Prefix: memcached keys are at most 250
// bytes, and the backend appends "fence:" and a 43-byte hash.
const MaxPrefixLen = 250 - len("fence:") - lockkey.HashLen

// ErrInvalidOptions is returned by New for a nil client or a bad prefix.
var ErrInvalidOptions = locking.NewInvalid("mclock: invalid options")

// ErrInvalidRequest is returned (wrapped, together with locking.ErrInvalid)
// for a request that locking.Request.Validate refuses: no id or owner, a
// lease outside (0, locking.MaxLease], or StealAfter outside [0,
// locking.MaxLease]. The locking core never sends one; nothing is written.
var ErrInvalidRequest = locking.NewInvalid("mclock: invalid request")

// ErrContended is returned (wrapped) when an owner-checked update kept losing
// compare-and-swap races for its item and gave up.
var ErrContended = errors.New("mclock: compare-and-swap kept conflicting")

// fenceExpiry is how long a fence counter lives (relative seconds, 7 days).
// incr does not refresh it; when it lapses, the counter is seeded again from
// the clock, which keeps tokens increasing (see nextToken).
const fenceExpiry = 7 * 24 * 60 * 60

// tombstoneExpiry is how long a release tombstone lives (relative seconds).
const tombstoneExpiry = fenceExpiry

// maxAttempts bounds the tries of one memcached command on transient
// (network) errors, and the compare-and-swap loops.
const maxAttempts = 3

// Options configure a Backend. The zero value is ready to use.
type Options struct {
	// Prefix starts every key this backend writes, so that several
	// applications can share one memcached. Default DefaultPrefix. At most
	// MaxPrefixLen bytes of printable ASCII without spaces or braces.
	Prefix string
}

// Backend is a locking.Backend on memcached. It is safe for concurrent use.
// See the package documentation for its guarantees.
type Backend struct {
	c       *memcache.Client
	prefix  string
	servers *lazyServers // the selector of c when FromEnv made it, else nil

	// beforeCAS, when set (by tests only), runs between the gets and the
	// cas of Renew and Release, to interleave another instance there.
	beforeCAS func()
	// afterToken, when set (by tests only), runs in Acquire between taking
	// a token and writing the lock item.
	afterToken func()
}

var _ locking.Backend = (*Backend)(nil)

// New returns a Backend that keeps its locks in the memcached servers of c.
// It performs no I/O. The client's Timeout bounds every command; c may be
// shared with other users.
func New(c *memcache.Client, opts Options) (*Backend, error) {
	if c == nil {
		return nil, fmt.Errorf("%w: nil client", ErrInvalidOptions)
	}
	p := opts.Prefix
	if p == "" {
		p = DefaultPrefix
	}
	if !lockkey.ValidPrefix(p, MaxPrefixLen) {
		return nil, fmt.Errorf("%w: prefix %q must be at most %d bytes of printable ASCII without spaces or braces",
			ErrInvalidOptions, p, MaxPrefixLen)
	}
	return &Backend{c: c, prefix: p}, nil
}

// LockKey returns the memcached key holding the lock for id.
func (b *Backend) LockKey(id string) string { return b.prefix + "lock:" + lockkey.Hash(id) }

// FenceKey returns the memcached key holding the fence counter for id.
func (b *Backend) FenceKey(id string) string { return b.prefix + "fence:" + lockkey.Hash(id) }

// Acquire takes the lock for r.Owner. It first takes a token with incr on
// the fence counter, then adds the lock item with the lease as its expiry:
// two commands when the lock is free and its last lease ran out. When add
// finds an item, one gets reads it: a release tombstone (see Release) or a
// holder older than r.StealAfter is replaced with a cas, so of two
// concurrent takers only one can win; a live holder makes Acquire report
// busy with an estimate of its remaining lease.
//
// TookOver: an expired lease needs no takeover, since memcached dropped the
// item at expiry, so add succeeds; Acquire then reports TookOver when the
// fence counter already existed (someone held the lock before) and no
// release tombstone was found. After an eviction or restart that is a guess
// (the counter is gone too, so it reports false).
func (b *Backend) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := checkRequest(r); err != nil {
		return locking.Grant{}, err
	}
	key := b.LockKey(r.ID)
	token, seeded, err := b.nextToken(ctx, b.FenceKey(r.ID))
	if err != nil {
		return locking.Grant{}, fmt.Errorf("mclock: acquire %q: fence: %w", r.ID, err)
	}
	now := time.Now()
	mine := record{token: token, stamp: now, lease: r.Lease, owner: r.Owner}
	exp := expiry(r.Lease, now)

	for attempt := range maxAttempts {
		if attempt > 0 {
			// The lock item vanished since the last try (its lease ran
			// out): its holder's token may be above ours, so take a new
			// one, drawn after that holding was written.
			if mine.token, err = b.refreshToken(ctx, r.ID); err != nil {
				return locking.Grant{}, err
			}
			token = mine.token
		}
		mine.released = 0 // no item, so no release known to precede this holding
		if b.afterToken != nil {
			b.afterToken()
		}
		_, err := b.do(ctx, func() error {
			return b.c.Add(&memcache.Item{Key: key, Value: mine.encode(), Expiration: exp})
		})
		if err == nil {
			return locking.Grant{Acquired: true, Token: token, TookOver: !seeded}, nil
		}
		if !errors.Is(err, memcache.ErrNotStored) {
			return locking.Grant{}, fmt.Errorf("mclock: acquire %q: add: %w", r.ID, err)
		}
		it, err := b.gets(ctx, key)
		if errors.Is(err, memcache.ErrCacheMiss) {
			continue // released or expired since the add: try again
		}
		if err != nil {
			return locking.Grant{}, fmt.Errorf("mclock: acquire %q: gets: %w", r.ID, err)
		}
		now = time.Now()
		tookOver := true
		held, ok := decodeRecord(it.Value)
		switch {
		case isTombstone(it.Value):
			// Released: take it, as a fresh acquisition.
			tookOver = false
			mine.released, _ = tombstoneToken(it.Value)
		case ok && held.owner == r.Owner:
			// Our own add, whose reply was lost and which do retried.
			return locking.Grant{Acquired: true, Token: held.token}, nil
		case r.StealAfter <= 0 || now.Sub(held.stamp) < r.StealAfter:
			// Held. An item this package did not write counts as held
			// since the epoch: never stolen without StealAfter, always with.
			if !ok {
				return locking.Grant{}, nil
			}
			return locking.Grant{Remaining: held.remaining(now), Age: max(now.Sub(held.stamp), 0)}, nil
		}
		// A token is a fence only if it is above every token granted
		// before. The item read holds the latest granted one (a holder's,
		// or a tombstone's); ours was drawn before that read and may be
		// lower, when someone acquired and released in between. A token
		// drawn now is above it, and the cas fails if anyone is granted
		// the lock after the read.
		prev := held.token
		if t, ok := tombstoneToken(it.Value); ok {
			prev = t
		}
		if token <= prev {
			if token, err = b.refreshToken(ctx, r.ID); err != nil {
				return locking.Grant{}, err
			}
			mine.token = token
		}
		if !isTombstone(it.Value) {
			// A steal is no release: the last release stays the one
			// before the stolen holding.
			mine.released = held.released
		}
		mine.stamp = now
		it.Value = mine.encode()
		it.Expiration = expiry(r.Lease, now)
		_, err = b.do(ctx, func() error { return b.c.CompareAndSwap(it) })
		switch {
		case err == nil:
			return locking.Grant{Acquired: true, Token: token, TookOver: tookOver}, nil
		case errors.Is(err, memcache.ErrCASConflict), errors.Is(err, memcache.ErrNotStored):
			// Another taker or the holder changed it, or it vanished:
			// look again.
			continue
		default:
			return locking.Grant{}, fmt.Errorf("mclock: acquire %q: cas: %w", r.ID, err)
		}
	}
	// The item kept changing under us: someone else is taking it.
	return locking.Grant{}, nil
}

// Renew extends the lease of r.Owner's lock with gets + cas (two commands):
// the cas only succeeds if nobody changed the item since the gets, so a
// renewal can never overwrite a new owner's lock.
func (b *Backend) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := checkRequest(r); err != nil {
		return locking.Grant{}, err
	}
	key := b.LockKey(r.ID)
	for range maxAttempts {
		it, err := b.gets(ctx, key)
		if errors.Is(err, memcache.ErrCacheMiss) {
			return locking.Grant{}, fmt.Errorf("mclock: renew %q: %w (expired, evicted, or the server restarted)", r.ID, locking.ErrNotHeld)
		}
		if err != nil {
			return locking.Grant{}, fmt.Errorf("mclock: renew %q: gets: %w", r.ID, err)
		}
		held, ok := decodeRecord(it.Value)
		if !ok || held.owner != r.Owner {
			return locking.Grant{}, fmt.Errorf("mclock: renew %q: %w (released, or another owner holds it)", r.ID, locking.ErrNotHeld)
		}
		now := time.Now()
		held.stamp, held.lease = now, r.Lease
		if b.beforeCAS != nil {
			b.beforeCAS()
		}
		it.Value = held.encode()
		it.Expiration = expiry(r.Lease, now)
		_, err = b.do(ctx, func() error { return b.c.CompareAndSwap(it) })
		switch {
		case err == nil:
			return locking.Grant{Acquired: true, Token: held.token}, nil
		case errors.Is(err, memcache.ErrCASConflict), errors.Is(err, memcache.ErrNotStored):
			continue // changed under us (a steal, or our retried cas): look again
		default:
			return locking.Grant{}, fmt.Errorf("mclock: renew %q: cas: %w", r.ID, err)
		}
	}
	return locking.Grant{}, fmt.Errorf("mclock: renew %q: %w", r.ID, ErrContended)
}

// Release removes owner's lock with gets + cas (two commands).
//
// memcached's delete takes no cas, so "gets, compare owner, delete" could
// delete a lock that a taker stole between the gets and the delete (the
// original's bug). Instead the release is a cas that replaces the item, only
// if unchanged since the gets, with a tombstone naming the released token.
// Acquire treats a tombstone as free (taking it with one more gets + cas)
// and learns from it that the lock was released rather than left to expire.
// Tombstones expire after 7 days, like fence counters, and are evicted like
// any item.
//
// A cas whose reply is lost is sent again; when it then conflicts, the item
// is read again. Finding the tombstone of the released token, or a new
// holder whose record names that token as the last release before it (it
// acquired the lock after the tombstone landed), the release is known to
// have landed and Release returns nil; anything else is ErrNotHeld.
func (b *Backend) Release(ctx context.Context, id, owner string) error {
	if id == "" || owner == "" {
		return fmt.Errorf("%w: %w: release needs an id and an owner", ErrInvalidRequest, locking.ErrInvalid)
	}
	key := b.LockKey(id)
	var releasing uint64 // token of owner's holding, once seen
	for range maxAttempts {
		it, err := b.gets(ctx, key)
		if errors.Is(err, memcache.ErrCacheMiss) {
			return fmt.Errorf("mclock: release %q: %w (expired, evicted, or the server restarted)", id, locking.ErrNotHeld)
		}
		if err != nil {
			return fmt.Errorf("mclock: release %q: gets: %w", id, err)
		}
		if tok, ok := tombstoneToken(it.Value); ok {
			if releasing != 0 && tok == releasing {
				// Our cas succeeded but its reply was lost.
				return nil
			}
			return fmt.Errorf("mclock: release %q: %w (released already)", id, locking.ErrNotHeld)
		}
		held, ok := decodeRecord(it.Value)
		if ok && releasing != 0 && held.owner != owner && held.released == releasing {
			// Our cas succeeded, its reply was lost, and another owner
			// acquired the lock after it.
			return nil
		}
		if !ok || held.owner != owner {
			return fmt.Errorf("mclock: release %q: %w (another owner holds it)", id, locking.ErrNotHeld)
		}
		releasing = held.token
		if b.beforeCAS != nil {
			b.beforeCAS()
		}
		it.Value = tombstone(held.token)
		it.Expiration = tombstoneExpiry
		_, err = b.do(ctx, func() error { return b.c.CompareAndSwap(it) })
		switch {
		case err == nil:
			return nil
		case errors.Is(err, memcache.ErrCASConflict), errors.Is(err, memcache.ErrNotStored):
			continue
		default:
			return fmt.Errorf("mclock: release %q: cas: %w", id, err)
		}
	}
	return fmt.Errorf("mclock: release %q: %w", id, ErrContended)
}

// nextToken returns the next fencing token for a lock: incr on its counter
// (one command). When the counter is missing (first use, eviction, server
// restart, or its 7-day expiry), it is created holding the current time in
// microseconds since the epoch, so that tokens keep increasing across such
// resets as long as this machine's clock is not behind the clocks that
// issued earlier tokens and the id saw fewer than a million acquisitions per
// second. That makes the counter's reset unlikely to repeat a token, but it
// is not a guarantee: see the package documentation. seeded reports that the
// counter was created by this call.
func (b *Backend) nextToken(ctx context.Context, key string) (token uint64, seeded bool, err error) {
	for range maxAttempts {
		var v uint64
		_, err := b.do(ctx, func() (err error) {
			v, err = b.c.Increment(key, 1)
			return err
		})
		if err == nil {
			return v, false, nil
		}
		if !errors.Is(err, memcache.ErrCacheMiss) {
			return 0, false, err
		}
		seed := uint64(time.Now().UnixMicro())
		_, err = b.do(ctx, func() error {
			return b.c.Add(&memcache.Item{Key: key, Value: []byte(strconv.FormatUint(seed, 10)), Expiration: fenceExpiry})
		})
		if err == nil {
			return seed, true, nil
		}
		if !errors.Is(err, memcache.ErrNotStored) {
			return 0, false, err
		}
		// Someone else created it in between: incr again.
	}
	return 0, false, ErrContended
}

// refreshToken draws a new token for id.
func (b *Backend) refreshToken(ctx context.Context, id string) (uint64, error) {
	token, _, err := b.nextToken(ctx, b.FenceKey(id))
	if err != nil {
		return 0, fmt.Errorf("mclock: acquire %q: fence: %w", id, err)
	}
	return token, nil
}

// gets reads key with its cas id.
func (b *Backend) gets(ctx context.Context, key string) (*memcache.Item, error) {
	var it *memcache.Item
	_, err := b.do(ctx, func() (err error) {
		it, err = b.c.Get(key)
		return err
	})
	return it, err
}

// do runs one memcached command, retrying it after transient (network)
// errors up to maxAttempts times while ctx allows. It reports whether a
// retry happened, which makes the outcome of a write ambiguous.
//
// The retries are safe because every caller re-checks: a retried add that
// finds its own value counts as acquired, a retried cas that conflicts is
// followed by a fresh gets, and incr only skips a token.
func (b *Backend) do(ctx context.Context, op func() error) (retried bool, err error) {
	backoff := 20 * time.Millisecond
	for attempt := 1; ; attempt++ {
		if cerr := ctx.Err(); cerr != nil {
			if err != nil {
				return retried, fmt.Errorf("%w (after %v)", cerr, err)
			}
			return retried, cerr
		}
		err = op()
		if err == nil || !transient(err) || attempt == maxAttempts {
			return retried, err
		}
		retried = true
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
		backoff *= 4
	}
}

// transient reports whether err may go away on a retry: anything but a
// definite answer of the server.
func transient(err error) bool {
	switch {
	case errors.Is(err, memcache.ErrCacheMiss), errors.Is(err, memcache.ErrCASConflict),
		errors.Is(err, memcache.ErrNotStored), errors.Is(err, memcache.ErrMalformedKey),
		errors.Is(err, memcache.ErrNoServers):
		return false
	}
	return true
}

// checkRequest rejects requests the core never sends, before any command:
// the error wraps both ErrInvalidRequest and locking.ErrInvalid.
func checkRequest(r locking.Request) error {
	if err := r.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	return nil
}
