-- KEYS: next-slot time, penalty flag. ARGV: interval (ms), the longest wait the caller accepts (ms), a pause
-- to add (ms, 0 for none). Returns {reserved (1/0), wait in ms as a string} on Redis's clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local state = redis.call('MGET', KEYS[1], KEYS[2])  -- one read for both: a command less on every message
if state[2] then interval = interval * 2 end
local slot = math.max(tonumber(state[1] or '0'), now)
local pause = tonumber(ARGV[3])
if pause > 0 then
    slot = math.max(slot, now + pause)
    redis.call('SET', KEYS[1], string.format('%.3f', slot), 'PX', math.ceil(slot - now) + 60000)
    redis.call('SET', KEYS[2], '1', 'EX', ARGV[4])
    return {0, string.format('%.3f', slot - now)}
end
local wait = slot - now
if wait > tonumber(ARGV[2]) then return {0, string.format('%.3f', wait)} end
redis.call('SET', KEYS[1], string.format('%.3f', slot + interval), 'PX', math.ceil(slot + interval - now) + 60000)
return {1, string.format('%.3f', wait)}
