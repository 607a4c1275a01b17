"""The send log: what each job has sent, kept in Redis so that no retry or re-run sends it twice.

CGB has no idempotency key and returns no message id, so the worker keeps its own record, per arq job id
and per send step (``text``, ``file``, ``flow``): ``sending`` is written before the request leaves and
``sent`` once CGB acknowledged it. A later attempt of the same job skips steps marked ``sent``, and reads
its final result from here if it already finished. A step still marked ``sending`` means an earlier
attempt died or timed out after the request left: its outcome is unknown (see :mod:`cgb_worker.jobs`).
An HTTP error answer from CGB proves nothing was sent, so the mark is cleared before retrying.
"""

from __future__ import annotations

from redis.asyncio import Redis

SENDING = b"sending"
SENT = b"sent"
RESULT = b"result"
TTL = 7 * 24 * 3600
"""Longer than any retry horizon plus arq's result lifetime: a re-run always finds its record."""


class SendLog:
    def __init__(self, redis: Redis, *, ttl: int = TTL) -> None:
        self._redis = redis
        self._ttl = ttl

    @staticmethod
    def key(job_id: str) -> str:
        return f"cgb:sends:{job_id}"

    async def mark(self, job_id: str, step: str, state: bytes, *, result: bytes | None = None) -> None:
        mapping: dict[str | bytes, bytes] = {step: state}
        if result is not None:
            mapping[RESULT] = result
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.key(job_id), mapping=mapping)
            pipe.expire(self.key(job_id), self._ttl)
            await pipe.execute()

    async def clear(self, job_id: str, step: str) -> None:
        await self._redis.hdel(self.key(job_id), step)  # type: ignore[misc]
