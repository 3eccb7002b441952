package redislock

import "github.com/redis/go-redis/v9"

// The scripts below run atomically on the server: nothing else touches the
// key between their reads and writes. Each touches one key, KEYS[1], the
// record of one id (so any key layout works in cluster mode).
//
// The record is a string "<state> <token> <lease ms> <released> <owner>":
//
//   - state: "h" while a holding is out (held, or its lease ran out and
//     nobody took over yet), "r" once it was released;
//   - token: the fencing token of the last holding;
//   - lease ms: the lease of its last acquire or renewal;
//   - released: the nonces of the last (up to) four Release calls that
//     released a holding of this id, newest first, comma-separated, or "-";
//     carried from holding to holding so that a retried Release can tell
//     that its own earlier attempt released the lock;
//   - owner: the owner of the last holding (last, so it may hold any byte).
//
// Its TTL says the rest, on the server's clock, without TIME: an acquire or
// renewal sets it to lease + G (G = one day), a release to G. So
//
//   - a holding is held while PTTL >= G: its lease has not run out (like a
//     key with PX lease, it is held through the lease's last millisecond);
//   - its remaining lease is PTTL - G (plus under 1 ms);
//   - the time since its last acquire or renewal is lease + G - PTTL
//     whole milliseconds of the server's clock (the true time is up to 1 ms
//     more or less), which is what StealAfter compares: a steal needs more
//     than StealAfter ms, so that at least StealAfter has truly passed;
//   - the record outlives every holding by G, so tokens keep growing and
//     TookOver can tell an expired holding from a released one.
//
// TIME is read once, when Acquire issues a token: a new token is the larger
// of the last token plus one and the server's time in microseconds, so that
// tokens still grow when the record was lost (a restart without persistence,
// an eviction) or is older than the last one issued (a failover to a replica
// that missed the latest writes), given a server clock that does not go back.
// Lua numbers are doubles: exact up to 2^53, some 285 years of microseconds.
//
// Earlier versions kept "<token> <µs> <owner>" under the same key, with the
// lease as TTL (and the fence in a second key). The scripts read such a
// holding as held by someone else until its key expires: busy for Acquire
// (never stolen), not held for Renew and Release.
//
// Commands per call: Acquire: GET + TIME + SET when the record is absent or
// released; GET + PTTL (+ TIME + SET when it takes over) when it is held or
// expired. Renew: GET + PTTL + SET. Release: GET + PTTL + SET; GET (+ PTTL)
// when the owner does not hold it.

// acquireScript: ARGV[1] owner, ARGV[2] lease ms, ARGV[3] StealAfter ms
// (0: never steal; steals when more than that many whole milliseconds have
// passed since the holder's last acquire or renewal).
// Replies: a bulk string, the token: acquired; an array {token}: acquired,
// taking over an expired or stolen holding; an integer: busy, the holder's
// remaining lease in whole ms (0 in its last millisecond).
var acquireScript = redis.NewScript(`
local G = 86400000
local v = redis.call('GET', KEYS[1])
local tok, rel, took = 0, '-', false
if v then
  local st, t, l, r, o = string.match(v, '^(%a) (%d+) (%d+) (%S+) (.*)$')
  if not st then
    if string.match(v, '^%d+ %d+ ') then
      -- Held by an earlier version (one key per holding, TTL the lease).
      return math.max(redis.call('PTTL', KEYS[1]), 0)
    end
    return redis.error_reply('ERR taskguard: not a lock record')
  end
  tok, rel = tonumber(t), r
  if st == 'h' then
    local pttl = redis.call('PTTL', KEYS[1])
    if pttl >= G then
      if o == ARGV[1] then
        -- This owner's own acquire, retried after its reply was lost.
        redis.call('SET', KEYS[1], 'h ' .. t .. ' ' .. ARGV[2] .. ' ' .. r .. ' ' .. o, 'PX', ARGV[2] + G)
        return t
      end
      local steal = tonumber(ARGV[3])
      if steal == 0 or l + G - pttl <= steal then
        return pttl - G
      end
    end
    took = true
  end
end
local now = redis.call('TIME')
now = now[1] * 1000000 + now[2]
if now > tok then tok = now else tok = tok + 1 end
local s = string.format('%d', tok)
redis.call('SET', KEYS[1], 'h ' .. s .. ' ' .. ARGV[2] .. ' ' .. rel .. ' ' .. ARGV[1], 'PX', ARGV[2] + G)
if took then return {s} end
return s
`)

// renewScript: ARGV[1] owner, ARGV[2] lease ms.
// Replies: a bulk string, the token: renewed; 0: owner does not hold it.
var renewScript = redis.NewScript(`
local G = 86400000
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local st, t, l, r, o = string.match(v, '^(%a) (%d+) (%d+) (%S+) (.*)$')
if not st then
  if string.match(v, '^%d+ %d+ ') then return 0 end -- an earlier version's holding
  return redis.error_reply('ERR taskguard: not a lock record')
end
if st ~= 'h' or o ~= ARGV[1] or redis.call('PTTL', KEYS[1]) < G then return 0 end
redis.call('SET', KEYS[1], 'h ' .. t .. ' ' .. ARGV[2] .. ' ' .. r .. ' ' .. o, 'PX', ARGV[2] + G)
return t
`)

// releaseScript: ARGV[1] owner, ARGV[2] nonce, unique to one Release call
// and the same in the client's retries of it.
// Replies: 1: released, now or by an earlier attempt of the same call
// (whose reply was lost), whatever happened to the id since; 0: owner does
// not hold it and this call did not release it.
var releaseScript = redis.NewScript(`
local G = 86400000
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local st, t, l, r, o = string.match(v, '^(%a) (%d+) (%d+) (%S+) (.*)$')
if not st then
  if string.match(v, '^%d+ %d+ ') then return 0 end -- an earlier version's holding
  return redis.error_reply('ERR taskguard: not a lock record')
end
if st == 'h' and o == ARGV[1] and redis.call('PTTL', KEYS[1]) >= G then
  local rel = ARGV[2]
  if r ~= '-' then rel = rel .. ',' .. (string.match(r, '^[^,]+,[^,]+,[^,]+') or r) end
  redis.call('SET', KEYS[1], 'r ' .. t .. ' ' .. l .. ' ' .. rel .. ' ' .. o, 'PX', G)
  return 1
end
if string.find(',' .. r .. ',', ',' .. ARGV[2] .. ',', 1, true) then return 1 end
return 0
`)
