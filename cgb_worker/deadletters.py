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
import uuid
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
REPLAYING = keys.DEAD_REPLAYING
"""Entry id to the id of the job whose send record it continues (itself, unless it was a replay)."""

LINK_TTL = SEND_LOG_TTL
"""Replay links live as long as the send record a replay continues: what ``status`` shows lasts that long."""

TRIM_CHUNK = 500
"""Entries one trim call drops at most: Lua's ``unpack`` cannot take many thousands of values at once."""


class UnreadablePayloadError(ValueError):
    """A dead letter whose stored payload does not decode: it cannot be replayed, only deleted."""


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


UNREADABLE = "UnreadableEntry"
"""The error class an entry that does not decode is listed under (it can be looked at and deleted)."""


def _entry(job_id: bytes | str, raw: bytes) -> DeadLetter:
    """An entry as stored; one that does not decode (another version's, or damaged) stands in as an entry of
    :data:`UNREADABLE`, so that one bad entry never hides the others and can still be deleted."""
    try:
        return msgspec.msgpack.decode(raw, type=DeadLetter)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        name = job_id.decode(errors="replace") if isinstance(job_id, bytes) else job_id
        return DeadLetter(job_id=name, function="whatsapp_send", payload=None, error_type=UNREADABLE,
                          error=f"this entry could not be read: {exc}"[:300], attempts=0, enqueued_at=None,
                          failed_at=0.0)  # fmt: skip


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
        self._reserve = redis.register_script(source("dead_reserve"))
        self._finish = redis.register_script(source("dead_finish"))

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
            pipe.hdel(REPLAYING, job_id)  # a replay of an earlier entry under this id is over: not this one's
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
        while (
            int(
                await self._trim(
                    keys=[INDEX, ENTRIES, PAYLOADS, REPLAYING], args=[self._max, TRIM_CHUNK, keys.sends("")]
                )
            )
            > 0
        ):
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
            entries = (_entry(i, r) for i, r in zip(ids, raw, strict=True) if r)
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
        return _entry(job_id, raw) if raw else None

    async def original_payload(self, job_id: str) -> Any:
        raw = await self._redis.hget(PAYLOADS, job_id)  # type: ignore[misc]
        return msgspec.msgpack.decode(raw) if raw else None

    async def replay(self, pool: ArqRedis, job_id: str) -> str | None:
        """Enqueue the entry's payload again, continuing the original job's send record, and take the entry out;
        return the new job's id, or None when there is no such entry (never, or another replay finished it).

        In three steps, none of which loses the entry: the new job's id is reserved for the entry
        (``dead_reserve.lua``), the job is enqueued under it, and the entry leaves the store with the replay
        links set (``dead_finish.lua``). A replay cut short between them (a timeout, a crash, Redis frozen and
        thawed) leaves the entry listed with its reservation, and the next replay of it uses the same id: arq
        enqueues a job id once, and a job that ran already finds its result in the send record, so nothing is
        sent twice. Of replays racing for one entry, one returns the id. The new job carries ``replay_of``."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(ENTRIES, job_id)
            pipe.hget(PAYLOADS, job_id)
            pipe.hget(ORIGINS, job_id)
            raw_entry, raw_payload, raw_origin = await pipe.execute()
        if raw_entry is None or raw_payload is None:
            return None
        try:  # read before anything is reserved: an entry that cannot be replayed is left as it is
            payload = msgspec.msgpack.decode(raw_payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UnreadablePayloadError(f"the dead letter's payload cannot be read ({exc}): delete it") from None
        new_id = await self._reserve(keys=[ENTRIES, REPLAYING], args=[job_id, uuid.uuid4().hex])
        if not new_id:
            return None  # finished or removed meanwhile
        new_id = new_id.decode() if isinstance(new_id, bytes) else str(new_id)
        function = _entry(job_id, raw_entry).function  # an entry that does not decode stands in as whatsapp_send
        origin = raw_origin.decode(errors="replace") if raw_origin else job_id
        job = await pool.enqueue_job(function, payload, replay_of=origin, _job_id=new_id)
        # None from arq: a replay before this one enqueued it already (and was cut short); it is finished here
        done = await self._finish(
            keys=[INDEX, ENTRIES, PAYLOADS, ORIGINS, REPLAYING, keys.replayed_as(job_id), keys.replay_of(new_id),
                  send_log_key(origin)],
            args=[job_id, new_id, LINK_TTL, SEND_LOG_TTL, "1" if job is not None else "0"],
        )  # fmt: skip
        return new_id if int(done) == 1 else None

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
            pipe.hdel(REPLAYING, job_id)
            removed, *_ = await pipe.execute()
        return bool(removed)

    async def purge(self) -> int:
        count = await self.count()
        origins = await self._redis.hvals(ORIGINS)  # type: ignore[misc]
        for start in range(0, len(origins), TRIM_CHUNK):
            await self._redis.delete(*[send_log_key(o.decode()) for o in origins[start : start + TRIM_CHUNK]])
        await self._redis.delete(INDEX, ENTRIES, PAYLOADS, ORIGINS, REPLAYING)
        return count
