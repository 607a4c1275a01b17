"""The counter series and the person index: what the console's charts, funnel, failure codes and find-by-number
read, kept in Redis by the workers and the receiver, so they survive a restart of anything (nothing lives in the
console's memory).

**Counters.** Each hour has two hashes: its counters by minute (``<mm>:<counter>``, kept :data:`MINUTE_TTL`)
and in all (``<counter>``, kept :data:`HOUR_TTL`). Reading the last hour by minute and the last day by hour is
26 ``HGETALL`` in one round trip, however many jobs there are. Counters, per message (a flow's step is one):

- ``accepted``: CGB took the message (the worker);
- ``dead``: a job dead-lettered (the worker, with the entry);
- ``retried``: a try that ended in a retry (not a deferral: those wait, they did not fail);
- ``sent``, ``delivered``, ``read``: the message reached that stage (the receiver, in ``apply.lua``): counted once
  per message, when the first status at or past it arrives, so out-of-order statuses (``delivered`` before
  ``sent``) count each stage once, and ``played`` counts as ``read``;
- ``failed`` and ``code:<n>``: WhatsApp reported the message failed, once per message, with its error code; not
  counted once the message was delivered (a failure on a second device), and a message that fails and is then
  delivered elsewhere counts in both.

The funnel's rates divide by ``accepted`` in the same window; the receiver counts when it applies a status, so a
message accepted just before a window's start may be delivered in it: over an hour or a day that edge is small.

**The person index** (:func:`cgb_worker.keys.jobs_on`): a member per job per day it was tried, naming the
person by the keyed hash of the number.

**Batched, on the worker's side.** A send is the hot path (Redis commands per message are budgeted, see
BENCHMARKS.md), so the worker's ``accepted`` counts and index entries go through a :class:`Recorder` that writes
what it gathered every :data:`FLUSH_EVERY` seconds in one round trip (a handful of commands for all the messages
of that span, rather than several per message; a key's TTL set once, not on every flush), and once more when
the worker stops. A worker killed outright
loses at most that span's counts and index entries: a chart shows a few messages fewer, and find-by-number
misses those jobs (they are still found by id). Rare events (a dead letter, a retry) are counted at once, in the
write they count.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

from loguru import logger
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from . import keys
from .tasks import cancel_and_wait

MINUTE_TTL = 26 * 3600
"""An hour's by-minute hash is kept a day and two hours: the hour chart, with a day to spare."""
HOUR_TTL = 8 * 86400
"""An hour's totals are kept eight days: a week of history, as long as send records last, and a day to spare."""
INDEX_TTL = 8 * 86400
"""A day of the person index is kept eight days: a week's jobs are found by number, as long as send records last."""
FUNNEL = ("accepted", "sent", "delivered", "read")
FLUSH_EVERY = 5.0
"""Seconds between a worker's writes of what its :class:`Recorder` gathered."""
TTL_AGAIN = 600.0
"""Seconds after which a :class:`Recorder` sets a key's TTL again (``EXPIRE NX``, a no-op when it has one):
in between it trusts the one it set, so a flush is its ``HINCRBY``s and ``ZADD``s alone; a key Redis lost
meanwhile (a restart without persistence) gets its TTL back within this."""
PENDING_MAX = 100_000
"""Index entries a :class:`Recorder` holds at most while Redis is away; beyond it the oldest are dropped."""


