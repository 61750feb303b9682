"""The Lua scripts of store.py and ratelimit.py: each one round trip, touching one Cluster slot (KEYS by position)."""

# One round trip per append: ownership, idempotency, id, event, retention and the answer record.
# KEYS: meta, events, idempotency answers, their expiry, the conversation's channel, its agent
# inbox, its run in progress, and (not on a Cluster: another slot) the agent work shard. ARGV: owner ('' skips the
# check), event JSON without its opening '{' and without "id", retention (0: keep all), hashed
# Idempotency-Key ('' for none), its TTL, body digest, the publish command (PUBLISH, or SPUBLISH on
# a Redis 7 Cluster; '' when the caller announces it itself, once replicated), what it is to the
# agents ('message': queued for an answer and the work shard told, in the same step; 'stop': ends
# the run going, if one is: from its first event to its end; ''), the conversation id. Returns
# {id}, or {id, 1} when the agents must be told (done here unless on a Cluster). The
# event is announced in the same step as it is stored, so every hub following the conversation
# hears of it; a hub that missed it reads the stream. A retry of the same call after a lost
# reply is answered from the record, so only an append made without a key can be stored twice,
# and only when its caller re-sends it (the pool never does).
APPEND_LUA = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner or (ARGV[1] ~= '' and owner ~= ARGV[1]) then return {-1} end
if redis.call('HEXISTS', KEYS[1], 'pending') == 1 then return {-1} end
local now = tonumber(redis.call('TIME')[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 16)
if #expired > 0 then
  redis.call('HDEL', KEYS[3], unpack(expired))
  redis.call('ZREM', KEYS[4], unpack(expired))
end
local field = ARGV[4]
if field ~= '' then
  local prev = redis.call('HGET', KEYS[3], field)
  local until_ = redis.call('ZSCORE', KEYS[4], field)
  if prev and until_ and tonumber(until_) > now then return {-2, prev} end
end
local n = redis.call('HINCRBY', KEYS[1], 'last_event_id', 1)
local id = string.format('%d', n)
local data = '{"id":' .. id .. ',' .. ARGV[2]
local entry = string.format('%d', n + 1) .. '-0'
local retention = tonumber(ARGV[3])
if retention > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', retention, entry, 'e', data)
else
  redis.call('XADD', KEYS[2], entry, 'e', data)
end
if field ~= '' then
  local expiry = now + tonumber(ARGV[5])
  redis.call('HSET', KEYS[3], field, id .. ':' .. ARGV[6])
  redis.call('ZADD', KEYS[4], expiry, field)
  -- Both go by themselves with the newest record, so an idle conversation keeps none for long.
  redis.call('EXPIREAT', KEYS[3], expiry)
  redis.call('EXPIREAT', KEYS[4], expiry)
end
-- A master older than 7 (a Cluster mid-upgrade) has no SPUBLISH: PUBLISH reaches every node there.
-- Failing here would leave the event stored and its post answered 500.
local publish = ARGV[7]
if publish == 'SPUBLISH' and not redis.REDIS_VERSION then publish = 'PUBLISH' end
if publish ~= '' then redis.call(publish, KEYS[5], data) end
if ARGV[8] == 'message' then
  -- A work entry only when nothing was queued (or it was held by a stop): otherwise the entry of
  -- the first queued message is still pending, and whoever answers it answers the whole queue.
  local queued = redis.call('RPUSH', KEYS[6], id)
  local paused = redis.call('HDEL', KEYS[1], 'agent_paused')  -- stopped: answers again, queue first
  if queued == 1 or paused == 1 then
    if KEYS[8] then redis.call('XADD', KEYS[8], '*', 'c', ARGV[9]) end
    return {n, 1}
  end
elseif ARGV[8] == 'stop' and redis.call('EXISTS', KEYS[7]) == 1 then
  -- A run is going (its first event is written, its end is not, whichever worker has it now,
  -- or will after a takeover): it sees this within its heartbeat. With none going (idle,
  -- stopped, between two runs, a message queued that no run took yet) nothing changes.
  redis.call('HSET', KEYS[1], 'agent_stop', id)
end
return {n}
"""

# Step 1 of a create. KEYS: meta, events, agent inbox. ARGV: pending TTL, event 0 JSON tail ('' for none), then
# the metadata as field, value pairs. Re-run after a lost reply, it finds its own work and stops
# (ids are 192 random bits: no one else makes this conversation).
CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'pending', '1', unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'last_event_id', 0)
  redis.call('XADD', KEYS[2], '1-0', 'e', '{"id":0,' .. ARGV[2])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
  redis.call('DEL', KEYS[3])
  redis.call('RPUSH', KEYS[3], '0')  -- event 0 is a user message: the agents answer it
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[1]))
end
return 1
"""

# Step 2: the owner's index. KEYS: user sequence, user conversations. ARGV: conversation id.
# Idempotent: a conversation already indexed keeps its place.
INDEX_LUA = """
local seq = redis.call('ZSCORE', KEYS[2], ARGV[1])
if seq then return tonumber(seq) end
seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
return seq
"""

# Step 3: the conversation becomes visible and permanent. KEYS: meta, events, agent inbox, and (not
# on a Cluster) the agent work shard. ARGV: owner, conversation id. 0 if it expired meanwhile (the
# create took longer than its pending TTL). Idempotent (a re-sent commit tells the agents twice,
# which answers nothing twice).
COMMIT_LUA = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'pending')
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
if redis.call('PERSIST', KEYS[3]) == 1 and KEYS[4] then redis.call('XADD', KEYS[4], '*', 'c', ARGV[2]) end
return 1
"""

# KEYS: every key of the conversation, meta first, then its channel. ARGV: owner, publish command, the notice.
# Deletes it if it is the owner's, and says so on the channel (its open streams end at once).
DELETE_LUA = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner or owner ~= ARGV[1] then return 0 end
local channel = table.remove(KEYS)
redis.call('UNLINK', unpack(KEYS))  -- a long stream is freed in the background
local publish = ARGV[2]
if publish == 'SPUBLISH' and not redis.REDIS_VERSION then publish = 'PUBLISH' end  -- as in APPEND_LUA
redis.call(publish, channel, ARGV[3])
return 1
"""

