-- Keep a run's lease, and learn whether the user asked it to stop.
-- KEYS: meta. ARGV: lease token, lease ms. Returns {1, stop id or ''} while the lease is ours,
-- {0} when it is not (another worker took over: stop at once), {-1} no such conversation.
local m = redis.call('HMGET', KEYS[1], 'owner', 'agent_lease', 'agent_stop')
if not m[1] then return {-1} end
if m[2] ~= ARGV[1] then return {0} end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'agent_lease_until',
  tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]))
return {1, m[3] or ''}
