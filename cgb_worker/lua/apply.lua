-- Apply one status to one message's record, and append what it calls for, in one atomic step: a status that
-- makes the message 'failed' appends a 'failed' reaction (with its code) to the outbox.
-- KEYS[1] the send-log hash, KEYS[2] the deliveries stream, KEYS[3] the window key ('' when the phone is
-- unknown), KEYS[4] the reactions outbox, KEYS[5] and KEYS[6] this hour's counters by minute and in all
-- (series.py; '' counts nothing).
-- ARGV[1] step, [2] status, [3] its time (ms), [4] the event (a JSON line), [5] wamid, [6] how it was matched,
-- [7] error code, [8] title, [9] details, [10] the stream's cap, [11] the job id, [12] user_id (a BSUID), [13]
-- the window key's TTL (s), [14] this minute of the hour (2 digits), [15] and [16] the counters' TTLs (s). The recipient's phone is not stored: the record is found by job id, the person by hash.
-- Returns {outcome, status now, the send's time (ms), reactions appended}; outcome is changed, kept, duplicate
-- or gone (the record expired).
local step, status, at, wamid, code = ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[7]
local ranks = {accepted = 0, unconfirmed = 1, sent = 2, failed = 3, delivered = 4, read = 5, played = 6}
local raw = redis.call('HGET', KEYS[1], 'd:' .. step)
if not raw then return {'gone', '', '0', 0} end
local s = cjson.decode(raw)
-- 'unconfirmed' says no status came: once one has, it is no event (a flow stays swept for a week)
if status == 'unconfirmed' and (ranks[s.status] or 0) > 0 then return {'kept', s.status, tostring(s.at), 0} end
local key = status .. '/' .. wamid
local seen = s.seen or '|'
if string.find(seen, '|' .. key .. '|', 1, true) then return {'duplicate', s.status, tostring(s.at), 0} end
if #seen < 8192 then s.seen = seen .. key .. '|' end
local events = redis.call('HGET', KEYS[1], 'e:' .. step) or ''
if #events < 65536 then redis.call('HSET', KEYS[1], 'e:' .. step, events .. ARGV[4] .. '\n') end
if wamid ~= '' then
  if not s.wamid then
    s.wamid = wamid
  elseif s.wamid ~= wamid then
    -- a flow's further messages (or a resend after an unknown outcome) belong to the same step
    local more = s.more or {}
    local known = false
    for _, w in ipairs(more) do if w == wamid then known = true end end
    if not known and #more < 20 then table.insert(more, wamid) end
    s.more = more
  end
end
if ARGV[6] ~= '' and not s.match then s.match = ARGV[6] end
if ARGV[12] ~= '' then s.userId = ARGV[12] end
-- statuses only move forward: the rank, not the order of arrival, decides, so a reaction is appended once
local changed = (ranks[s.status] or 0) < ranks[status]
local reacted = 0
if changed then
  s.status = status
  if status == 'failed' then
    s.error = {code = tonumber(code) or 0, title = ARGV[8], details = ARGV[9]}
    if code == '131047' and KEYS[3] ~= '' then redis.call('SET', KEYS[3], 'c:' .. at, 'EX', ARGV[13]) end
    -- every failure is a reaction: the receiver looks its code up (whatsapp_errors.py), counts it, acts once
    redis.call('XADD', KEYS[4], '*', 'kind', 'failed', 'job', ARGV[11], 'step', step, 'code', code, 'at', at)
    reacted = 1
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[10], '*', 'job', ARGV[11], 'step', step, 'status', status,
    'wamid', s.wamid or '', 'error', status == 'failed' and code or '', 'at', at)
end
-- the counters: each stage once per message (flags in s.n), whatever order its statuses came in
if (KEYS[5] or '') ~= '' then
  local reached = s.n or ''
  local function tally(name)
    redis.call('HINCRBY', KEYS[5], ARGV[14] .. ':' .. name, 1)
    redis.call('EXPIRE', KEYS[5], ARGV[15], 'NX')
    redis.call('HINCRBY', KEYS[6], name, 1)
    redis.call('EXPIRE', KEYS[6], ARGV[16], 'NX')
  end
  if status == 'failed' then
    -- a failure on one device after delivery on another is no failure of the message: only one that moved it
    if changed and not string.find(reached, 'f', 1, true) then
      reached = reached .. 'f'
      tally('failed')
      if code ~= '' then tally('code:' .. code) end
    end
  else
    for _, stage in ipairs({{'sent', 's'}, {'delivered', 'd'}, {'read', 'r'}}) do
      if ranks[status] >= ranks[stage[1]] and not string.find(reached, stage[2], 1, true) then
        reached = reached .. stage[2]
        tally(stage[1])
      end
    end
  end
  s.n = reached
end
redis.call('HSET', KEYS[1], 'd:' .. step, cjson.encode(s))
return {changed and 'changed' or 'kept', s.status, tostring(s.at), reacted}
