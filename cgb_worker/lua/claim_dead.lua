-- Another receiver's unfinished inbox entries, taken over only once it is dead (its heartbeat key expired), and
-- its name removed from the group once it holds none (in the same call when this one took its last entries, so a
-- dead name does not linger until it looks idle). Atomic, so two survivors never both take one entry, and
-- an entry is never dropped from the group's pending list while unprocessed.
-- KEYS[1] the inbox stream, KEYS[2] the other consumer's heartbeat key.
-- ARGV[1] the group, ARGV[2] the other consumer, ARGV[3] this consumer, ARGV[4] how many to take at most.
-- Returns the entries taken ({id, {field, value, ...}} each; none when it is alive or held nothing).
if redis.call('EXISTS', KEYS[2]) == 1 then return {} end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[4], ARGV[2])
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return {}
end
local ids = {}
for i, p in ipairs(pending) do ids[i] = p[1] end
local taken = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return taken
