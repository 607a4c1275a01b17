-- Which of our sends a status belongs to (the attribution rule in the README, "Delivery receipts").
-- KEYS[1] the status's wamid key, KEYS[2] the awaiting set, KEYS[3] the recipient's turn key, KEYS[4] the
-- wamid's send-time key (when a 'sent' or 'failed' of it that could not be placed was stamped), KEYS[5] the
-- hash of how many messages of each resent step have been placed.
-- ARGV[1] the recipient's hash ('' when unknown), ARGV[2] the status's own time (ms, whole seconds as Meta
-- stamps them), ARGV[3] the match window (ms), ARGV[4] the clock skew allowed (ms), ARGV[5] the TTL of the
-- wamid's keys (s), ARGV[6] the status ('sent', 'delivered', ...), ARGV[7] '1' for a 'failed' whose code is given
-- when a send is refused (131047, a template's 132xxx), '' otherwise.
-- Returns {'wamid', ref} for a wamid already placed, {'recipient', ref} when exactly one of our sends to that
-- person could have produced it, {'none'} when none could, {'ambiguous', ref, ref, ...} when several could.
-- A ref is '<delivery id>|<step>'. Members: '<who>|<request ms, 13 digits>|<open until ms, 13 digits, 0 for one
-- message>|<ref>'; a step sent again after an unknown outcome has a member per copy.
local ref = redis.call('GET', KEYS[1])
if ref then return {'wamid', ref} end
local who = ARGV[1]
local t, window, skew = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
-- 'sent', and a 'failed' that refuses the send, are stamped when the message is sent; 'delivered', 'read' or
-- any other 'failed' may come days later (a phone off, an expiry). A status of a message whose send-time
-- status was seen is judged by that one's time.
local own = ARGV[6] == 'sent' or ARGV[7] == '1'
local early = own
local at = redis.call('GET', KEYS[4])
if at then
  t = tonumber(at)
  early = true
end
local function unplaced(answer)
  if own then redis.call('SET', KEYS[4], ARGV[2], 'NX', 'EX', ARGV[5]) end
  return answer
end
if who == '' then return unplaced({'none'}) end
local lo = 0
if early then lo = math.max(0, t - window - skew) end
-- never stamped before its request: Meta's second is the one it happened in, hence the 999 ms
local found = redis.call('ZRANGEBYLEX', KEYS[2], string.format('[%s|%013d', who, lo),
  string.format('(%s|%013d', who, t + 999 + skew + 1), 'LIMIT', 0, 51)
local refs, order = {}, {}
for _, m in ipairs(found) do
  local open_until, r = string.match(m, '^[^|]*|%d+|(%d+)|(.*)$')
  open_until = tonumber(open_until)
  -- a single message is a candidate until its wamid is placed; a flow, which may send several, for good,
  -- but it sends them within its turn, so only then are they stamped 'sent'
  if open_until == 0 or not early or t < open_until + skew then
    if not refs[r] then
      refs[r] = open_until
      order[#order + 1] = r
    end
  end
end
if #found > 50 then return unplaced({'ambiguous', unpack(order)}) end
if #order == 0 then return unplaced({'none'}) end
if #order > 1 then return unplaced({'ambiguous', unpack(order)}) end
local r = order[1]
redis.call('SET', KEYS[1], r, 'EX', ARGV[5])
if refs[r] == 0 then
  -- One member per message of the step. Which copy this wamid was is not known, so every copy stays a
  -- candidate until as many wamids as copies are placed; then the step closes and the person's turn is free.
  local copies = {}
  for _, m in ipairs(redis.call('ZRANGEBYLEX', KEYS[2], '[' .. who .. '|', '(' .. who .. '}', 'LIMIT', 0, 500)) do
    if string.match(m, '^[^|]*|%d+|%d+|(.*)$') == r then copies[#copies + 1] = m end
  end
  local placed = 1
  if #copies > 1 then placed = redis.call('HINCRBY', KEYS[5], r, 1) end
  if placed >= #copies then
    if #copies > 0 then redis.call('ZREM', KEYS[2], unpack(copies)) end
    if #copies > 1 then redis.call('HDEL', KEYS[5], r) end
    if redis.call('GET', KEYS[3]) == r then redis.call('DEL', KEYS[3]) end
  end
end
return {'recipient', r}
