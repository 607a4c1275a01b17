"""The send log: what each job has sent, kept in Redis so that no retry, re-run or replay sends it twice.

CGB has no idempotency key and returns no message id, so the worker keeps its own record, one hash per
job (``cgb:sends:<job id>``; a replay keeps writing the original job's hash) with one field per send step
(``text``, ``file``, ``flow``). ``sending`` is written immediately before the request leaves, after its
rate-limit slot, the contact, the custom fields and any lock, so that nothing which fails before it (a
throttle, a busy lock, Redis, validation) leaves a mark; ``sent`` is written once CGB acknowledged it,
together with the job's result when it was the last step. A later try skips steps marked ``sent``, and
returns the stored result when every step is done.

When a request fails, what the failure proves decides whether the mark is cleared (:func:`nothing_sent`):

* proves nothing went out, so the mark is cleared and the step may be sent again: no connection could be
  made (``CGBConnectError``); an HTTP 4xx answer, 408 and 429 included; an HTTP 503; an error CGB puts in
  an HTTP 200 body (``{"error": ...}``, ``success: false``) unless its code is a 5xx other than 503;
* leaves the outcome unknown, so the mark is kept: a timeout, or a connection that broke once the request
  was on its way (``CGBTimeoutError``); an HTTP 500, 502, 504 or any other 5xx but 503; the worker dying
  between the request and the mark.

A step found ``sending`` by a later try is an unknown outcome: ``CGB_UNKNOWN_OUTCOME=resend`` sends it again
and flags the result ``possibleDuplicate``; ``fail`` fails the job into the dead-letter store instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from redis.asyncio import Redis

from .errors import CGBAPIError, CGBConnectError, CGBError

SENDING = b"sending"
SENT = b"sent"
RESULT = b"result"
TTL = 7 * 24 * 3600
"""Longer than any retry horizon plus arq's result lifetime: a re-run always finds its record. A job in the
dead-letter store keeps its record for as long as the entry lives (see :mod:`cgb_worker.deadletters`)."""

if TYPE_CHECKING:
    from .deliveries import Accepted

UNKNOWN_STATUSES = frozenset({500, 502, 504})


def nothing_sent(error: BaseException) -> bool:
    """Whether ``error``, raised by a send request, proves that CGB did not act on it (the table above)."""
    if isinstance(error, CGBConnectError):
        return True
    if isinstance(error, CGBAPIError):
        status = error.status if error.status is not None and not 200 <= error.status < 300 else error.code
        if status is None:
            return True  # a refusal in a 2xx body with no code
        return not (status in UNKNOWN_STATUSES or (status >= 500 and status != 503))
    return not isinstance(error, CGBError)  # our own errors are raised before anything leaves


def key(job_id: str) -> str:
    return f"cgb:sends:{job_id}"


_MARK_SENDING = """
redis.call('HSET', KEYS[1], ARGV[1], 'sending')
redis.call('EXPIRE', KEYS[1], ARGV[2])
"""


class SendLog:
    def __init__(self, redis: Redis, *, ttl: int = TTL) -> None:
        self._redis = redis
        self._ttl = ttl
        self._mark_sending = redis.register_script(_MARK_SENDING)

    async def load(self, job_id: str) -> dict[bytes, bytes]:
        return await self._redis.hgetall(key(job_id))  # type: ignore[no-any-return,misc]

    async def mark_sending(self, job_id: str, step: str) -> None:
        """One command on the way to CGB: the mark, and the record's TTL (which ``sent`` then keeps)."""
        await self._mark_sending(keys=[key(job_id)], args=[step, self._ttl])

    async def mark_sent(
        self, job_id: str, step: str, *, result: bytes | None = None, accepted: Accepted | None = None
    ) -> None:
        """The step is sent; with ``accepted``, its delivery record too (:mod:`cgb_worker.deliveries`), in the
        same ``HSET`` when the job is its own delivery record, and in the same round trip in any case."""
        fields: dict[str | bytes, bytes] = {step: SENT}
        if result is not None:
            fields[RESULT] = result
        if accepted is None:
            await self._redis.hset(key(job_id), mapping=fields)  # type: ignore[misc]
            return
        from .deliveries import ACCEPTED

        own = accepted.delivery_id == job_id
        if own:
            fields.update(accepted.fields())
        index = accepted.index()
        if own and index is None:
            await self._redis.hset(key(job_id), mapping=fields)  # type: ignore[misc]
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(key(job_id), mapping=fields)
            if not own:
                pipe.hset(key(accepted.delivery_id), mapping=accepted.fields())
                pipe.expire(key(accepted.delivery_id), self._ttl, nx=True)
            if index is not None:
                pipe.zadd(ACCEPTED, index)
            await pipe.execute()

    async def clear(self, job_id: str, step: str) -> None:
        await self._redis.hdel(key(job_id), step)  # type: ignore[misc]
