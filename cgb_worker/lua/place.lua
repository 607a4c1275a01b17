-- One status matched (match.lua) and, when that places it, applied (apply.lua), in one atomic step: the same
-- writes, in the same order, as the two scripts called one after the other with nothing in between. The
-- processor sends one call per status, pipelined, in the order the statuses arrived (the README's attribution
-- rule holds call by call). scripts.py puts match.lua and apply.lua before this text as the local functions
-- match(KEYS, ARGV) and apply(KEYS, ARGV), so each stays one file, tested on its own.
-- KEYS[1..5] match.lua's, KEYS[6] the deliveries stream, KEYS[7] the window key ('' when the phone is unknown),
-- KEYS[8] the reactions outbox, KEYS[9] and KEYS[10] the counters (apply.lua's KEYS[5] and KEYS[6]).
-- ARGV[1..7] match.lua's, ARGV[8] the prefix of send-log keys (the job id follows it), ARGV[9..23] apply.lua's
-- ARGV[2..16], of which [6] (how it was matched) and [11] (the job id) are filled in here.
-- Returns match.lua's answer when the status is not placed ({'none'}, {'ambiguous', ref, ...}), else
-- {by, ref, outcome, status now, the send's time (ms), reactions appended} with apply.lua's four.
local found = match({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]},
  {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]})
if found[1] == 'none' or found[1] == 'ambiguous' then return found end
local ref = found[2]
local delivery_id, step = string.match(ref, '^(.*)|([^|]*)$')
local args = {step}
for i = 9, #ARGV do args[#args + 1] = ARGV[i] end
args[6] = found[1]
args[11] = delivery_id
local applied = apply({ARGV[8] .. delivery_id, KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]}, args)
return {found[1], ref, applied[1], applied[2], applied[3], applied[4]}
