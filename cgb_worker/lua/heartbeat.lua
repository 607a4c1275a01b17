-- KEYS: the worker's heartbeat, the index of workers. ARGV: the worker's id, the heartbeat (JSON; empty to
-- remove it), its lifetime (ms), now (ms). The key and its index entry change together; index entries of
-- heartbeats that expired (workers killed outright) are dropped here, so the index stays as small as the fleet.
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
return 1
