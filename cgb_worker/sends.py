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

**The delivery record and turns.** The ``sending`` mark carries the step's delivery record (``d:<step>``: when
the request left, for the webhook receiver's timeline), in the same ``HSET``. While a receiver is deployed
(its lease, ``cgb:webhooks:tracking``), the same round trip also takes the person's *turn*
(``cgb:turn:<who>``, ``SET NX``) and puts the step in the awaiting set (``cgb:awaiting``), before the request
leaves, so that no status can arrive for a send the receiver does not know of. A turn is held by one send
step to one person until the receiver places that message's first status (or, for a flow, which may send
several messages, until the turn runs out), and for at most ``CGB_TIMEOUT`` + ``STATUS_TURN_WAIT``. A step that
finds another's turn is not sent: its job is deferred (:class:`~cgb_worker.errors.TurnBusyError`, like a
rate-limit wait: no attempt used, no slot held). See the README's attribution rule for why this makes every
match exact.

A step found ``sending`` by a later try is an unknown outcome: ``CGB_UNKNOWN_OUTCOME=resend`` sends it again
and flags the result ``possibleDuplicate``; ``fail`` fails the job into the dead-letter store instead.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from redis.asyncio import Redis

from . import keys, sealed
from .errors import CGBAPIError, CGBConnectError, CGBError, TurnBusyError
from .scripts import UnsendScript

SENDING = b"sending"
SENT = b"sent"
RESULT = b"result"
OF = b"of"
"""In a fallback job's own log: the job whose delivery record its template joins."""
RS = b"rs"
"""In an automatic resend's own log: ``<job id>|<step>|<code>``, the step it sends again (a replay of it, too)."""
TTL = 7 * 24 * 3600
"""Longer than any retry horizon plus arq's result lifetime: a re-run always finds its record. A job in the
dead-letter store keeps its record for as long as the entry lives (see :mod:`cgb_worker.deadletters`)."""

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


key = keys.sends


def awaiting_member(who: str, request_ms: int, open_until_ms: int, ref: str) -> str:
    """A send in ``cgb:awaiting``. Every score is 0 and members sort as strings: by person, then by the time the
    request left (13 digits of ms), so one ``ZRANGEBYLEX`` finds a person's sends in a time range. ``open_until``
    is 0 for a single message (open until its first wamid) and, for a flow, the end of its turn."""
    return f"{who}|{request_ms:013d}|{open_until_ms:013d}|{ref}"


def parse_member(value: str) -> tuple[str, int, int, str, str]:
    """(who, request ms, open until ms, delivery id, step) of an :func:`awaiting_member`."""
    who, at, until, rest = value.split("|", 3)
    delivery_id, _, step = rest.rpartition("|")
    return who, int(at), int(until), delivery_id, step


class StepRecord(msgspec.Struct, frozen=True):
    """A send step as the worker records it for delivery receipts, written with its ``sending`` mark."""

    delivery_id: str
    step: str
    to: str
    """E.164."""
    request_ms: int
    tracking: bool
    open_ms: int = 0
    """How long after the request its statuses may be placed by the attribution rule: the request's timeout plus
    ``STATUS_TURN_WAIT``."""
    skew_ms: int = 0
    """``STATUS_CLOCK_SKEW``: a flow holds the turn twice this (and Meta's one-second rounding) past ``open_ms``."""
    fallback: dict[str, Any] | None = None
    """For a text sent in place of a ``whatsappTemplate``: the job fields the receiver re-sends as the
    template if WhatsApp answers 131047 (kept sealed, :mod:`cgb_worker.sealed`)."""
    fallback_for: str | None = None
    """For that template, sent automatically: the step it replaces."""
    category: str | None = None
    """The job's category, for the timeline."""
    payload: bytes | None = None
    """While a receiver tracks sends: the job's payload, sealed, for an automatic resend of this step."""
    resend_of: str | None = None
    """For a step sent again automatically (:mod:`cgb_worker.whatsapp_errors`): the step it replaces, and the
    error code that called for it."""
    resend_code: int | None = None

    @property
    def who(self) -> str:
        return keys.who(self.to)

    @property
    def ref(self) -> str:
        return f"{self.delivery_id}|{self.step}"

    @property
    def turn_ms(self) -> int:
        """How long the person's turn lasts at most. One message frees it with its first status; a flow, which
        may send several, keeps it until its statuses can no longer be told from the next message's."""
        return max(1, self.open_ms + (2 * self.skew_ms + 1000 if self.step == "flow" else 0))

    @property
    def member(self) -> str | None:
        if not self.tracking:
            return None
        until = self.request_ms + self.open_ms if self.step == "flow" else 0
        return awaiting_member(self.who, self.request_ms, until, self.ref)

    def fields(self) -> dict[str | bytes, bytes]:
        state: dict[str, Any] = {"status": "accepted", "at": self.request_ms}
        if self.fallback_for:
            state["fallbackFor"] = self.fallback_for
        if self.category:
            state["category"] = self.category
        if self.resend_of:
            state["resendOf"], state["resendCode"] = self.resend_of, self.resend_code
        if self.tracking:
            state["who"] = self.who  # what a reaction to its failure needs (opt-outs, undeliverable numbers)
        out: dict[str | bytes, bytes] = {f"d:{self.step}": msgspec.json.encode(state)}
        if self.fallback is not None:
            out[f"f:{self.step}"] = sealed.seal(msgspec.json.encode(self.fallback))
        if self.payload is not None:
            out[f"p:{self.step}"] = self.payload
        return out


