-- Which of our sends a status belongs to (the attribution rule in the README, "Delivery receipts").
-- KEYS[1] the status's wamid key, KEYS[2] the awaiting set, KEYS[3] the recipient's turn key.
-- ARGV[1] the recipient's hash ('' when unknown), ARGV[2] the status's own time (ms, whole seconds as Meta
-- stamps them), ARGV[3] the match window (ms), ARGV[4] the clock skew allowed (ms), ARGV[5] the wamid key's TTL
-- (s), ARGV[6] the status ('sent', 'delivered', ...).
-- Returns {'wamid', ref} for a wamid already placed, {'recipient', ref} when exactly one of our sends to that
-- person could have produced it, {'none'} when none could, {'ambiguous', ref, ref, ...} when several could.
-- A ref is '<delivery id>|<step>'. Members: '<who>|<request ms, 13 digits>|<open until ms, 13 digits, 0 for one
-- message>|<ref>'.
local ref = redis.call('GET', KEYS[1])
if ref then return {'wamid', ref} end
local who = ARGV[1]
if who == '' then return {'none'} end
local t, window, skew = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local sent = ARGV[6] == 'sent'
-- A message's status is never stamped before its request (Meta's second is the one it happened in, hence the
-- 999 ms). Only 'sent' is stamped soon after: 'delivered', 'read', 'failed' may come days later (a phone off).
local lo = 0
if sent then lo = math.max(0, t - window) end
local found = redis.call('ZRANGEBYLEX', KEYS[2], string.format('[%s|%013d', who, lo),
  string.format('(%s|%013d', who, t + 999 + skew + 1), 'LIMIT', 0, 51)
local refs, order = {}, {}
for _, m in ipairs(found) do
  local open_until, r = string.match(m, '^[^|]*|%d+|(%d+)|(.*)$')
  open_until = tonumber(open_until)
  -- a single message is a candidate until its first wamid; a flow, which may send several, sends them within
  -- its turn, so its messages' 'sent' come before the turn ended (their later statuses may come any time)
  if open_until == 0 or not sent or t < open_until + skew then
    if not refs[r] then
      refs[r] = {}
      order[#order + 1] = r
    end
    table.insert(refs[r], {m, open_until})
  end
end
if #found > 50 then return {'ambiguous', unpack(order)} end
if #order == 0 then return {'none'} end
if #order > 1 then return {'ambiguous', unpack(order)} end
local r = order[1]
redis.call('SET', KEYS[1], r, 'EX', ARGV[5])
local items = refs[r]
if items[1][2] == 0 then
  -- One member is one message: a step sent again after an unknown outcome has two, and this wamid closes one
  -- (the latest that could have produced it: an earlier one stays a candidate for the other's statuses).
  redis.call('ZREM', KEYS[2], items[#items][1])
  -- once the step has no message left open, the person's next one may go
  if #items == 1 and redis.call('GET', KEYS[3]) == r then redis.call('DEL', KEYS[3]) end
end
return {'recipient', r}
