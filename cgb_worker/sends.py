"""The send log: what each job has sent, kept in Redis so that no retry or re-run sends it twice.

CGB has no idempotency key and returns no message id, so the worker keeps its own record, per arq job id
and per send step (``text``, ``file``, ``flow``): ``sending`` is written before the request leaves and
``sent`` once CGB acknowledged it. A later attempt of the same job skips steps marked ``sent``, and reads
its final result from here if it already finished. A step still marked ``sending`` means an earlier
attempt died or timed out after the request left: its outcome is unknown (see :mod:`cgb_worker.jobs`).
An HTTP error answer from CGB proves nothing was sent, so the mark is cleared before retrying.

A worker may offer to write a job's last ``sent`` mark (the one carrying the result) in the same transaction
as arq's result: it puts a dict under ``ctx[FINISH_WRITES]``, the job leaves ``{job_id: (key, fields)}`` in
it instead of writing, and the worker adds one ``HSET`` to its finish transaction (:class:`CGBWorker` does).
That saves a round trip per message, and the mark and arq's result then land together or not at all.
"""

from __future__ import annotations

from redis.asyncio import Redis

SENDING = b"sending"
SENT = b"sent"
RESULT = b"result"
FINISH_WRITES = "cgb_finish_writes"
TTL = 7 * 24 * 3600
"""Longer than any retry horizon plus arq's result lifetime: a re-run always finds its record."""


# The record as it was, the contact cache's value, and whether ARGV[1]'s step was marked ``sending`` now: it
# is, when a step is named, the contact is cached (nothing but CPU work stands between this and the send)
# and the step has not been sent.
_LOAD_WITH = """
local record = redis.call('HGETALL', KEYS[1])
local cached = redis.call('GET', KEYS[2])
local marked = 0
if ARGV[1] ~= '' and cached and redis.call('HEXISTS', KEYS[1], 'result') == 0
        and redis.call('HGET', KEYS[1], ARGV[1]) ~= 'sent' then
    redis.call('HSET', KEYS[1], ARGV[1], 'sending')
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    marked = 1
end
return {record, cached, marked}
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

    async def load_with(
        self, job_id: str, cache_key: str, first_step: str = ""
    ) -> tuple[dict[bytes, bytes], bytes | None, bool]:
        """In one command: the job's record, the contact cache's value, and whether ``first_step`` was
        marked ``sending`` on the way (only when the contact is cached, so that no I/O comes between the
        mark and the send; saves a round trip on the common path)."""
        flat, cached, marked = await self._load_with(keys=[self.key(job_id), cache_key], args=[first_step, self._ttl])
        return dict(zip(flat[0::2], flat[1::2], strict=True)), cached, bool(marked)

    async def mark(self, job_id: str, step: str, state: bytes, *, result: bytes | None = None) -> None:
        """One command either way: ``sending`` also sets the record's TTL, which ``sent`` then keeps."""
        if state == SENDING:
            await self._mark_sending(keys=[self.key(job_id)], args=[step, state, self._ttl])
            return
        await self._redis.hset(self.key(job_id), mapping=sent_fields(step, result))  # type: ignore[misc]

    async def clear(self, job_id: str, step: str) -> None:
        await self._redis.hdel(self.key(job_id), step)  # type: ignore[misc]


def sent_fields(step: str, result: bytes | None = None) -> dict[str | bytes, bytes]:
    """The hash fields that record ``step`` as sent (and the job's encoded result with its last step)."""
    fields: dict[str | bytes, bytes] = {step: SENT}
    if result is not None:
        fields[RESULT] = result
    return fields