class SendLog:
    def __init__(self, redis: Redis, *, ttl: int = TTL) -> None:
        self._redis = redis
        self._ttl = ttl
        self._unsend = UnsendScript(redis)

    async def load(self, job_id: str) -> dict[bytes, bytes]:
        return await self._redis.hgetall(key(job_id))  # type: ignore[no-any-return,misc]

    async def mark_sending(
        self, job_id: str, step: str, record: StepRecord | None = None, *, new_record: bool = True
    ) -> None:
        """One round trip on the way to CGB: the mark and the record's TTL (which ``sent`` then keeps); with
        ``record``, the step's delivery record (unless an earlier try wrote it: ``new_record``), and while a
        receiver tracks sends, the person's turn and the awaiting set. A turn held by another send takes all of
        it back and raises :class:`TurnBusyError`."""
        log = key(job_id)
        fields: dict[str | bytes, bytes] = {step: SENDING}
        own = record is not None and record.delivery_id == job_id
        if record is not None and own and new_record:
            fields.update(record.fields())
        if record is not None and not own:
            fields[OF] = record.delivery_id.encode()  # a replay of this job finds whose record it writes
        tracked = record is not None and record.tracking
        async with self._redis.pipeline(transaction=False) as pipe:
            if tracked:
                assert record is not None
                pipe.set(keys.turn(record.who), record.ref, nx=True, px=record.turn_ms)
            pipe.hset(log, mapping=fields)
            pipe.expire(log, self._ttl)
            if record is not None and not own:
                other = key(record.delivery_id)
                for name, value in record.fields().items():
                    pipe.hsetnx(other, name, value)  # type: ignore[arg-type]
                pipe.expire(other, self._ttl, nx=True)
            member = record.member if record is not None else None
            if member is not None:
                pipe.zadd(keys.AWAITING, {member: 0})
            done = await pipe.execute()
        if not tracked:
            return
        assert record is not None
        if done[0]:
            return
        turn = keys.turn(record.who)
        holder = await self._redis.get(turn)
        if holder == record.ref.encode():  # this step's own turn, from a try whose outcome is unknown
            await self._redis.pexpire(turn, record.turn_ms)
            return
        wrote = new_record if own else bool(done[3])
        await self._unsend(
            job_id,
            record.delivery_id,
            step,
            member=member,
            who=record.who,
            keep_mark=not new_record and own,
            wrote_record=wrote,
        )
        raise TurnBusyError("another message to this person awaits its first status", retry_after=1.0)

    async def mark_sent(
        self, job_id: str, step: str, *, result: bytes | None = None, record: StepRecord | None = None
    ) -> None:
        """The step is sent: one ``HSET`` (with the job's result when it was the last step). A record kept in
        another job's hash (a fallback template's) is marked acknowledged there too."""
        fields: dict[str | bytes, bytes] = {step: SENT}
        if result is not None:
            fields[RESULT] = result
        if record is None or record.delivery_id == job_id:
            await self._redis.hset(key(job_id), mapping=fields)  # type: ignore[misc]
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(key(job_id), mapping=fields)
            pipe.hset(key(record.delivery_id), f"a:{step}", "1")
            await pipe.execute()

    async def forget_copy(self, record: StepRecord) -> None:
        """A copy of a step sent again after an unknown outcome provably sent nothing: its member goes (the mark
        stays ``sending``, for the earlier copy's sake)."""
        if record.member is not None:
            await self._redis.zrem(keys.AWAITING, record.member)

    async def clear(self, job_id: str, step: str, record: StepRecord | None = None, *, new_record: bool = True) -> bool:
        """Nothing went out: the mark, and what ``mark_sending`` wrote with it, are taken back; False (nothing
        touched) when a status already proves the message went out."""
        if record is None:
            await self._redis.hdel(key(job_id), step)  # type: ignore[misc]
            return True
        return await self._unsend(
            job_id,
            record.delivery_id,
            step,
            member=record.member,
            who=record.who,
            keep_mark=False,
            wrote_record=new_record,
        )


def now_ms() -> int:
    return int(time.time() * 1000)
