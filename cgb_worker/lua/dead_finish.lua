-- The last step of a replay, once its new job is enqueued: the entry leaves the store, the replay links are set
-- and the send record gets its usual lifetime back, all at once. Only the replay that holds the reservation
-- finishes it: of replays racing for one dead letter, one does.
-- KEYS: index, entries, payloads, origins, the replays under way, replayed_as(old), replay_of(new), the send
-- record the replay continues. ARGV: the dead letter's id, the new job's id, the links' TTL, the record's TTL.
-- Returns 1 when this call finished it, 0 when it was not (or no longer) this replay's to finish.
if redis.call('HGET', KEYS[5], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('SET', KEYS[6], ARGV[2], 'EX', ARGV[3])
redis.call('SET', KEYS[7], ARGV[1], 'EX', ARGV[3])
redis.call('EXPIRE', KEYS[8], ARGV[4])
return 1
