"""A fleet-wide limit on requests to CGB, kept in Redis so that every worker process shares it.

``CGB_RATE_LIMIT`` requests per second (0 turns it off): a sliding window of admissions in a sorted set,
checked and updated by one Lua script with Redis's own clock, so no two workers disagree on the time. The
window is 1.1 s, not 1 s: requests reach CGB a little after they are admitted, by a delay that varies, and
the extra 100 ms keeps that variation from packing more than the limit into any one second at CGB's end
(at the cost of a tenth of the throughput). Every CGB call asks first (``CGBClient`` calls
:meth:`RateLimiter.acquire`):

* a wait of up to ``max_wait`` seconds happens in place (with jitter, so waiters do not stampede);
* a longer one raises :class:`ThrottledError`, which the job turns into an arq deferral, so no worker slot
  is held idle; such deferrals do not count against ``CGB_RETRY_ATTEMPTS``.

A 429 from CGB slows the whole fleet: :meth:`RateLimiter.penalize` pauses every worker for the
``Retry-After`` CGB gave (2 s when it gave none) and halves the limit for the next 30 s.
"""

from __future__ import annotations

import asyncio
import random
import secrets

from redis.asyncio import Redis

from .errors import ThrottledError

KEY = "cgb:ratelimit"
PAUSE_KEY = "cgb:ratelimit:pause"
PENALTY_KEY = "cgb:ratelimit:penalty"
PENALTY_SECONDS = 30
DEFAULT_PAUSE = 2.0
WINDOW_MS = 1100

# Returns 0 when admitted, else the milliseconds until a slot may be free.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return pause end
local limit = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then limit = math.max(1, math.floor(limit / 2)) end
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
    redis.call('ZADD', KEYS[1], now, ARGV[2])
    redis.call('PEXPIRE', KEYS[1], window * 2)
    return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
"""


class RateLimiter:
    def __init__(self, redis: Redis, *, rate: float, max_wait: float = 1.0) -> None:
        self._redis = redis
        self._rate = rate
        self._max_wait = max_wait
        self._script = redis.register_script(_ACQUIRE)

    async def acquire(self) -> None:
        """Return when a request may go out; :class:`ThrottledError` when that is more than ``max_wait`` away."""
        waited = 0.0
        while True:
            wait_ms = int(
                await self._script(
                    keys=[KEY, PAUSE_KEY, PENALTY_KEY], args=[self._rate, secrets.token_hex(6), WINDOW_MS]
                )
            )
            if wait_ms <= 0:
                return
            wait = wait_ms / 1000
            if waited + wait > self._max_wait:
                raise ThrottledError(f"CGB rate limit: next slot in {wait:.2f} s", retry_after=wait)
            sleep = wait * (1 + random.random() * 0.2)  # noqa: S311 - jitter, not security
            await asyncio.sleep(sleep)
            waited += sleep

    async def penalize(self, retry_after: float | None) -> None:
        """CGB said 429: pause every worker and halve the limit for a while."""
        pause_ms = max(1, int((retry_after if retry_after is not None else DEFAULT_PAUSE) * 1000))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(PAUSE_KEY, 1, px=pause_ms)
            pipe.set(PENALTY_KEY, 1, ex=PENALTY_SECONDS)
            await pipe.execute()
