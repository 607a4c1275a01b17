"""Placing a status on the message it belongs to, or holding it until it can be placed, never guessing.

A status whose wamid is known goes to its message. Otherwise ``match.lua`` lists the sends of ours to that person
that could have produced it: requested at most ``STATUS_CLOCK_SKEW`` after the second Meta stamped (for a ``sent``
or ``failed``, also at most ``STATUS_MATCH_WINDOW`` before it; a later status of a message whose ``sent`` was seen
is judged by that time), and still open (a single message until its wamid is placed, each copy of a resent step
counting; a flow for good, but a flow's ``sent`` only within its turn). Exactly one: the status is that send's
(``matchedBy: recipient``) and its wamid is remembered. None or several: the status is held and tried again (at ages
of about 1, 2, 4, … s, so a held status costs about a dozen tries however long it is held), since a rival may yet be
placed by its own status; after ``STATUS_HOLD`` it is kept in ``cgb:webhooks:unmatched`` with its reason, counted,
and each rival of an ``ambiguous`` one counts it as ``unresolved`` in its timeline. The README gives the rule's
proof.

Statuses are placed in batches: one ``place.lua`` call per status (match, then apply, atomically), all of a batch
queued on one pipeline in the order they arrived, which is the order the one-by-one processing ran them in; the
holding and the bookkeeping of held statuses follow in a second round trip (nothing ``match.lua`` or ``apply.lua``
reads is written there). No phone is kept: a held status carries its recipient's hash, and Meta's object is kept
with ``recipient_id`` masked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from loguru import logger
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .. import keys
from ..metrics import ReceiverMetrics
from ..privacy import redact, status_kept
from ..scripts import Applied, HoldScript, PlaceArgs, Placement, PlaceScript
from ..sends import TTL as SEND_LOG_TTL
from ..settings import ReceiverSettings
from ..window import WINDOW_TTL
from .payload import MetaStatus
from .timeline import iso

WAMID_TTL = 7 * 24 * 3600
BSUID_TTL = 30 * 24 * 3600
UNMATCHED_MAX = 10000
HELD_MAX = 100_000
"""Statuses held at most; one more is kept as unmatched (``overflow``) at once, so nobody's statuses (another
sender's, a flood) cannot grow the set without bound."""
REFUSALS = frozenset({131047, 132000, 132001, 132018})
"""Error codes of a ``failed`` that refuses the send itself (outside the 24-hour window, a template that does not
match): stamped when the message was sent, so matched by that time, like a ``sent``."""
MAX_CODE = 10**9
"""Meta's codes have six digits. A code outside 0..10^9 is kept as none (0): Lua's JSON would turn a huge one into
a float, which the timeline could not read back as a code."""
HELD_PER_TURN = 500
"""Held statuses tried in one turn at most, the longest-waiting first: the rest wait for the next turn."""

Outcome = Literal["changed", "kept", "duplicate", "gone", "none", "ambiguous", "error"]


@dataclass(frozen=True, slots=True)
class Placed:
    outcome: Outcome
    rivals: tuple[str, ...] = ()
    """For ``ambiguous``: the steps (``<delivery id>|<step>``) it could not be told apart from."""


@dataclass(slots=True)
class Pending:
    """A status to place: Meta's object (``recipient_id`` masked), and who it went to, as a hash."""

    status: MetaStatus
    raw: dict[str, Any]
    user_id: str | None
    who: str | None


def script_error(exc: BaseException) -> bool:
    """An error a script raised on this one item (a record it cannot read): the item's fault, set aside. Any other
    error from Redis (refused writes, out of memory, busy) is Redis's, and leaves the entry to be done again."""
    return isinstance(exc, ResponseError) and "user_script" in str(exc)


def masked(raw: dict[str, Any]) -> dict[str, Any]:
    """Meta's status object as it is kept (:func:`cgb_worker.privacy.status_kept`)."""
    return status_kept(raw)


def who_from(stored: bytes | None) -> str | None:
    """The hash a BSUID maps to; a map written by an older receiver holds the phone itself."""
    if not stored:
        return None
    value = stored.decode()
    return keys.who(value) if value.lstrip("+").isdigit() else value


