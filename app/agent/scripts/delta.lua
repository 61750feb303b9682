-- A live bit of the reply being produced: appended to the reply so far (for streams that join
-- mid-reply) and published, once per offset. Not stored as an event.
-- KEYS: meta, reply, channel, run. ARGV: lease token, cause, offset in bytes of the reply so far,
-- the text, the delta's JSON ({"cause","offset","text"}), publish command, reply TTL seconds, the
-- id the stream places it after ('': the conversation's last event id).
-- Returns 1 published, 0 already there (a re-send), -1 no such conversation, -3 not our lease,
-- -4 not ours to go on (a gap, or a reply begun by another worker's attempt at this run).
local m = redis.call('HMGET', KEYS[1], 'owner', 'agent_lease', 'last_event_id')
if not m[1] then return -1 end
if m[2] ~= ARGV[1] then return -3 end
local prefix = ARGV[2] .. ':'
local offset = tonumber(ARGV[3])
local length = redis.call('STRLEN', KEYS[2])
local ours = length > 0 and redis.call('GETRANGE', KEYS[2], 0, #prefix - 1) == prefix
if not ours then
  if offset ~= 0 then return -4 end
  redis.call('SET', KEYS[2], prefix .. ARGV[4], 'EX', tonumber(ARGV[7]))
  redis.call('HSET', KEYS[4], 'reply_token', ARGV[1])
else
  -- A run taken over mid-reply cuts its bits elsewhere than the first attempt: it adds none.
  if redis.call('HGET', KEYS[4], 'reply_token') ~= ARGV[1] then return -4 end
  local have = length - #prefix
  if have > offset then return 0 end
  if have < offset then return -4 end
  redis.call('APPEND', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
end
local publish = ARGV[6]
if publish == 'SPUBLISH' and not redis.REDIS_VERSION then publish = 'PUBLISH' end
-- Every event up to that id was announced before this: the stream places the bit after it.
local after = ARGV[8]
if after == nil or after == '' then after = m[3] or '-1' end
if publish ~= '' then redis.call(publish, KEYS[3], '~' .. after .. ':' .. ARGV[5]) end
return 1
