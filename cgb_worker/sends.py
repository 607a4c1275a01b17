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


_LOAD_WITH = """
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2])}
"""
_MARK_SENDING = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
"""


class SendLog:
    def __init__(self, redis: Redis, *, ttl: int = TTL) -> None:
        self._redis = redis
        self._ttl = ttl
        self._mark_sending = redis.register_script(_MARK_SENDING)
        self._load_with = redis.register_script(_LOAD_WITH)

    @staticmethod
    def key(job_id: str) -> str:
        return f"cgb:sends:{job_id}"

    async def load_with(self, job_id: str, other_key: str) -> tuple[dict[bytes, bytes], bytes | None]:
        """The job's record, and the value of ``other_key`` (the contact cache), in one command."""
        flat, other = await self._load_with(keys=[self.key(job_id), other_key])
        return dict(zip(flat[0::2], flat[1::2], strict=True)), other

    async def mark(self, job_id: str, step: str, state: bytes, *, result: bytes | None = None) -> None:
        """One command either way: ``sending`` also sets the record's TTL, which ``sent`` then keeps."""
        if state == SENDING:
            await self._mark_sending(keys=[self.key(job_id)], args=[step, state, self._ttl])
            return
        mapping: dict[str | bytes, bytes] = {step: state}
        if result is not None:
            mapping[RESULT] = result
        await self._redis.hset(self.key(job_id), mapping=mapping)  # type: ignore[misc]

    async def clear(self, job_id: str, step: str) -> None:
        await self._redis.hdel(self.key(job_id), step)  # type: ignore[misc]
