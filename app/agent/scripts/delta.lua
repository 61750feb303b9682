-- A live bit of the reply being produced: appended to the reply so far (for streams that join
-- mid-reply) and published, once per offset. Not stored as an event.
-- KEYS: meta, reply, channel. ARGV: lease token, cause, offset in bytes of the reply so far, the
-- text, the delta's JSON ({"cause","offset","text"}), publish command, reply TTL seconds.
-- Returns 1 published, 0 already there (a re-send), -1 no such conversation, -3 not our lease,
-- -4 a gap (an earlier bit is missing).
local m = redis.call('HMGET', KEYS[1], 'owner', 'agent_lease', 'last_event_id')
if not m[1] then return -1 end
if m[2] ~= ARGV[1] then return -3 end
local prefix = ARGV[2] .. ':'
local offset = tonumber(ARGV[3])
local current = redis.call('GET', KEYS[2])
if not current or string.sub(current, 1, #prefix) ~= prefix then
  if offset ~= 0 then return -4 end
  redis.call('SET', KEYS[2], prefix .. ARGV[4], 'EX', tonumber(ARGV[7]))
else
  local have = #current - #prefix
  if have > offset then return 0 end
  if have < offset then return -4 end
  redis.call('APPEND', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
end
local publish = ARGV[6]
if publish == 'SPUBLISH' and not redis.REDIS_VERSION then publish = 'PUBLISH' end
-- Every event up to last_event_id was announced before this: the stream places the bit after it.
if publish ~= '' then redis.call(publish, KEYS[3], '~' .. (m[3] or '-1') .. ':' .. ARGV[5]) end
return 1
