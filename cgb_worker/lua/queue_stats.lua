-- KEYS: arq's queue, the jobs our rate limit deferred (keys.RATE_WAITING, scored by enqueue time).
-- ARGV: now (ms), arq's in-progress key prefix, how many head entries to look at at most.
-- Returns {due, deferred, running at the head, score of the oldest due job not running (or -1),
-- enqueue time of the oldest job waiting for the rate limit (or -1)}.
-- arq keeps a running job in its queue, at its score, until it ends; workers take jobs from the head, so the
-- running ones are the head's first entries: walking from the head to the first job without an in-progress
-- key counts them and finds the oldest waiting job in a few steps, not the whole backlog. (The in-progress
-- keys are named here, not in KEYS: arq's keys are not Cluster-compatible anyway.)
local now = tonumber(ARGV[1])
local due = redis.call('ZCOUNT', KEYS[1], '-inf', now)
local deferred = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
local running, oldest = 0, -1
local limit = tonumber(ARGV[3])
local offset = 0
while offset < due and offset < limit do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', offset, 100)
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    if redis.call('EXISTS', ARGV[2] .. batch[i]) == 1 then
      running = running + 1
    else
      oldest = batch[i + 1]
      break
    end
  end
  if oldest ~= -1 then break end
  offset = offset + 100
end
-- A job the rate limit deferred is a backlog that arq holds as deferred: the oldest of them still queued (and
-- not running) gives the queue's age. Entries whose job has left the queue are dropped on the way (at most 200
-- a call: a scrape stays short; the rest go on the next ones).
local waiting, checked, skip = -1, 0, 0
while checked < 200 do
  local entry = redis.call('ZRANGE', KEYS[2], skip, skip, 'WITHSCORES')
  if #entry == 0 then break end
  checked = checked + 1
  if not redis.call('ZSCORE', KEYS[1], entry[1]) then
    redis.call('ZREM', KEYS[2], entry[1])
  elseif redis.call('EXISTS', ARGV[2] .. entry[1]) == 1 then
    skip = skip + 1
  else
    waiting = entry[2]
    break
  end
end
return {due, deferred, running, tostring(oldest), tostring(waiting)}
