"""The counter series: what happened each minute and each hour, kept in Redis by the workers and the receiver,
so the console's charts, funnel and failure codes survive a restart of anything (nothing lives in its memory).

Each bucket is a hash of counters (``HINCRBY``, one round trip with the write it counts): a minute's for
:data:`MINUTE_TTL`, an hour's for :data:`HOUR_TTL`. The buckets are named by time, so reading the last hour is 60
``HGETALL`` and the last day 24, never a scan.

Counters, per message (a flow's step is one):

- ``accepted``: CGB took the message (the worker, with the step's ``sent`` mark);
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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from . import keys

MINUTE_TTL = 26 * 3600
"""A minute's bucket is kept for a day and two hours: the hour chart, and a day of minutes for later use."""
HOUR_TTL = 8 * 86400
"""An hour's bucket is kept eight days: a week of history, as long as send records last, and a day to spare."""
FUNNEL = ("accepted", "sent", "delivered", "read")


def minute_of(now: float) -> int:
    return int(now // 60)


def hour_of(now: float) -> int:
    return int(now // 3600)


def bucket_keys(now: float) -> tuple[str, str]:
    """The minute's and the hour's buckets ``now`` falls in (apply.lua takes them as keys)."""
    return keys.series_minute(minute_of(now)), keys.series_hour(hour_of(now))


def count(pipe: Pipeline, now: float, counter: str, by: int = 1) -> None:
    """Queue ``counter += by`` in both buckets of ``now`` (the TTL set once, when the bucket is made)."""
    for key, ttl in zip(bucket_keys(now), (MINUTE_TTL, HOUR_TTL), strict=True):
        pipe.hincrby(key, counter, by)
        pipe.expire(key, ttl, nx=True)


@dataclass(slots=True)
class Window:
    """Counters over a span: one :class:`collections.Counter`-like dict per bucket, oldest first."""

    starts: list[float]
    """Each bucket's start (epoch seconds)."""
    buckets: list[dict[str, int]]
    totals: dict[str, int] = field(default_factory=dict)

    def series(self, counter: str) -> list[int]:
        return [b.get(counter, 0) for b in self.buckets]

    def codes(self) -> list[tuple[int, int]]:
        """WhatsApp's error codes in the span, the most frequent first: (code, messages)."""
        found = [(int(k[5:]), n) for k, n in self.totals.items() if k.startswith("code:") and k[5:].isdigit()]
        return sorted(found, key=lambda c: (-c[1], c[0]))


async def read(redis: Redis, now: float | None = None) -> tuple[Window, Window]:
    """The last hour by minute (60 buckets, the current one last) and the last day by hour (24), in one round
    trip."""
    now = time.time() if now is None else now
    minute, hour = minute_of(now), hour_of(now)
    minutes = list(range(minute - 59, minute + 1))
    hours = list(range(hour - 23, hour + 1))
    async with redis.pipeline(transaction=False) as pipe:
        for m in minutes:
            pipe.hgetall(keys.series_minute(m))
        for h in hours:
            pipe.hgetall(keys.series_hour(h))
        raw = await pipe.execute()
    decoded = [{_text(k): int(v) for k, v in bucket.items()} for bucket in raw]
    return (
        _window([m * 60.0 for m in minutes], decoded[: len(minutes)]),
        _window([h * 3600.0 for h in hours], decoded[len(minutes) :]),
    )


def _window(starts: list[float], buckets: list[dict[str, int]]) -> Window:
    totals: dict[str, int] = {}
    for bucket in buckets:
        for k, v in bucket.items():
            totals[k] = totals.get(k, 0) + v
    return Window(starts, buckets, totals)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
