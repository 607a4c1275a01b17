"""A small Redis lock shared by every worker process: SET NX PX with a token, released only by its owner.

Used where two jobs must not do the same thing at once (create one contact; write one contact's fields
and trigger its flow). The TTL bounds how long a crashed holder blocks others. Waiting polls, because
these sections take a few CGB calls at most. Inside a job the wait also ends in time for the try: no later
than its deadline less one CGB request (:func:`~cgb_worker.ratelimit.try_budget`), so a lock never makes a
try overrun. A wait that runs out raises :class:`BusyError`, which the job turns into an arq retry.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis

from .errors import BusyError
from .ratelimit import try_budget
from .scripts import source


@asynccontextmanager
async def redis_lock(
    redis: Redis,
    key: str,
    *,
    ttl: float,
    wait: float,
    poll: float = 0.05,
    done: Callable[[], Awaitable[Any]] | None = None,
    request_timeout: float = 0.0,
) -> AsyncIterator[Any]:
    """Hold ``key`` for the ``async with`` body.

    While waiting, ``done`` (when given) is polled too: if it returns something truthy another holder has
    already done the work, and that value is yielded without taking the lock. Otherwise yields None.
    """
    token = secrets.token_hex(8)
    budget = try_budget(request_timeout)
    if budget is not None:
        wait = max(0.0, min(wait, budget))
    deadline = time.monotonic() + wait
    while not await redis.set(key, token, nx=True, px=max(1, int(ttl * 1000))):
        if done is not None and (result := await done()):
            yield result
            return
        if time.monotonic() >= deadline:
            raise BusyError(f"waited {wait:.0f} s for a lock another job holds ({key.split(':')[2]})")
        await asyncio.sleep(poll)
    try:
        yield None
    finally:
        await redis.eval(source("lock_release"), 1, key, token)  # type: ignore[misc]
