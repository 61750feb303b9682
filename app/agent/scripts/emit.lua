-- Write one event of a run, once: step N of the run answering `cause` is stored at most once.
-- KEYS: meta, events, run, channel, reply. ARGV: lease token, cause, step, the event's JSON without
-- its opening '{' and without "id", retention (0: keep all), publish command (PUBLISH, SPUBLISH or
-- '' for none), new agent_state ('' to keep it), '1' if this event ends the live reply.
-- Returns {event id, 0} when written, {event id, 1} when that step was written before, {-1} no such
-- conversation, {-3} the lease is another worker's (this one must stop), {-4} a step was skipped,
-- {-5} that run has ended already.
local m = redis.call('HMGET', KEYS[1], 'owner', 'agent_lease', 'agent_done')
if not m[1] then return {-1} end
if m[3] and tonumber(m[3]) >= tonumber(ARGV[2]) then return {-5} end
if m[2] ~= ARGV[1] then return {-3} end
local run = redis.call('HMGET', KEYS[3], 'cause', 'last')
local last = 0
if run[1] == ARGV[2] then
  last = tonumber(run[2] or '0')
else
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'cause', ARGV[2])
end
local step = tonumber(ARGV[3])
if step <= last then return {tonumber(redis.call('HGET', KEYS[3], ARGV[3])), 1} end
if step ~= last + 1 then return {-4} end
local n = redis.call('HINCRBY', KEYS[1], 'last_event_id', 1)
local id = string.format('%d', n)
local data = '{"id":' .. id .. ',' .. ARGV[4]
local entry = string.format('%d', n + 1) .. '-0'
local retention = tonumber(ARGV[5])
if retention > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', retention, entry, 'e', data)
else
  redis.call('XADD', KEYS[2], entry, 'e', data)
end
redis.call('HSET', KEYS[3], ARGV[3], id, 'last', step)
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'agent_state', ARGV[7]) end
if ARGV[8] == '1' then redis.call('DEL', KEYS[5]) end
local publish = ARGV[6]
if publish == 'SPUBLISH' and not redis.REDIS_VERSION then publish = 'PUBLISH' end  -- a 6.2 master
if publish ~= '' then redis.call(publish, KEYS[4], data) end
return {n, 0}
