-- The last step of a replay, once its new job is enqueued: the entry leaves the store, the replay links are set
-- and the send record gets its usual lifetime back, all at once. Only the replay that holds the reservation
-- finishes it: of replays racing for one dead letter, one does.
-- KEYS: index, entries, payloads, origins, the replays under way, replayed_as(old), replay_of(new), the send
-- record the replay continues. ARGV: the dead letter's id, the new job's id, the links' TTL, the record's TTL,
-- 1 when this caller's enqueue made the job (arq took the id from it, not from an earlier replay).
-- Returns 1 when this call finished it, or made the job while the entry was deleted or trimmed meanwhile (the
-- job stands, so its links do too); 0 when it was not this replay's to finish.
if redis.call('HGET', KEYS[5], ARGV[1]) ~= ARGV[2] then
  if ARGV[5] ~= '1' then return 0 end
  redis.call('SET', KEYS[6], ARGV[2], 'EX', ARGV[3])
  redis.call('SET', KEYS[7], ARGV[1], 'EX', ARGV[3])
  redis.call('EXPIRE', KEYS[8], ARGV[4])
  return 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('SET', KEYS[6], ARGV[2], 'EX', ARGV[3])
redis.call('SET', KEYS[7], ARGV[1], 'EX', ARGV[3])
redis.call('EXPIRE', KEYS[8], ARGV[4])
return 1
