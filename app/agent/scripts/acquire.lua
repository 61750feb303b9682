-- Take a conversation's run lease, and say what to answer next.
-- KEYS: meta, events, inbox, run. ARGV: lease token, lease ms, history events.
-- Returns {'gone'} (no such conversation: drop its work), {'idle'} (nothing queued), {'paused'}
-- (stopped; waits for the next user message), {'busy'} (another live worker holds the lease: it
-- answers what is queued before it lets go), or {'ok', cause, steps written, stop id or '',
-- repository, selected_branch, title, history (XREVRANGE entries, newest first)}.
local m = redis.call('HMGET', KEYS[1], 'owner', 'pending', 'agent_paused', 'agent_lease', 'agent_lease_until',
  'agent_stop', 'repository', 'selected_branch', 'title')
if not m[1] or m[2] then return {'gone'} end
local cause = redis.call('LINDEX', KEYS[3], 0)
if not cause then return {'idle'} end
if m[3] then return {'paused'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if m[4] and m[4] ~= ARGV[1] and tonumber(m[5] or '0') > now then return {'busy'} end
redis.call('HSET', KEYS[1], 'agent_lease', ARGV[1], 'agent_lease_until', now + tonumber(ARGV[2]))
local run = redis.call('HMGET', KEYS[4], 'cause', 'last')
local steps = 0
if run[1] == cause then steps = tonumber(run[2] or '0') end
local history = redis.call('XREVRANGE', KEYS[2], string.format('%d', tonumber(cause) + 1) .. '-0', '-',
  'COUNT', tonumber(ARGV[3]))
return {'ok', cause, steps, m[6] or '', m[7] or '', m[8] or '', m[9] or '', history}
