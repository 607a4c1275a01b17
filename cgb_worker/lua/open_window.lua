-- An inbound message opens the person's 24-hour window; a later inbound never loses to an earlier one, nor
-- to a 131047 that shut the window after it.
-- KEYS[1] the window key. ARGV[1] the inbound's time (ms), ARGV[2] the key's TTL (s). Returns 1 when written.
local cur = redis.call('GET', KEYS[1])
if cur then
  local state, at = string.match(cur, '^(%a):(%d+)$')
  if state == 'o' and tonumber(at) >= tonumber(ARGV[1]) then return 0 end
  if state == 'c' and tonumber(at) > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], 'o:' .. ARGV[1], 'EX', ARGV[2])
return 1
