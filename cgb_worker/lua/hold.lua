-- A status that cannot be placed yet is held, unless the held set is full: then it is kept as unmatched with
-- the reason 'overflow' at once, so that nobody's statuses cannot grow the set without bound.
-- KEYS[1] the held set (scored by when each is next tried), KEYS[2] when each was first held, KEYS[3] the
-- unmatched stream.
-- ARGV[1] the held item, ARGV[2] its first try (s), ARGV[3] now (ms), ARGV[4] the held set's cap, ARGV[5] the
-- unmatched stream's length cap, ARGV[6] the oldest unmatched entry id kept, ARGV[7] what the unmatched entry
-- keeps of the status (redacted).
-- Returns 1 when held, 0 when it was held already, -1 when kept as unmatched.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'status', ARGV[7], 'reason', 'overflow', 'rivals', 0)
  redis.call('XTRIM', KEYS[3], 'MINID', '~', ARGV[6])
  return -1
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3])
return 1
