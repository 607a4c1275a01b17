-- KEYS: the data-format key. ARGV: the format this code writes. Records it when the key is missing or holds an
-- older format (never lowers a newer one, never overwrites what is not a format number: the caller refuses
-- that); returns what the key held before (false: nothing).
local found = redis.call('GET', KEYS[1])
local number = found and string.match(found, '^%d+$') and tonumber(found)
if not found or (number and number < tonumber(ARGV[1])) then
    redis.call('SET', KEYS[1], ARGV[1])
end
return found
