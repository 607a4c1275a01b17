-- KEYS: index, entries, payloads, origins. ARGV: the id. Takes the entry out and returns {entry, payload, origin},
-- or nil when there is none (never, or another replay took it first).
local entry = redis.call('HGET', KEYS[2], ARGV[1])
local payload = redis.call('HGET', KEYS[3], ARGV[1])
if not entry or not payload then return false end
local origin = redis.call('HGET', KEYS[4], ARGV[1]) or ARGV[1]
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return {entry, payload, origin}
