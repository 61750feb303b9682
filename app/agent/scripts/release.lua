-- Let a lease go without ending the run (the worker is shutting down): another worker takes the
-- run over at once and writes only the steps this one did not. KEYS: meta. ARGV: lease token.
if redis.call('HGET', KEYS[1], 'agent_lease') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'agent_lease', 'agent_lease_until')
return 1
