-- KEYS: arq's queue. ARGV: now (ms), arq's in-progress key prefix, how many head entries to look at at most.
-- Returns {due, deferred, running at the head, score of the oldest due job not running (or -1)}.
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
return {due, deferred, running, tostring(oldest)}
