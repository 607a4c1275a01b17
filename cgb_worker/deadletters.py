"""The dead-letter store: every job that finally failed, kept in Redis for an operator to read and replay.

Entries hold the payload with the phone and email masked (for listing and showing), the error's class and
message, the attempts and timestamps; the original payload is kept apart, only for replay. The store is
capped at ``DEAD_LETTER_MAX`` entries, dropping the oldest, so a long outage cannot fill Redis.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from arq import ArqRedis
from redis.asyncio import Redis

from .phones import mask_phone

INDEX = "cgb:dead:index"
ENTRIES = "cgb:dead:entries"
PAYLOADS = "cgb:dead:payloads"

_TRIM = """
local excess = redis.call('zcard', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local old = redis.call('zrange', KEYS[1], 0, excess - 1)
redis.call('zremrangebyrank', KEYS[1], 0, excess - 1)
redis.call('hdel', KEYS[2], unpack(old))
redis.call('hdel', KEYS[3], unpack(old))
return excess
"""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    function: str
    payload: Any
    """Masked: fit to show."""
    error_type: str
    error: str
    attempts: int
    enqueued_at: float | None
    failed_at: float


def mask_payload(payload: Any) -> Any:
    if not isinstance(payload, dict):
        return "<not a mapping>"
    masked = dict(payload)
    if isinstance(masked.get("to"), str):
        masked["to"] = mask_phone(masked["to"])
    email = masked.get("email")
    if isinstance(email, str) and "@" in email:
        user, _, domain = email.partition("@")
        masked["email"] = f"{user[:1]}***@{domain}"
    return masked


class DeadLetters:
    def __init__(self, redis: Redis, *, max_entries: int = 10000) -> None:
        self._redis = redis
        self._max = max_entries

    async def add(
        self,
        *,
        job_id: str,
        function: str,
        payload: Any,
        error: BaseException,
        attempts: int,
        enqueued_at: float | None,
    ) -> DeadLetter:
        entry = DeadLetter(
            job_id=job_id,
            function=function,
            payload=mask_payload(payload),
            error_type=type(error).__name__,
            error=str(error)[:1000],
            attempts=attempts,
            enqueued_at=enqueued_at,
            failed_at=time.time(),
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(ENTRIES, mapping={job_id: msgspec.msgpack.encode(entry)})
            pipe.hset(PAYLOADS, mapping={job_id: msgspec.msgpack.encode(payload)})
            pipe.zadd(INDEX, {job_id: entry.failed_at})
            pipe.eval(_TRIM, 3, INDEX, ENTRIES, PAYLOADS, str(self._max))
            await pipe.execute()
        return entry

    async def count(self) -> int:
        return int(await self._redis.zcard(INDEX))

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        """Newest first."""
        ids = await self._redis.zrevrange(INDEX, 0, max(0, limit - 1))
        if not ids:
            return []
        raw = await self._redis.hmget(ENTRIES, ids)  # type: ignore[misc]
        return [msgspec.msgpack.decode(r, type=DeadLetter) for r in raw if r]

    async def get(self, job_id: str) -> DeadLetter | None:
        raw = await self._redis.hget(ENTRIES, job_id)  # type: ignore[misc]
        return msgspec.msgpack.decode(raw, type=DeadLetter) if raw else None

    async def original_payload(self, job_id: str) -> Any:
        raw = await self._redis.hget(PAYLOADS, job_id)  # type: ignore[misc]
        return msgspec.msgpack.decode(raw) if raw else None

    async def replay(self, pool: ArqRedis, job_id: str) -> str | None:
        """Enqueue the original payload again under a new job id and drop the entry; None if there is none.

        A new id on purpose: the old one's send log would otherwise make the worker skip the send.
        """
        payload = await self.original_payload(job_id)
        entry = await self.get(job_id)
        if payload is None or entry is None:
            return None
        job = await pool.enqueue_job(entry.function, payload)
        if job is None:  # pragma: no cover - a fresh uuid cannot collide
            return None
        await self.remove(job_id)
        return job.job_id

    async def remove(self, job_id: str) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(INDEX, job_id)
            pipe.hdel(ENTRIES, job_id)
            pipe.hdel(PAYLOADS, job_id)
            removed, _, _ = await pipe.execute()
        return bool(removed)

    async def purge(self) -> int:
        count = await self.count()
        await self._redis.delete(INDEX, ENTRIES, PAYLOADS)
        return count
