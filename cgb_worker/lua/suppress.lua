-- A person's suppression list entry changed: an opt-out added for a scope, or opt-outs lifted.
-- The value (a STRING, read with the job's MGET) is JSON: {"all": {"reason": R, "at": MS}, "marketing": {...},
-- "lifted": MS}; "lifted" is when opt-outs were last lifted, so that an opt-out not newer than it (a STOP redelivered
-- after the START that followed it) changes nothing. A person with no scope left keeps only "lifted", for ARGV[4]
-- seconds, and leaves the index.
-- KEYS[1] the person's key (cgb:suppressed:<who>), KEYS[2] the index (a set of hashes).
-- ARGV[1] 'add' or 'lift', ARGV[2] the person's hash, ARGV[3] when (ms), ARGV[4] the lifted-only key's TTL (s),
-- ARGV[7] the keyed hash of the message that asked ('' for none: an operator, a 131050, CGB). The last few such
-- messages are kept ("seen"): a redelivered one changes nothing, even in the second Meta stamped its answer in.
--   add:  ARGV[5] the scope ('all' or 'marketing'), ARGV[6] the reason. An existing entry for the scope is kept
--         (it says since when), unless the new reason is 'operator', whose word a keyword cannot lift.
--   lift: ARGV[5] the scopes it lifts, comma-separated; ARGV[6] the reasons it lifts, comma-separated, or '*'.
-- Returns 1 when an opt-out was added, or how many scopes were lifted; 0 when nothing changed.
local cur = {}
local raw = redis.call('GET', KEYS[1])
if raw then
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then cur = decoded end
end
local at = tonumber(ARGV[3])
local lifted = tonumber(cur['lifted'] or 0) or 0

local function has(list, item)
  if list == '*' then return true end
  for part in string.gmatch(list, '[^,]+') do
    if part == item then return true end
  end
  return false
end

local ref = ARGV[7] or ''
if ref ~= '' then
  local seen = type(cur['seen']) == 'table' and cur['seen'] or {}
  for _, r in ipairs(seen) do
    if r == ref then return 0 end
  end
  table.insert(seen, ref)
  while #seen > 8 do table.remove(seen, 1) end
  cur['seen'] = seen
end

local function store()
  if type(cur['all']) ~= 'table' and type(cur['marketing']) ~= 'table' then
    if cur['lifted'] or ref ~= '' then
      redis.call('SET', KEYS[1], cjson.encode({lifted = cur['lifted'], seen = cur['seen']}), 'EX', ARGV[4])
    end
    redis.call('SREM', KEYS[2], ARGV[2])
  else
    redis.call('SET', KEYS[1], cjson.encode(cur))
    redis.call('SADD', KEYS[2], ARGV[2])
  end
end

if ARGV[1] == 'add' then
  local scope, reason = ARGV[5], ARGV[6]
  local e = cur[scope]
  if at < lifted or (type(e) == 'table' and (e['reason'] == 'operator' or reason ~= 'operator')) then
    if ref ~= '' then store() end  -- remember the message, so that its redelivery after a lift is known
    return 0
  end
  cur[scope] = {reason = reason, at = at}
  store()
  return 1
end

local n = 0
for scope in string.gmatch(ARGV[5], '[^,]+') do
  local e = cur[scope]
  if type(e) == 'table' and has(ARGV[6], tostring(e['reason'])) and (tonumber(e['at']) or 0) <= at then
    cur[scope] = nil
    n = n + 1
  end
end
if at > lifted then cur['lifted'] = at end
store()
return n
