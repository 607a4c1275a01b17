"""The dead-letter store: every job that finally failed, kept in Redis for an operator to read and replay.

Entries hold the payload with the phone and email masked (for listing and showing), the error's class and
message, the attempts and timestamps; the original payload is kept apart, only for replay. The store is
capped at ``DEAD_LETTER_MAX`` entries, dropping the oldest, so a long outage cannot fill Redis: the trim
drops at most :data:`TRIM_CHUNK` entries per script call and calls again until the store fits, so lowering
the cap by any amount leaves nothing behind, and a trim that fails is logged, never raised from ``add``
(the entry is stored by then).

A dead-lettered job's send record (:mod:`cgb_worker.sends`) is kept for as long as its entry, and a replay
continues it: :meth:`DeadLetters.replay` claims the entry atomically (two replays of one entry at once
enqueue it once) and enqueues the payload with ``replay_of``, the id whose record the new job reads and
writes, so a step CGB acknowledged is never sent again. It links the two ids both ways (``keys.replayed_as``,
``keys.replay_of``, for :data:`LINK_TTL`), which ``cgb-worker status`` follows.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from arq import ArqRedis
from loguru import logger
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import keys, series
from .phones import mask_phone
from .scripts import source
from .sends import TTL as SEND_LOG_TTL
from .sends import key as send_log_key

INDEX = keys.DEAD_INDEX
ENTRIES = keys.DEAD_ENTRIES
PAYLOADS = keys.DEAD_PAYLOADS
ORIGINS = PAYLOADS + ":origin"
"""Entry id to the id of the job whose send record it continues (itself, unless it was a replay)."""

LINK_TTL = SEND_LOG_TTL
"""Replay links live as long as the send record a replay continues: what ``status`` shows lasts that long."""

TRIM_CHUNK = 500
"""Entries one trim call drops at most: Lua's ``unpack`` cannot take many thousands of values at once."""


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
    code: int | None = None
    """The code the failure carries, for filtering: CGB's (or the HTTP status) for CGB's answers, WhatsApp's for a
    refusal that stands for one (131026 undeliverable, 131047 outside the window). None in older entries."""


