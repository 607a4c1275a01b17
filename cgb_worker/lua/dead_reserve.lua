-- The first step of a replay: the id its new job goes by, chosen once per dead letter and kept until the replay
-- is finished (dead_finish.lua), so that a replay cut short anywhere (the console's answer timed out, the
-- process died, Redis froze and thawed) is finished by the next one under the same id, which arq enqueues at
-- most once; nothing is taken out of the store here.
-- KEYS: entries, the replays under way. ARGV: the dead letter's id, the id to give its new job if none was yet.
-- Returns the new job's id, or false when there is no such dead letter.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return false end
local chosen = redis.call('HGET', KEYS[2], ARGV[1])
if chosen then return chosen end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return ARGV[2]
