package redislock

import "github.com/redis/go-redis/v9"

// The scripts below run atomically on the server: nothing else touches the
// keys between their reads and writes. All time comes from the server's TIME.
//
// Keys: KEYS[1] is the lock, KEYS[2] the fence record of the same id; both
// carry the same hash tag, so they live in one cluster slot.
//
// The lock value is "<token> <stamp µs> <owner>": the fencing token of the
// holding, the server time of its last acquire or renewal, and the owner
// (last, so it may hold any byte). Its TTL is the lease.
//
// The fence value is "<token> <state> <owner>": the last token issued for the
// id, whether that holding is still out ("h") or was released ("r"), and its
// owner. It outlives the lock (lease + 1 day, refreshed on every acquisition)
// so that Acquire can tell a lease that ran out from a release, and so that
// tokens keep growing.

// acquireScript: ARGV[1] owner, ARGV[2] lease ms, ARGV[3] StealAfter µs
// (0: never steal), ARGV[4] fence TTL ms.
// Returns {1, token, tookOver} when acquired, {0, pttl} when busy.
//
// The token is max(last token + 1, server time in µs): strictly increasing
// while the fence record lasts, and still increasing (given a server clock
// that does not run backwards) when the record was lost to a restart, an
// eviction or a failover to a replica that had not seen the latest writes.
var acquireScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = redis.call('GET', KEYS[1])
local took = 0
if cur then
  local tok, stamp, owner = string.match(cur, '^(%d+) (%d+) (.*)$')
  if owner == ARGV[1] then
    -- Our own earlier try, whose reply was lost and which the client retried.
    redis.call('SET', KEYS[1], tok .. ' ' .. string.format('%d', now) .. ' ' .. owner, 'PX', ARGV[2])
    return {1, tok, 0}
  end
  local steal = tonumber(ARGV[3])
  if steal == 0 or (stamp and now - tonumber(stamp) < steal) then
    return {0, redis.call('PTTL', KEYS[1])}
  end
  took = 1
end
local last = 0
local f = redis.call('GET', KEYS[2])
if f then
  local ftok, state = string.match(f, '^(%d+) (%a)')
  if ftok then
    last = tonumber(ftok)
    if not cur and state == 'h' then
      took = 1 -- the last holding was never released: its lease ran out
    end
  end
end
local tok = now
if tok <= last then tok = last + 1 end
local stok = string.format('%d', tok)
redis.call('SET', KEYS[2], stok .. ' h ' .. ARGV[1], 'PX', ARGV[4])
redis.call('SET', KEYS[1], stok .. ' ' .. string.format('%d', now) .. ' ' .. ARGV[1], 'PX', ARGV[2])
return {1, stok, took}
`)

// renewScript: ARGV[1] owner, ARGV[2] lease ms.
// Returns {1, token} when renewed, {0} when owner does not hold the lock.
var renewScript = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if not cur then return {0} end
local tok, stamp, owner = string.match(cur, '^(%d+) (%d+) (.*)$')
if owner ~= ARGV[1] then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('SET', KEYS[1], tok .. ' ' .. string.format('%d', now) .. ' ' .. owner, 'PX', ARGV[2])
return {1, tok}
`)

// releaseScript: ARGV[1] owner.
// Returns 1 when released, 0 when owner does not hold the lock.
var releaseScript = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local tok, stamp, owner = string.match(cur, '^(%d+) (%d+) (.*)$')
if owner ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local f = redis.call('GET', KEYS[2])
if f and string.match(f, '^(%d+) h ') == tok then
  redis.call('SET', KEYS[2], tok .. ' r ' .. owner, 'KEEPTTL')
end
return 1
`)