# KEYS: user streams. ARGV: lease TTL, cap, connection id. 1 if the stream may open. Times are
# Redis' own (TIME), so hosts whose clocks disagree still count each other's leases right.
ACQUIRE_STREAM_LUA = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
local expiry = now + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], expiry, ARGV[3])
redis.call('EXPIREAT', KEYS[1], math.ceil(expiry) + 1)
return 1
"""

# KEYS: user streams. ARGV: lease TTL, then the connection ids whose leases the caller renews.
# XX: a lease released or expired meanwhile is not brought back.
RENEW_STREAMS_LUA = """
local now = redis.call('TIME')
local expiry = tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIREAT', KEYS[1], math.ceil(expiry) + 1) end
return 1
"""

# Sign-out (auth.revoke_cookies). KEYS: the API key's record. ARGV: the cookie generation field.
# Raises the key's cookie generation, so every cookie minted so far (which signs the one before)
# is refused; only on a key that exists (never a stub hash). Not idempotent on purpose: a second
# run (a retry by hand) revokes the cookies minted between the two as well, which is safe.
SIGN_OUT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
"""

# A per-key rate limit (ratelimit.py): GCRA, a token bucket kept as one number, the theoretical
# arrival time (TAT, unix microseconds of Redis' clock) at which the bucket is full again.
# KEYS: the limit's key, then (optional) the API key's record: with it, nothing is counted unless
# the record is live (a user, not revoked), for a Bearer key (ARGV[3] not '') its hash is ARGV[3],
# and for a session cookie (ARGV[4] not '') its generation is the key's (a signed-out or stolen
# cookie is a 401: credentials a worker will refuse must not spend the key's budget). ARGV:
# emission interval (us between requests at the sustained rate), tolerance (interval * (burst - 1)),
# the presented key's hash, the cookie's generation, and '1' when a request Redis cannot count
# (it refuses writes: out of memory, a read-only replica) may go on uncounted (stream opens, which
# only read: a 503 would close a browser's EventSource for good), '' when it is refused with that error (a 503).
# Returns 0 (counted: let it through), the microseconds to wait (refused: nothing written), -1
# (not counted: the credentials are refused) or -2 (not counted: Redis refuses writes; let it
# through). The key expires when the bucket is full again, which is what a missing key means:
# idle keys vanish.
RATE_LIMIT_LUA = """
if KEYS[2] then
  local rec = redis.call('HMGET', KEYS[2], 'user_id', 'revoked_at', 'hash', 'cookie_gen')
  if not rec[1] or rec[2] or (ARGV[3] ~= '' and rec[3] ~= ARGV[3]) then return -1 end
  local gen = ARGV[4] or ''
  if gen ~= '' and (tonumber(rec[4] or '0') or 0) ~= tonumber(gen) then return -1 end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0) or 0, now)
local wait = tat - tonumber(ARGV[2]) - now
if wait > 0 then return wait end
tat = tat + tonumber(ARGV[1])
local set = {'SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000)}
if ARGV[5] ~= '1' then
  redis.call(unpack(set))
  return 0
end
local done = redis.pcall(unpack(set))
if type(done) == 'table' and done.err then
  -- Redis 6.2 prefixes the error with where the script was ('@user_script: 19: -OOM ...'); 7 does not.
  local code = string.match((string.gsub(done.err, '^@[%w_]+: ?%d+: ', '')), '^%-?(%u+)')
  if code == 'OOM' or code == 'READONLY' then return -2 end
  return redis.error_reply(done.err)
end
return 0
"""
