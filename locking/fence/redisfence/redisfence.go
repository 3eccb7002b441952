// Package redisfence is a fenced SET for Valkey and Redis: a key is set only
// if the caller's token is admitted by the fence of the lock that guards it
// (see package fence), in one script, so the check and the write are atomic:
//
//	err := redisfence.Set(ctx, rdb, "cart-7", fence.FromContext(ctx), "{cart-7}:total", total, 0)
//	// errors.Is(err, fence.ErrStale): this holder lost its lock; nothing was set
//
// The fence is a small hash at FenceKey(lockID) holding the format marker,
// the lock id and the highest token accepted. Set is one round trip (EVALSHA,
// or EVAL the first time on a server). In Redis Cluster and Valkey cluster
// mode the fence and the key must be in one slot: give the key the hash tag
// of the fence, "{" + lockID + "}" (a lock id without braces).
//
// Weak locks (memcached, Valkey) give best-effort tokens: after the lock
// store loses data a token may not rise, and the fence then refuses an
// honest holder rather than admit a stale one. Strong tokens (Datastore)
// always rise.
package redisfence

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking/fence"
)

// FenceKey returns the key of the fence of lockID: "taskguard-fence:{" +
// lockID + "}", whose hash tag is the lock id.
func FenceKey(lockID string) string { return "taskguard-fence:{" + lockID + "}" }

// set admits the token and sets the key. Tokens are compared as decimal
// strings (by length, then bytes) since Lua numbers are doubles.
// KEYS: fence, key. ARGV: format, lock id, token, value, ttl in ms (0: none).
var set = redis.NewScript(`
local function higher(a, b)
	if #a ~= #b then return #a > #b end
	return a > b
end
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' then
	if t ~= 'hash' then return {'foreign', 'a ' .. t .. ', not a hash'} end
	local f = redis.call('HMGET', KEYS[1], 'format', 'lock', 'token')
	if f[1] ~= ARGV[1] or redis.call('HLEN', KEYS[1]) ~= 3 or not f[3] or not string.match(f[3], '^[1-9][0-9]*$') then
		return {'foreign', 'format ' .. tostring(f[1])}
	end
	if f[2] ~= ARGV[2] then return {'wronglock', f[2]} end
	if higher(f[3], ARGV[3]) then return {'stale', f[3]} end
	if higher(ARGV[3], f[3]) then redis.call('HSET', KEYS[1], 'token', ARGV[3]) end
else
	redis.call('HSET', KEYS[1], 'format', ARGV[1], 'lock', ARGV[2], 'token', ARGV[3])
end
if ARGV[5] ~= '0' then
	redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
else
	redis.call('SET', KEYS[2], ARGV[4])
end
return {'ok', ARGV[3]}
`)

// Set sets key to value (with expiry ttl, none when 0) if tok is admitted
// by the fence of lockID by the rule of fence.State.Admit, raising the fence
// when tok is higher than any accepted. Otherwise it sets nothing and
// returns a *fence.StaleError (errors.Is fence.ErrStale and
// locking.ErrLockLost) for a lower token, fence.ErrInvalid for a zero token,
// one without a lock id or a negative ttl (before any I/O),
// fence.ErrWrongLock for a token of another lock id, fence.ErrForeign when
// FenceKey(lockID) holds something this package did not write, or the
// client's error. value is any value go-redis accepts for SET.
func Set(ctx context.Context, c redis.Scripter, lockID string, tok fence.Token, key string, value any, ttl time.Duration) error {
	if _, _, err := (fence.State{}).Admit(lockID, tok); err != nil {
		return err
	}
	if ttl < 0 {
		return fmt.Errorf("%w: negative ttl %v", fence.ErrInvalid, ttl)
	}
	ms := ttl.Milliseconds()
	if ttl > 0 && ms == 0 {
		ms = 1
	}
	v := strconv.FormatUint(tok.Value, 10)
	res, err := set.Run(ctx, c, []string{FenceKey(lockID), key}, fence.Format, lockID, v, value, ms).StringSlice()
	if err != nil {
		return fmt.Errorf("redisfence: set %q fenced by %q: %w", key, lockID, err)
	}
	if len(res) != 2 {
		return fmt.Errorf("redisfence: unexpected reply %q", res)
	}
	switch res[0] {
	case "ok":
		return nil
	case "stale":
		highest, _ := strconv.ParseUint(res[1], 10, 64)
		return &fence.StaleError{LockID: lockID, Token: tok.Value, Highest: highest}
	case "wronglock":
		return fmt.Errorf("%w: the fence at %s fences lock %q, not %q", fence.ErrWrongLock, FenceKey(lockID), res[1], lockID)
	case "foreign":
		return fmt.Errorf("%w: %s holds %s", fence.ErrForeign, FenceKey(lockID), res[1])
	}
	return fmt.Errorf("redisfence: unexpected reply %q", res)
}
