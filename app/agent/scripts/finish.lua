-- End a run: its last event (agent_state_changed), the message off the inbox, the lease kept for
-- the next queued message or let go. Once per cause: a re-sent finish finds agent_done and stops.
-- KEYS: meta, events, run, channel, reply, inbox. ARGV: lease token, cause, step, timestamp, state
-- (awaiting_user_input, stopped or error), retention, publish command, lease ms.
-- Returns {event id, 1 if more is queued (the lease is still ours), state written}, {0, more, ''}
-- when this run was ended before, {-1} no such conversation, {-3} the lease is another worker's.
local m = redis.call('HMGET', KEYS[1], 'owner', 'agent_lease', 'agent_done', 'agent_stop')
if not m[1] then return {-1} end
if m[3] and tonumber(m[3]) >= tonumber(ARGV[2]) then
  return {0, (m[2] == ARGV[1] and redis.call('LLEN', KEYS[6]) > 0) and 1 or 0, ''}
end
if m[2] ~= ARGV[1] then return {-3} end
local state = ARGV[5]
-- A stop that came while the run was ending still wins: the user asked it to stop.
if m[4] and state == 'awaiting_user_input' then state = 'stopped' end
local n = redis.call('HINCRBY', KEYS[1], 'last_event_id', 1)
local id = string.format('%d', n)
local data = '{"id":' .. id .. ',"timestamp":"' .. ARGV[4] .. '","source":"agent","type":"agent_state_changed",'
  .. '"cause":' .. ARGV[2] .. ',"agent_state":"' .. state .. '"}'
local entry = string.format('%d', n + 1) .. '-0'
local retention = tonumber(ARGV[6])
if retention > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', retention, entry, 'e', data)
else
  redis.call('XADD', KEYS[2], entry, 'e', data)
end
redis.call('HSET', KEYS[1], 'agent_state', state, 'agent_done', ARGV[2])
if redis.call('LINDEX', KEYS[6], 0) == ARGV[2] then redis.call('LPOP', KEYS[6]) end
redis.call('DEL', KEYS[3], KEYS[5])
local paused = false
if m[4] then
  redis.call('HDEL', KEYS[1], 'agent_stop')
  -- Stopped: what is queued stays queued until the next user message (append clears the pause),
  -- unless that next message came already, after the stop. A run that failed was not stopped.
  local newest = redis.call('LINDEX', KEYS[6], -1)
  if state == 'stopped' and (not newest or tonumber(newest) < tonumber(m[4])) then
    redis.call('HSET', KEYS[1], 'agent_paused', '1')
    paused = true
  end
end
local more = 0
if not paused and redis.call('LLEN', KEYS[6]) > 0 then more = 1 end
if more == 1 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'agent_lease_until',
    tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[8]))
else
  redis.call('HDEL', KEYS[1], 'agent_lease', 'agent_lease_until')
end
local publish = ARGV[7]
if publish == 'SPUBLISH' and not redis.REDIS_VERSION then publish = 'PUBLISH' end
if publish ~= '' then redis.call(publish, KEYS[4], data) end
return {n, more, state}
