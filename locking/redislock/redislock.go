package redislock

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/internal/lockkey"
)

// DefaultPrefix starts every key when Options.Prefix is empty.
const DefaultPrefix = "taskguard:"

// MaxPrefixLen is the longest Options.Prefix.
const MaxPrefixLen = 200

// ErrInvalidOptions is returned by New for a nil client or a bad prefix.
var ErrInvalidOptions = locking.NewInvalid("redislock: invalid options")

// ErrInvalidRequest is returned, before any I/O, for a request that
// locking.Request.Validate refuses (no id or owner, a lease not in
// (0, locking.MaxLease], a StealAfter not in [0, locking.MaxLease]) and for
// a Release without id or owner. The error also matches locking.ErrInvalid.
// The locking core never sends such a request.
var ErrInvalidRequest = locking.NewInvalid("redislock: invalid request")

// ErrBadReply is returned (wrapped) when the server answers a script with
// something this package did not expect, such as a server that runs Lua
// differently.
var ErrBadReply = errors.New("redislock: unexpected reply")

// Options configure a Backend. The zero value is ready to use.
type Options struct {
	// Prefix starts every key this backend writes, so that several
	// applications can share one server. Default DefaultPrefix. At most
	// MaxPrefixLen bytes of printable ASCII without spaces or braces.
	Prefix string
}

// Backend is a locking.Backend on Valkey or Redis. It is safe for
// concurrent use. See the package documentation for its guarantees.
type Backend struct {
	c      redis.Scripter
	prefix string
	open   string // prefix + "{", which starts every key and channel
	hub    hub    // the subscriptions of Watch

	// lease holds the acquire script's lease arguments for the last lease
	// sent: a client sends the same lease on every call.
	lease atomic.Pointer[leaseArg]
}

var _ locking.Backend = (*Backend)(nil)

// New returns a Backend that keeps its locks in the server (or cluster)
// behind c: a *redis.Client, *redis.ClusterClient or any other
// redis.Scripter. It performs no I/O; c may be shared with other users, and
// its timeouts and retries apply to every call.
func New(c redis.Scripter, opts Options) (*Backend, error) {
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
	return &Backend{c: c, prefix: p, open: p + "{"}, nil
}

// LockKey returns the key holding the lock record for id:
// Prefix+"{"+H+"}:lock", H being the unpadded base64url SHA-256 of id.
func (b *Backend) LockKey(id string) string { return lockkey.Join(b.open, id, "}:lock") }

// ReleaseChannel returns the pub/sub channel on which the release of id is
// announced when a waiter was turned away: Prefix+"{"+H+"}:released",
// LockKey(id) with "lock" replaced by "released".
func (b *Backend) ReleaseChannel(id string) string {
	return lockkey.Join(b.open, id, "}:released")
}

// FenceKey returns LockKey(id): the fencing counter lives in the lock
// record itself, there is no separate fence key. It remains for callers of
// earlier versions and will be removed.
func (b *Backend) FenceKey(id string) string { return b.LockKey(id) }

// Acquire takes the lock for r.Owner in one script run (one round trip, two
// when the server has not cached the script yet; GET, TIME and SET on the
// server for a free lock) when it is free (never
// held, released, or its lease ran out) or when its holder has not acquired
// or renewed it for more than r.StealAfter (rounded up to whole
// milliseconds) on the server's clock. When busy, Grant.Remaining is the
// holder's remaining lease on the server's clock, in whole milliseconds (at
// least 1). r.Lease is rounded up to
// whole milliseconds. A request that r.Validate refuses fails with
// ErrInvalidRequest (and locking.ErrInvalid) before any I/O.
func (b *Backend) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := validate(r); err != nil {
		return locking.Grant{}, err
	}
	var steal int64
	if r.StealAfter > 0 {
		steal = ms(r.StealAfter)
	}
	la := b.leaseArgs(r.Lease)
	res, err := acquireScript.Run(ctx, b.c, []string{b.LockKey(r.ID)}, r.Owner, la.lease, la.px, steal).Result()
	if err != nil {
		return locking.Grant{}, fmt.Errorf("redislock: acquire %q: %w", r.ID, err)
	}
	switch v := res.(type) {
	case string: // acquired
		tok, err := tokenOf(v)
		if err != nil {
			return locking.Grant{}, fmt.Errorf("redislock: acquire %q: %w", r.ID, err)
		}
		return locking.Grant{Acquired: true, Token: tok}, nil
	case []any: // acquired, taking over
		if len(v) == 1 {
			tok, err := token(v[0])
			if err != nil {
				return locking.Grant{}, fmt.Errorf("redislock: acquire %q: %w", r.ID, err)
			}
			return locking.Grant{Acquired: true, Token: tok, TookOver: true}, nil
		}
	case int64: // busy; 0 would read as "unknown"
		return locking.Grant{Remaining: time.Duration(max(v, 1)) * time.Millisecond}, nil
	}
	return locking.Grant{}, fmt.Errorf("redislock: acquire %q: %w %v", r.ID, ErrBadReply, res)
}

