-- Reset the idle time of the work entries a consumer still holds, so nobody claims them meanwhile;
-- an entry another consumer claimed since (this one was paused) stays theirs.
-- KEYS: the work shard. ARGV: the consumer, then the entry ids. Returns how many were touched.
local wanted = {}
for i = 2, #ARGV do wanted[ARGV[i]] = true end
local mine = {}
for _, entry in ipairs(redis.call('XPENDING', KEYS[1], 'agents', '-', '+', #ARGV + 1000, ARGV[1])) do
  if wanted[entry[1]] then mine[#mine + 1] = entry[1] end
end
if #mine > 0 then redis.call('XCLAIM', KEYS[1], 'agents', ARGV[1], 0, unpack(mine), 'JUSTID') end
return #mine
