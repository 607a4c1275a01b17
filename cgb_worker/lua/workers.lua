-- KEYS: the index of workers. ARGV: the heartbeat key prefix. Returns {heartbeat, ms left to live, ...} for each
-- live worker; an index entry whose heartbeat is gone is dropped. The time left (PTTL) dates each heartbeat
-- by Redis's clock alone, so no reader compares its own clock with a worker's.
local found = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[1] .. id
  local beat = redis.call('GET', key)
  if beat then
    found[#found + 1] = beat
    found[#found + 1] = redis.call('PTTL', key)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return found
