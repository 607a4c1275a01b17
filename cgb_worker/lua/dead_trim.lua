-- KEYS: index, entries, payloads, the replays under way. ARGV: the cap, the chunk, the send log's key prefix. Drops up to a chunk of
-- the oldest entries past the cap, with their send records; returns how many are still past it.
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local n = math.min(excess, tonumber(ARGV[2]))
local old = redis.call('ZRANGE', KEYS[1], 0, n - 1)
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - 1)
redis.call('HDEL', KEYS[2], unpack(old))
for i, id in ipairs(old) do
    local origin = redis.call('HGET', KEYS[3] .. ':origin', id)
    if origin then redis.call('DEL', ARGV[3] .. origin) end
end
redis.call('HDEL', KEYS[3], unpack(old))
redis.call('HDEL', KEYS[3] .. ':origin', unpack(old))
redis.call('HDEL', KEYS[4], unpack(old))
return excess - n