def hour_of(now: float) -> int:
    return int(now // 3600)


def minute_of_hour(now: float) -> str:
    """The minute of the hour ``now`` falls in, two digits: what the by-minute hash's fields start with."""
    return f"{int(now // 60) % 60:02d}"


def minute_field(now: float, counter: str) -> str:
    """The by-minute hash's field for ``counter`` at ``now``."""
    return f"{minute_of_hour(now)}:{counter}"


def count(pipe: Pipeline, now: float, counter: str, by: int = 1) -> None:
    """Queue ``counter += by`` at ``now`` in both of the hour's hashes (each TTL set once, when it is made)."""
    hour = hour_of(now)
    pipe.hincrby(keys.series_minutes(hour), minute_field(now, counter), by)
    pipe.expire(keys.series_minutes(hour), MINUTE_TTL, nx=True)
    pipe.hincrby(keys.series_hour(hour), counter, by)
    pipe.expire(keys.series_hour(hour), HOUR_TTL, nx=True)


def index_member(who: str, enqueued_ms: int, job_id: str) -> str:
    return f"{who}|{enqueued_ms:013d}|{job_id}"


class Recorder:
    """A worker's counts and index entries, gathered in memory and written every :data:`FLUSH_EVERY` seconds
    (module docstring). One per worker process, started and stopped with it."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._counts: Counter[tuple[int, str]] = Counter()
        """(minute since the epoch, counter) → how many."""
        self._index: dict[int, dict[str, None]] = {}
        """Day → the index members gathered for it, in order, each once."""
        self._indexed = 0
        self._task: asyncio.Task[None] | None = None
        self._expiring: dict[str, float] = {}
        """Key → time.monotonic() when this recorder last set its TTL."""

    def count(self, counter: str, now: float | None = None, by: int = 1) -> None:
        moment = time.time() if now is None else now
        self._counts[(int(moment // 60), counter)] += by

    def index(self, who: str, job_id: str, enqueued_ms: int, now: float | None = None) -> None:
        day = int((time.time() if now is None else now) // 86400)
        members = self._index.setdefault(day, {})
        member = index_member(who, enqueued_ms, job_id)
        if member not in members:
            members[member] = None
            self._indexed += 1
        while self._indexed > PENDING_MAX:  # Redis away for long: the oldest day's oldest go first
            oldest = self._index[min(self._index)]
            oldest.pop(next(iter(oldest)))
            self._indexed -= 1
            if not oldest:
                del self._index[min(self._index)]

    async def flush(self) -> None:
        """Write what was gathered, in one round trip; on a Redis error it is kept for the next flush."""
        if not self._counts and not self._index:
            return
        counts, index = self._counts, self._index
        self._counts, self._index, self._indexed = Counter(), {}, 0
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                hours: set[int] = set()
                for (minute, counter), n in counts.items():
                    hour = minute // 60
                    hours.add(hour)
                    pipe.hincrby(keys.series_minutes(hour), minute_field(minute * 60.0, counter), n)
                    pipe.hincrby(keys.series_hour(hour), counter, n)
                expiring = [(keys.series_minutes(h), MINUTE_TTL) for h in hours]
                expiring += [(keys.series_hour(h), HOUR_TTL) for h in hours]
                for day, members in index.items():
                    pipe.zadd(keys.jobs_on(day), dict.fromkeys(members, 0))
                    expiring.append((keys.jobs_on(day), INDEX_TTL))
                now = time.monotonic()
                due = [(key, ttl) for key, ttl in expiring if now - self._expiring.get(key, -TTL_AGAIN) >= TTL_AGAIN]
                for key, ttl in due:
                    pipe.expire(key, ttl, nx=True)
                await pipe.execute()
            for key, _ttl in due:
                self._expiring[key] = now
            if len(self._expiring) > 64:  # the hours and days long past
                self._expiring = {k: t for k, t in self._expiring.items() if now - t < TTL_AGAIN}
        except (RedisError, OSError):
            self._counts.update(counts)  # Redis away: kept (the index bounded), written once it is back
            for day, members in index.items():
                for member in members:
                    self._index.setdefault(day, {})[member] = None
            self._indexed = sum(len(m) for m in self._index.values())
            raise

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            try:
                await self.flush()
            except (RedisError, OSError) as exc:  # said by the outage's own lines; tried again next time
                logger.debug("series: could not write the counts ({})", type(exc).__name__)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop and write what is left (once, briefly: a worker stopping during an outage does not
        wait on it)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(5.0):
                await self.flush()


@dataclass(slots=True)
class Window:
    """Counters over a span, one dict per bucket, oldest first."""

    starts: list[float]
    """Each bucket's start (epoch seconds)."""
    buckets: list[dict[str, int]]
    totals: dict[str, int] = field(default_factory=dict)

    def series(self, counter: str) -> list[int]:
        return [b.get(counter, 0) for b in self.buckets]

    def codes(self) -> list[tuple[int, int]]:
        """WhatsApp's error codes in the span, the most frequent first: (code, messages)."""
        found = [(int(k[5:]), n) for k, n in self.totals.items() if k.startswith("code:") and k[5:].isascii()
                 and k[5:].isdigit() and len(k) < 20]  # fmt: skip
        return sorted(found, key=lambda c: (-c[1], c[0]))


async def read(redis: Redis, now: float | None = None) -> tuple[Window, Window]:
    """The last hour by minute (60 buckets, the current minute last) and the last day by hour (24, the current
    hour last), in one round trip: this hour's and the last one's by-minute hashes, and 24 hours' totals."""
    now = time.time() if now is None else now
    hour, minute = hour_of(now), int(now // 60)
    hours = list(range(hour - 23, hour + 1))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.series_minutes(hour - 1))
        pipe.hgetall(keys.series_minutes(hour))
        for h in hours:
            pipe.hgetall(keys.series_hour(h))
        raw = await pipe.execute()
    by_minute: dict[int, dict[str, int]] = {}
    for h, found in ((hour - 1, raw[0]), (hour, raw[1])):
        for name, value in found.items():
            mm, _, counter = _text(name).partition(":")
            if mm.isascii() and mm.isdigit() and counter:
                by_minute.setdefault(h * 60 + int(mm), {})[counter] = _int(value)
    minutes = list(range(minute - 59, minute + 1))
    last_hour = _window([m * 60.0 for m in minutes], [by_minute.get(m, {}) for m in minutes])
    totals = [{_text(k): _int(v) for k, v in found.items()} for found in raw[2:]]
    return last_hour, _window([h * 3600.0 for h in hours], totals)


def _window(starts: list[float], buckets: list[dict[str, int]]) -> Window:
    totals: dict[str, int] = {}
    for bucket in buckets:
        for k, v in bucket.items():
            totals[k] = totals.get(k, 0) + v
    return Window(starts, buckets, totals)


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _int(value: bytes | str) -> int:
    try:
        return int(value)
    except ValueError:  # not ours: counted as nothing rather than failing the page
        return 0
