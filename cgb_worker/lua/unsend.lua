-- Take back a send step's marks when nothing went out (a refusal that proves it, or a turn lost to another
-- send): the 'sending' mark, the record written for it, its place in the awaiting set, and the turn.
-- KEYS[1] the job's send log, KEYS[2] the delivery record's hash, KEYS[3] the awaiting set, KEYS[4] the turn.
-- ARGV[1] step, [2] the awaiting member ('' for none), [3] the ref, [4] '1' to keep the 'sending' mark (an
-- earlier try left its outcome unknown), [5] '1' when this try wrote the record.
-- Returns 0, leaving the marks, when a status already came for the step: one of its copies went out whatever
-- CGB said of this one. This copy's own member goes in any case: it sent nothing, and an open member without a
-- message would keep the step a candidate for the person's later statuses.
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[3], ARGV[2]) end
local raw = redis.call('HGET', KEYS[2], 'd:' .. ARGV[1])
if raw and cjson.decode(raw).wamid then return 0 end
if ARGV[4] ~= '1' then redis.call('HDEL', KEYS[1], ARGV[1]) end
if ARGV[5] == '1' then redis.call('HDEL', KEYS[2], 'd:' .. ARGV[1], 'f:' .. ARGV[1], 'p:' .. ARGV[1]) end
if redis.call('GET', KEYS[4]) == ARGV[3] then redis.call('DEL', KEYS[4]) end
return 1