class Matcher:
    def __init__(self, redis: Redis, settings: ReceiverSettings, metrics: ReceiverMetrics) -> None:
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self._place = PlaceScript(
            redis,
            window_ms=int(settings.match_window * 1000),
            skew_ms=int(settings.clock_skew * 1000),
            wamid_ttl=WAMID_TTL,
            stream_max=settings.stream_max,
            window_ttl=WINDOW_TTL,
        )
        self._hold = HoldScript(redis)
        self.hold_for = settings.hold
        self.held_max = HELD_MAX
        self.diagnostics_ttl = settings.diagnostics_ttl * 86400
        self._held = 0

    async def who_of(self, user_id: str | None) -> str | None:
        """The phone hash a business-scoped user id was last seen with."""
        return who_from(await self.redis.get(keys.bsuid(user_id))) if user_id else None

    def min_id(self) -> str:
        """The oldest entry id the diagnostic streams keep (``WEBHOOK_DIAGNOSTICS_TTL``)."""
        return f"{int((time.time() - self.diagnostics_ttl) * 1000)}-0"

    def queue(self, pipe: Any, p: Pending) -> None:
        """Queue ``place.lua`` for one status; its answer goes to :meth:`placed`."""
        status, error = p.status, p.status.errors[0] if p.status.errors else None
        event = msgspec.json.encode(
            {
                "status": status.status,
                "at": iso(status.at_ms),
                "received": iso(time.time() * 1000),
                "wamid": status.id,
                "meta": p.raw,
            }
        )
        self._place.queue(
            pipe,
            PlaceArgs(
                wamid=status.id,
                who=p.who,
                status=status.status,
                at_ms=status.at_ms,
                event=event,
                refused=status.status == "failed" and any(e.code in REFUSALS for e in status.errors),
                error_code=str(error.code) if error and 0 <= error.code < MAX_CODE else "",
                error_title=error.title if error else "",
                error_details=(error.error_data.details if error.error_data else error.message) if error else "",
                user_id=p.user_id or "",
            ),
        )

    def placed(self, p: Pending, answer: Any) -> Placed:
        """The answer of a queued call, counted. ``none`` and ``ambiguous`` are for the caller to hold."""
        found: Placement = PlaceScript.answer(answer)
        if found.applied is None:
            return Placed(found.match.by, found.match.refs)  # type: ignore[arg-type]
        self._count(p.status.status, p.status.at_ms, found.applied)
        return Placed(found.applied.outcome)

    def _count(self, status: str, at: int, applied: Applied) -> None:
        if applied.outcome == "changed":
            self.metrics.deliveries.labels(status).inc()
            if status == "delivered":
                self.metrics.delivery_seconds.observe(max(0.0, (at - applied.sent_at_ms) / 1000))
        elif applied.outcome == "gone":
            self.metrics.unmatched.labels("gone").inc()

    # -- held statuses ---------------------------------------------------------------------------------------

    @staticmethod
    def item(p: Pending) -> bytes:
        return msgspec.json.encode([p.raw, p.user_id, p.who])

    def queue_hold(self, pipe: Any, p: Pending) -> None:
        """Queue the hold of a status that could not be placed; the answer is -1 when it overflowed."""
        now = time.time()
        self._hold.queue(
            pipe, self.item(p), first_try=now + 1.0, now_ms=int(now * 1000), cap=self.held_max,
            kept=msgspec.json.encode([redact(p.raw)]), unmatched_max=UNMATCHED_MAX, unmatched_min_id=self.min_id(),
        )  # fmt: skip

    def held(self, answer: Any) -> None:
        if isinstance(answer, Exception):
            raise answer
        if int(answer) == -1:
            self.metrics.unmatched.labels("overflow").inc()

    async def hold(self, p: Pending) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue_hold(pipe, p)
            [answer] = await pipe.execute()
        self.held(answer)

    def _pending(self, item: bytes) -> Pending:
        decoded = msgspec.json.decode(item)
        raw, user_id = decoded[0], decoded[1]
        who = decoded[2] if len(decoded) > 2 else None
        status = msgspec.convert(raw, MetaStatus)
        if len(decoded) == 2 and status.recipient_id:  # held by an older receiver, with the phone in clear
            who, raw = keys.who(status.recipient_id), masked(raw)
        return Pending(status, raw, user_id, who)

    async def retry_held(self) -> int:
        """Try the held statuses that are due, in one round trip, and file each answer in another; returns how
        many were placed."""
        now = time.time()
        due: list[bytes] = await self.redis.zrangebyscore(keys.ORPHANS, "-inf", now, start=0, num=HELD_PER_TURN)
        if not due:
            if self._held:  # the gauge follows the set down to zero without a call per turn after that
                self._held = int(await self.redis.zcard(keys.ORPHANS))
                self.metrics.held.set(self._held)
            return 0
        since_raw = await self.redis.hmget(keys.ORPHANS_SINCE, due)  # type: ignore[misc]
        tries: list[tuple[bytes, float, Pending | None]] = []
        for item, since in zip(due, since_raw, strict=True):
            try:
                pending: Pending | None = self._pending(item)
            except Exception as exc:  # never let one held status stop the others: give it up, with its reason
                logger.error("a held status could not be read ({}); kept in {}", type(exc).__name__, keys.UNMATCHED)
                pending = None
            tries.append((item, int(since) / 1000 if since else now, pending))
        lookups = sorted({p.user_id for _i, _f, p in tries if p and not p.who and p.user_id})
        if lookups:
            found = await self.redis.mget([keys.bsuid(u) for u in lookups])
            whos = {u: who_from(v) for u, v in zip(lookups, found, strict=True)}
            for _i, _f, p in tries:
                if p and not p.who and p.user_id:
                    p.who = whos[p.user_id]
        async with self.redis.pipeline(transaction=False) as pipe:
            for _item, _first, p in tries:
                if p is not None:
                    self.queue(pipe, p)
            answers = iter(await pipe.execute(raise_on_error=False))
        placed = 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for item, first, p in tries:
                answer = next(answers) if p is not None else None
                if p is None or (isinstance(answer, Exception) and script_error(answer)):
                    self._give_up(pipe, item, p, Placed("error"))
                    continue
                if isinstance(answer, Exception):
                    raise answer
                found = self.placed(p, answer)
                age = now - first
                if found.outcome not in ("none", "ambiguous"):
                    pipe.zrem(keys.ORPHANS, item)
                    pipe.hdel(keys.ORPHANS_SINCE, item)  # type: ignore[arg-type]
                    placed += 1
                elif age >= self.hold_for:
                    self._give_up(pipe, item, p, found)
                else:
                    pipe.zadd(keys.ORPHANS, {item: min(now + max(1.0, age), first + self.hold_for)}, xx=True)
            # exact: an approximate MINID trims whole nodes only, which a small stream never fills
            pipe.xtrim(keys.UNMATCHED, minid=self.min_id(), approximate=False)
            pipe.zcard(keys.ORPHANS)
            answered = await pipe.execute()
        self._held = int(answered[-1])
        self.metrics.held.set(self._held)
        return placed

    def _give_up(self, pipe: Any, item: bytes, p: Pending | None, found: Placed) -> None:
        reason, rivals = found.outcome, found.rivals
        pipe.zrem(keys.ORPHANS, item)
        pipe.hdel(keys.ORPHANS_SINCE, item)
        kept = msgspec.json.encode([redact(p.raw)]) if p is not None else b'["<unreadable>"]'
        pipe.xadd(
            keys.UNMATCHED, {"status": kept, "reason": reason, "rivals": len(rivals)}, maxlen=UNMATCHED_MAX,
            approximate=True,
        )  # fmt: skip
        for ref in rivals:
            delivery_id, _, step = ref.rpartition("|")
            pipe.hincrby(keys.sends(delivery_id), f"u:{step}", 1)
            pipe.expire(keys.sends(delivery_id), SEND_LOG_TTL, nx=True)
        self.metrics.unmatched.labels(reason).inc()