def error_code(error: BaseException) -> int | None:
    """:attr:`DeadLetter.code` of ``error``."""
    from .errors import CGBAPIError, OutsideWindowError, UndeliverableError

    if isinstance(error, CGBAPIError):
        return error.code if error.code is not None else error.status
    if isinstance(error, UndeliverableError):
        return 131026
    if isinstance(error, OutsideWindowError):
        return 131047
    return None


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
        self._trim = redis.register_script(source("dead_trim"))
        self._claim = redis.register_script(source("dead_claim"))

    async def add(
        self,
        *,
        job_id: str,
        function: str,
        payload: Any,
        error: BaseException,
        attempts: int,
        enqueued_at: float | None,
        origin: str | None = None,
    ) -> DeadLetter:
        """Store a failed job; ``origin`` is the job whose send record it wrote (itself unless a replay)."""
        entry = DeadLetter(
            job_id=job_id,
            function=function,
            payload=mask_payload(payload),
            error_type=type(error).__name__,
            error=str(error)[:1000],
            attempts=attempts,
            enqueued_at=enqueued_at,
            failed_at=time.time(),
            code=error_code(error),
        )
        origin = origin or job_id
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(ENTRIES, mapping={job_id: msgspec.msgpack.encode(entry)})
            pipe.hset(PAYLOADS, mapping={job_id: msgspec.msgpack.encode(payload)})
            pipe.hset(ORIGINS, mapping={job_id: origin})
            pipe.zadd(INDEX, {job_id: entry.failed_at})
            pipe.persist(send_log_key(origin))  # kept as long as the entry, for a replay to continue
            series.count(pipe, entry.failed_at, "dead")
            await pipe.execute()
        try:
            await self.trim()
        except RedisError as exc:
            logger.warning("could not trim the dead-letter store: {}", type(exc).__name__)
        return entry

    async def trim(self) -> None:
        """Drop the oldest entries past ``DEAD_LETTER_MAX``, a chunk per call, until the store fits."""
        while int(await self._trim(keys=[INDEX, ENTRIES, PAYLOADS], args=[self._max, TRIM_CHUNK, keys.sends("")])) > 0:
            pass

    async def count(self) -> int:
        return int(await self._redis.zcard(INDEX))

    async def list(
        self,
        limit: int = 100,
        *,
        error_type: str | None = None,
        code: int | None = None,
        failed_after: float | None = None,
        failed_before: float | None = None,
    ) -> list[DeadLetter]:
        """Newest first; with ``error_type``, only the entries whose error has that class name (any case); with
        ``code``, only those whose :attr:`DeadLetter.code` it is; with ``failed_after``/``failed_before`` (epoch
        seconds), only those that failed in that span (read by score: the span costs nothing to skip)."""
        top: float | str = "+inf" if failed_before is None else failed_before
        bottom: float | str = "-inf" if failed_after is None else failed_after
        wanted = error_type.lower() if error_type is not None else None
        found: list[DeadLetter] = []
        start = 0
        while len(found) < limit:  # the store is capped (DEAD_LETTER_MAX): reading it in chunks is bounded
            chunk = TRIM_CHUNK if (wanted is not None or code is not None) else limit - len(found)
            ids = await self._redis.zrevrangebyscore(INDEX, top, bottom, start=start, num=chunk)
            if not ids:
                break
            start += len(ids)
            raw = await self._redis.hmget(ENTRIES, ids)  # type: ignore[misc]
            entries = (msgspec.msgpack.decode(r, type=DeadLetter) for r in raw if r)
            found.extend(
                e
                for e in entries
                if (wanted is None or e.error_type.lower() == wanted) and (code is None or e.code == code)
            )
            if len(ids) < chunk:  # the span is read to its end
                break
        return found[:limit]

    async def get(self, job_id: str) -> DeadLetter | None:
        raw = await self._redis.hget(ENTRIES, job_id)  # type: ignore[misc]
        return msgspec.msgpack.decode(raw, type=DeadLetter) if raw else None

    async def original_payload(self, job_id: str) -> Any:
        raw = await self._redis.hget(PAYLOADS, job_id)  # type: ignore[misc]
        return msgspec.msgpack.decode(raw) if raw else None

    async def replay(self, pool: ArqRedis, job_id: str) -> str | None:
        """Claim the entry (atomically: of two replays at once, one gets it) and enqueue its payload again,
        continuing the original job's send record; return the new job's id, or None if there was no entry.

        The new job has an id of its own (arq refuses an id whose result it still holds) and carries
        ``replay_of``. Should the enqueue fail, the entry is put back."""
        claimed = await self._claim(keys=[INDEX, ENTRIES, PAYLOADS, ORIGINS], args=[job_id])
        if not claimed:
            return None
        raw_entry, raw_payload, raw_origin = claimed
        entry = msgspec.msgpack.decode(raw_entry, type=DeadLetter)
        origin = raw_origin.decode() if isinstance(raw_origin, bytes) else str(raw_origin)
        try:
            job = await pool.enqueue_job(entry.function, msgspec.msgpack.decode(raw_payload), replay_of=origin)
            if job is None:  # pragma: no cover - a fresh uuid cannot collide
                raise RuntimeError("arq refused the replay's job id")
        except BaseException:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(ENTRIES, mapping={job_id: raw_entry})
                pipe.hset(PAYLOADS, mapping={job_id: raw_payload})
                pipe.hset(ORIGINS, mapping={job_id: origin})
                pipe.zadd(INDEX, {job_id: entry.failed_at})
                await pipe.execute()
            raise
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.expire(send_log_key(origin), SEND_LOG_TTL)
            pipe.set(keys.replayed_as(job_id), job.job_id, ex=LINK_TTL)
            pipe.set(keys.replay_of(job.job_id), job_id, ex=LINK_TTL)
            await pipe.execute()
        return job.job_id

    async def remove(self, job_id: str) -> bool:
        """Drop an entry; its send record gets its usual lifetime back (it was kept for a replay)."""
        origin = await self._redis.hget(ORIGINS, job_id)  # type: ignore[misc]
        if origin is not None:
            await self._redis.expire(send_log_key(origin.decode()), SEND_LOG_TTL)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(INDEX, job_id)
            pipe.hdel(ENTRIES, job_id)
            pipe.hdel(PAYLOADS, job_id)
            pipe.hdel(ORIGINS, job_id)
            removed, *_ = await pipe.execute()
        return bool(removed)

    async def purge(self) -> int:
        count = await self.count()
        origins = await self._redis.hvals(ORIGINS)  # type: ignore[misc]
        for start in range(0, len(origins), TRIM_CHUNK):
            await self._redis.delete(*[send_log_key(o.decode()) for o in origins[start : start + TRIM_CHUNK]])
        await self._redis.delete(INDEX, ENTRIES, PAYLOADS, ORIGINS)
        return count
