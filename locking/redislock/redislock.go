package redislock

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/internal/lockkey"
)

// DefaultPrefix starts every key when Options.Prefix is empty.
const DefaultPrefix = "taskguard:"

// MaxPrefixLen is the longest Options.Prefix.
const MaxPrefixLen = 200

// fenceGrace is how much longer than the lease a fence record lives after an
// acquisition: long enough for Acquire to see that a lease ran out, short
// enough that idle ids do not pile up forever.
const fenceGrace = 24 * time.Hour

// ErrInvalidOptions is returned by New for a nil client or a bad prefix.
var ErrInvalidOptions = errors.New("redislock: invalid options")

// ErrInvalidRequest is returned for a request without id, owner or
// positive lease (the locking core never sends one).
var ErrInvalidRequest = errors.New("redislock: invalid request")

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
	return &Backend{c: c, prefix: p}, nil
}

// LockKey returns the key holding the lock for id.
func (b *Backend) LockKey(id string) string { return b.prefix + "{" + lockkey.Hash(id) + "}:lock" }

// FenceKey returns the key holding the fence record for id.
func (b *Backend) FenceKey(id string) string { return b.prefix + "{" + lockkey.Hash(id) + "}:fence" }

func (b *Backend) keys(id string) []string { return []string{b.LockKey(id), b.FenceKey(id)} }

// Acquire takes the lock for r.Owner in one script run (one round trip; two
// when the server has not cached the script yet):
// free, expired, or held by someone who has not acquired or renewed it
// within r.StealAfter on the server's clock. When busy, Grant.Remaining is
// the lock's PTTL.
func (b *Backend) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := checkRequest(r); err != nil {
		return locking.Grant{}, err
	}
	fenceTTL := r.Lease + fenceGrace
	if fenceTTL < r.Lease { // overflow
		fenceTTL = r.Lease
	}
	res, err := acquireScript.Run(ctx, b.c, b.keys(r.ID),
		r.Owner, ms(r.Lease), r.StealAfter.Microseconds(), ms(fenceTTL)).Slice()
	if err != nil {
		return locking.Grant{}, fmt.Errorf("redislock: acquire %q: %w", r.ID, err)
	}
	switch {
	case len(res) == 3 && res[0] == int64(1):
		tok, err := token(res[1])
		if err != nil {
			return locking.Grant{}, fmt.Errorf("redislock: acquire %q: %w", r.ID, err)
		}
		return locking.Grant{Acquired: true, Token: tok, TookOver: res[2] == int64(1)}, nil
	case len(res) == 2 && res[0] == int64(0):
		pttl, _ := res[1].(int64)
		return locking.Grant{Remaining: max(time.Duration(pttl)*time.Millisecond, 0)}, nil
	}
	return locking.Grant{}, fmt.Errorf("redislock: acquire %q: %w %v", r.ID, ErrBadReply, res)
}

// Renew extends r.Owner's lease in one script run (one round trip) that
// checks the owner and resets the lock's TTL to r.Lease.
func (b *Backend) Renew(ctx context.Context, r locking.Request) (locking.Grant, error) {
	if err := checkRequest(r); err != nil {
		return locking.Grant{}, err
	}
	res, err := renewScript.Run(ctx, b.c, b.keys(r.ID), r.Owner, ms(r.Lease)).Slice()
	if err != nil {
		return locking.Grant{}, fmt.Errorf("redislock: renew %q: %w", r.ID, err)
	}
	switch {
	case len(res) == 2 && res[0] == int64(1):
		tok, err := token(res[1])
		if err != nil {
			return locking.Grant{}, fmt.Errorf("redislock: renew %q: %w", r.ID, err)
		}
		return locking.Grant{Acquired: true, Token: tok}, nil
	case len(res) == 1 && res[0] == int64(0):
		return locking.Grant{}, fmt.Errorf("redislock: renew %q: %w (expired, released, taken over, or lost with the server's data)", r.ID, locking.ErrNotHeld)
	}
	return locking.Grant{}, fmt.Errorf("redislock: renew %q: %w %v", r.ID, ErrBadReply, res)
}

// Release deletes owner's lock in one script run (one round trip) that
// checks the owner first, so it never deletes another owner's lock. When
// the reply is lost and the client's own retry runs the script again, that
// retry finds the lock gone and Release reports ErrNotHeld although the
// lock was released.
func (b *Backend) Release(ctx context.Context, id, owner string) error {
	if id == "" || owner == "" {
		return fmt.Errorf("%w: release needs an id and an owner", ErrInvalidRequest)
	}
	n, err := releaseScript.Run(ctx, b.c, b.keys(id), owner).Int64()
	if err != nil {
		return fmt.Errorf("redislock: release %q: %w", id, err)
	}
	if n != 1 {
		return fmt.Errorf("redislock: release %q: %w (expired, released, taken over, or lost with the server's data)", id, locking.ErrNotHeld)
	}
	return nil
}

// ms converts d to whole milliseconds for PX, rounding up so that a
// sub-millisecond lease never becomes 0 (which Redis rejects).
func ms(d time.Duration) int64 {
	m := d.Milliseconds()
	if d%time.Millisecond != 0 {
		m++
	}
	return max(m, 1)
}

func token(v any) (uint64, error) {
	s, ok := v.(string)
	if !ok {
		return 0, fmt.Errorf("%w: token %v (%T)", ErrBadReply, v, v)
	}
	t, err := strconv.ParseUint(s, 10, 64)
	if err != nil || t == 0 {
		return 0, fmt.Errorf("%w: token %q", ErrBadReply, s)
	}
	return t, nil
}

// checkRequest rejects requests the core never sends.
func checkRequest(r locking.Request) error {
	if r.ID == "" || r.Owner == "" || r.Lease <= 0 {
		return fmt.Errorf("%w: it needs an id, an owner and a positive lease", ErrInvalidRequest)
	}
	return nil
}
