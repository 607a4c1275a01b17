"""A fleet-wide limit on requests to CGB, kept in Redis so that every worker process shares it.

``CGB_RATE_LIMIT`` requests per second (0 turns it off), as a generic cell rate algorithm (GCRA) on Redis's
own clock: one key holds the time the next request may leave. Each request makes one script call, which
reserves the next free slot and moves that time on by one interval, and the caller sleeps until its slot.
So a backlog is spread evenly over time, in the order the requests asked, and no job is re-queued just
to wait its turn: waiting in place costs a worker slot, not Redis round trips.

* Slots are spaced ``1 / (CGB_RATE_LIMIT * 0.96)`` apart, so any ``CGB_RATE_LIMIT + 1`` slots span 1.04 s:
  the 40 ms is what absorbs the variation between a request's slot and its arrival at CGB, so that no
  second at CGB's end ever holds more than the limit. A request still in its process more than
  :data:`LATE` after its slot (a busy event loop, a slow Redis reply to the send-log mark) would spend most
  of that alone, so it gives the slot up and takes the next one (the client checks again right before the
  request leaves).
* A slot further away than the caller can wait (the try's own deadline, see :func:`try_budget`) is not
  reserved; :class:`ThrottledError` says when to come back, and the job turns that into an arq deferral,
  which uses up no retry.
* A 429 from CGB slows the whole fleet: :meth:`RateLimiter.penalize` moves the next slot past CGB's
  ``Retry-After`` (2 s when it gave none) and doubles the interval for the next 30 s.
"""

from __future__ import annotations

import asyncio
import contextvars
import time

from redis.asyncio import Redis

from . import keys
from .errors import ThrottledError
from .scripts import source

KEY = keys.RATE_NEXT
PENALTY_KEY = keys.RATE_PENALTY
PENALTY_SECONDS = 30
DEFAULT_PAUSE = 2.0
SPACING = 0.96
"""The share of ``CGB_RATE_LIMIT`` that slots are spaced for (see the module docstring)."""
LATE = 0.02
"""Seconds past its slot a request may wake and still use it; later, it takes a new slot."""

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("cgb_try_deadline", default=None)


def set_deadline(monotonic_deadline: float | None) -> contextvars.Token[float | None]:
    """Record when the current try must be done (``time.monotonic()`` seconds), for :func:`try_budget`.

    A context variable, so it travels with the job's task and its children and with nothing else."""
    return _deadline.set(monotonic_deadline)


def reset_deadline(token: contextvars.Token[float | None]) -> None:
    _deadline.reset(token)


def try_budget(request_timeout: float) -> float | None:
    """Seconds the current try can still wait before a request and have the request finish inside the
    try (its whole ``request_timeout``, plus half a second); None outside a job."""
    deadline = _deadline.get()
    if deadline is None:
        return None
    return deadline - time.monotonic() - request_timeout - 0.5


class RateLimiter:
    def __init__(self, redis: Redis, *, rate: float) -> None:
        self._redis = redis
        self._interval_ms = 1000.0 / (rate * SPACING)
        self._script = redis.register_script(source("ratelimit_reserve"))

    async def acquire(self, max_wait: float | None = None) -> float:
        """Reserve the next slot and sleep until it; return when it was (``time.monotonic()``).
        :class:`ThrottledError` (nothing reserved) when the slot is more than ``max_wait`` seconds away; None
        waits as long as it takes."""
        deadline = None if max_wait is None else time.monotonic() + max(0.0, max_wait)
        while True:
            limit_ms = 10**12 if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
            reserved, wait_ms = await self._script(
                keys=[KEY, PENALTY_KEY], args=[f"{self._interval_ms:.3f}", f"{limit_ms:.3f}", 0, 0]
            )
            wait = float(wait_ms) / 1000
            if not int(reserved):
                raise ThrottledError(f"CGB rate limit: next slot in {wait:.2f} s", retry_after=wait)
            slot = time.monotonic() + wait
            if wait > 0:
                await asyncio.sleep(wait)
            if time.monotonic() - slot <= LATE:
                return slot

    async def penalize(self, retry_after: float | None) -> None:
        """CGB said 429: no request from any worker before ``retry_after``, and half the rate for a while."""
        pause_ms = max(1, int((retry_after if retry_after is not None else DEFAULT_PAUSE) * 1000))
        await self._script(keys=[KEY, PENALTY_KEY], args=[f"{self._interval_ms:.3f}", 0, pause_ms, PENALTY_SECONDS])


async def pause_fleet(redis: Redis, seconds: float = DEFAULT_PAUSE) -> None:
    """What :meth:`RateLimiter.penalize` does, for a process that sends nothing itself: the webhook receiver,
    when WhatsApp reports the business number's throughput limit (130429) or maintenance (131057)."""
    script = redis.register_script(source("ratelimit_reserve"))
    await script(keys=[KEY, PENALTY_KEY], args=["1", 0, max(1, int(seconds * 1000)), PENALTY_SECONDS])
