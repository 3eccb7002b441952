package redislock

import (
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// The scripts below run atomically on the server: nothing else touches the
// key between their reads and writes. Each touches one key, KEYS[1], the
// record of one id (so any key layout works in cluster mode).
//
// The record is a string of fixed layout, so that the scripts slice it
// rather than parse it (string.sub costs a fraction of string.match):
//
//	byte  1       state: "h" while a holding is out (held, or its lease ran
//	              out and nobody took over yet), "w" for the same when a
//	              waiter was turned away (its release is announced), "r"
//	              once it was released
//	bytes 2-49    the nonces of the last four Release calls that released a
//	              holding of this id, 12 bytes each, newest first ("-" x 12
//	              for none); carried from holding to holding, so that a
//	              retried Release can tell that its own earlier attempt
//	              released the lock
//	byte  50      " "
//	bytes 51-66   token of the last holding: 16 decimal digits, zero-padded
//	byte  67      " "
//	bytes 68-76   lease of its last acquire or renewal: 9 digits, ms
//	byte  77      " "
//	bytes 78-     owner of the last holding (any bytes)
//
// Its TTL says the rest, on the server's clock, without TIME: an acquire or
// renewal sets it to lease + G (G = grace, one day); a release keeps it
// (SETRANGE rewrites bytes 1-49 in place, which costs the server less than
// half of a SET with PX), and no script reads the TTL of a released record.
// So
//
//   - a holding is held while PTTL >= G: its lease has not run out (like a
//     key with PX lease, it is held through the lease's last millisecond);
//   - its remaining lease is PTTL - G (plus under 1 ms);
//   - the time since its last acquire or renewal is lease + G - PTTL
//     whole milliseconds of the server's clock (the true time is up to 1 ms
//     more or less), which is what StealAfter compares: a steal needs more
//     than StealAfter ms, so that at least StealAfter has truly passed;
//   - the record outlives every holding by G (a released one by G plus
//     what remained of its lease), so tokens keep growing and TookOver can
//     tell an expired holding from a released one.
//
// TIME is read once, when Acquire issues a token: a new token is the larger
// of the last token plus one and the server's time in microseconds, so that
// tokens still grow when the record was lost (a restart without persistence,
// an eviction) or is older than the last one issued (a failover to a replica
// that missed the latest writes), given a server clock that does not go back.
// The time in microseconds has 16 digits from 2001 to 2286; Lua numbers
// (doubles) are exact to 2^53, beyond that.
//
// Earlier versions kept "<token> <µs> <owner>" under the same key, with the
// lease as TTL (and the fence in a second key). The scripts read such a
// holding as held by someone else until its key expires: busy for Acquire
// (never stolen), not held for Renew and Release. Anything else under the
// key is an error.
//
// Announcements: the first Acquire turned away by a holding marks it "w"
// (SETRANGE, which keeps the TTL); the Release of a holding so marked
// publishes on the id's release channel (Backend.ReleaseChannel), where
// Backend.Watch listens. Holdings nobody waited for announce nothing, so an
// uncontended lock costs no PUBLISH.
//
// Commands per call: Acquire: GET + TIME + SET when the record is absent or
// released; GET + PTTL (+ TIME + SET when it takes over) when it is held or
// expired, + SETRANGE for the first waiter turned away. Renew: GET + PTTL +
// SET. Release: GET + PTTL + SETRANGE (+ PUBLISH when a waiter was turned
// away); GET (+ PTTL) when the owner does not hold it.
//
// Every argument the scripts pass to redis.call is a string: the server
// formats a Lua number into a string at each call, which costs about as
// much as a GET.

// acquireScript: ARGV[1] owner, ARGV[2] lease ms (9 digits), ARGV[3] lease
// + G ms, ARGV[4] StealAfter ms (0: never steal; steals when more than that
// many whole milliseconds have passed since the holder's last acquire or
// renewal).
// Replies: a bulk string, the token: acquired; an array {token}: acquired,
// taking over an expired or stolen holding; an integer: busy, the holder's
// remaining lease in whole ms (0 in its last millisecond).
var acquireScript = script(`
local G = @G
local v = redis.call('GET', KEYS[1])
local rel, tok, took, mark = '------------------------------------------------', '0000000000000000', false, 'h'
if v then
  local st = string.byte(v, 1)
  if (st ~= 104 and st ~= 114 and st ~= 119) or #v < 78 then
    if string.match(v, '^%d+ %d+ ') then
      return math.max(redis.call('PTTL', KEYS[1]), 0) -- an earlier version's holding
    end
    return redis.error_reply('ERR taskguard: not a lock record')
  end
  rel, tok = string.sub(v, 2, 49), string.sub(v, 51, 66)
  if st ~= 114 then
    local pttl = redis.call('PTTL', KEYS[1])
    if pttl >= G then
      if string.sub(v, 78) == ARGV[1] then
        -- This owner's own acquire, retried after its reply was lost.
        redis.call('SET', KEYS[1], string.sub(v, 1, 1) .. rel .. ' ' .. tok .. ' ' .. ARGV[2] .. ' ' .. ARGV[1], 'PX', ARGV[3])
        return tok
      end
      local steal = tonumber(ARGV[4])
      if steal == 0 or string.sub(v, 68, 76) + G - pttl <= steal then
        if st == 104 then redis.call('SETRANGE', KEYS[1], '0', 'w') end
        return pttl - G
      end
    end
    took = true
    if st == 119 then mark = 'w' end -- the others still wait: announce this holding's release too
  end
end
local t = redis.call('TIME')
local now = t[1] .. string.sub('00000' .. t[2], -6)
if #now ~= 16 or now <= tok then
  now = string.format('%016d', math.max(tonumber(now), tok + 1))
end
redis.call('SET', KEYS[1], mark .. rel .. ' ' .. now .. ' ' .. ARGV[2] .. ' ' .. ARGV[1], 'PX', ARGV[3])
if took then return {now} end
return now
`)

// renewScript: ARGV[1] owner, ARGV[2] lease ms (9 digits), ARGV[3] lease
// + G ms.
// Replies: a bulk string, the token: renewed; 0: owner does not hold it.
var renewScript = script(`
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local st = string.byte(v, 1)
if (st ~= 104 and st ~= 114 and st ~= 119) or #v < 78 then
  if string.match(v, '^%d+ %d+ ') then return 0 end -- an earlier version's holding
  return redis.error_reply('ERR taskguard: not a lock record')
end
if st == 114 or string.sub(v, 78) ~= ARGV[1] or redis.call('PTTL', KEYS[1]) < @G then
  return 0
end
redis.call('SET', KEYS[1], string.sub(v, 1, 67) .. ARGV[2] .. ' ' .. ARGV[1], 'PX', ARGV[3])
return string.sub(v, 51, 66)
`)

// releaseScript: ARGV[1] owner, ARGV[2] nonce: 12 bytes of [0-9a-z], drawn
// by one Release call and the same in the client's retries of it. It
// announces on KEYS[1] with ":lock" replaced by ":released" (the id's
// release channel, Backend.ReleaseChannel).
// Replies: 1: released, now or by an earlier attempt of the same call
// (whose reply was lost), whatever happened to the id since, unless four
// other releases came after it; 0: owner does not hold it and this call did
// not release it.
var releaseScript = script(`
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local st = string.byte(v, 1)
if (st ~= 104 and st ~= 114 and st ~= 119) or #v < 78 then
  if string.match(v, '^%d+ %d+ ') then return 0 end -- an earlier version's holding
  return redis.error_reply('ERR taskguard: not a lock record')
end
if st ~= 114 and string.sub(v, 78) == ARGV[1] and redis.call('PTTL', KEYS[1]) >= @G then
  redis.call('SETRANGE', KEYS[1], '0', 'r' .. ARGV[2] .. string.sub(v, 2, 37))
  if st == 119 then redis.call('PUBLISH', string.sub(KEYS[1], 1, -5) .. 'released', '1') end
  return 1
end
for i = 2, 38, 12 do
  if string.sub(v, i, i + 11) == ARGV[2] then return 1 end
end
return 0
`)

// grace (G in the scripts) is how long a record outlives its last holding:
// long enough for Acquire to see that a lease ran out, short enough that
// idle ids do not pile up forever.
const grace = 24 * time.Hour

// script compiles a script with G replaced by grace in milliseconds.
func script(src string) *redis.Script {
	return redis.NewScript(strings.ReplaceAll(src, "@G", strconv.FormatInt(grace.Milliseconds(), 10)))
}