// Renew extends r.Owner's lease to r.Lease (rounded up to whole
// milliseconds) from now, in one script run (one round trip; GET, PTTL and
// SET on the server) that checks the owner and that the lease has not run
// out. It returns the token of the acquisition it extends. It returns an error wrapping
// locking.ErrNotHeld when r.Owner does not hold the lock.
func (b *Backend) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := validate(r); err != nil {
		return locking.Grant{}, err
	}
	la := b.leaseArgs(r.Lease)
	res, err := renewScript.Run(ctx, b.c, []string{b.LockKey(r.ID)}, r.Owner, la.lease, la.px).Result()
	if err != nil {
		return locking.Grant{}, fmt.Errorf("redislock: renew %q: %w", r.ID, err)
	}
	switch v := res.(type) {
	case string:
		tok, err := tokenOf(v)
		if err != nil {
			return locking.Grant{}, fmt.Errorf("redislock: renew %q: %w", r.ID, err)
		}
		return locking.Grant{Acquired: true, Token: tok}, nil
	case int64:
		if v == 0 {
			return locking.Grant{}, fmt.Errorf("redislock: renew %q: %w (expired, released, taken over, or lost with the server's data)", r.ID, locking.ErrNotHeld)
		}
	}
	return locking.Grant{}, fmt.Errorf("redislock: renew %q: %w %v", r.ID, ErrBadReply, res)
}

// Release gives owner's holding back, in one script run (one round trip;
// GET, PTTL and SETRANGE on the server) that checks the owner and the lease
// first, so it never touches another owner's holding. The record stays (with
// its token, for fencing) and reads as free. Release with the owner of an
// Acquire that failed or whose context ended gives back the holding that
// Acquire may have been granted anyway (its reply lost or late).
//
// Release returns nil when this call released owner's holding. That holds
// also when the client retried the script after losing the reply of an
// attempt that had already released it (go-redis retries on a broken
// connection), whatever happened to the id between the attempts, as long as
// fewer than four other releases of the id came in between: the record keeps
// the nonces of the last four releases, and each Release call sends its own.
// It returns an error wrapping locking.ErrNotHeld when owner's holding ended
// otherwise: its lease ran out, another owner took over, it was released by
// an earlier Release call, or the server lost it. id and owner must not be
// empty (ErrInvalidRequest, before any I/O).
func (b *Backend) Release(ctx context.Context, id, owner string) error {
	if id == "" || owner == "" {
		return fmt.Errorf("%w: %w: release needs an id and an owner", ErrInvalidRequest, locking.ErrInvalid)
	}
	n, err := releaseScript.Run(ctx, b.c, []string{b.LockKey(id)}, owner, newNonce()).Int64()
	if err != nil {
		return fmt.Errorf("redislock: release %q: %w", id, err)
	}
	if n != 1 {
		return fmt.Errorf("redislock: release %q: %w (expired, released, taken over, or lost with the server's data)", id, locking.ErrNotHeld)
	}
	return nil
}

// ms converts a positive d to whole milliseconds, rounding up so that a
// sub-millisecond lease or StealAfter never becomes 0 (which PX rejects and
// which the acquire script reads as "never steal").
func ms(d time.Duration) int64 {
	m := d.Milliseconds()
	if d%time.Millisecond != 0 {
		m++
	}
	return max(m, 1)
}

// leaseArg is a lease as the scripts take it.
type leaseArg struct {
	d     time.Duration
	lease any // string: the lease in whole ms (rounded up), the 9 digits the record keeps
	px    any // string: the TTL of a held record, lease + grace, in ms
}

// leaseArgs returns d as the scripts take it, from b.lease when d is the
// lease of the last call (boxed once, so that a call allocates nothing for
// it).
func (b *Backend) leaseArgs(d time.Duration) *leaseArg {
	if la := b.lease.Load(); la != nil && la.d == d {
		return la
	}
	la := newLeaseArg(d)
	b.lease.Store(la)
	return la
}

func newLeaseArg(d time.Duration) *leaseArg {
	m := ms(d) // <= locking.MaxLease: 8 digits
	return &leaseArg{d: d, lease: fmt.Sprintf("%09d", m), px: strconv.FormatInt(m+grace.Milliseconds(), 10)}
}

// nonceLen is the length of a Release call's nonce in the record.
const nonceLen = 12

// newNonce returns a Release call's nonce: 12 base-36 digits, about 62
// random bits. A retry of the call by go-redis sends the same.
func newNonce() string {
	const span = 4738381338321616896 // 36^12
	const digits = "0123456789abcdefghijklmnopqrstuvwxyz"
	var b [nonceLen]byte
	n := rand.Uint64N(span)
	for i := nonceLen - 1; i >= 0; i-- {
		b[i] = digits[n%36]
		n /= 36
	}
	return string(b[:])
}

func token(v any) (uint64, error) {
	s, ok := v.(string)
	if !ok {
		return 0, fmt.Errorf("%w: token %v (%T)", ErrBadReply, v, v)
	}
	return tokenOf(s)
}

// tokenOf parses a token the scripts sent as a string (taking s as a
// string, not an any, spares the call an allocation).
func tokenOf(s string) (uint64, error) {
	t, err := strconv.ParseUint(s, 10, 64)
	if err != nil || t == 0 {
		return 0, fmt.Errorf("%w: token %q", ErrBadReply, s)
	}
	return t, nil
}

// validate refuses, before any I/O, what the core never sends.
func validate(r locking.Request) error {
	if err := r.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	return nil
}
