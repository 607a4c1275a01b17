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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from loguru import logger
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .. import keys
from ..metrics import ReceiverMetrics
from ..scripts import Applied, ApplyScript, MatchScript, StatusUpdate
from ..sends import TTL as SEND_LOG_TTL
from ..settings import ReceiverSettings
from ..window import WINDOW_TTL
from .payload import MetaStatus
from .timeline import iso

WAMID_TTL = 7 * 24 * 3600
BSUID_TTL = 30 * 24 * 3600
UNMATCHED_MAX = 10000
REFUSALS = frozenset({131047, 132000, 132001, 132018})
"""Error codes of a ``failed`` that refuses the send itself (outside the 24-hour window, a template that does not
match): stamped when the message was sent, so matched by that time, like a ``sent``."""
HELD_PER_TURN = 500
"""Held statuses tried in one turn at most, the longest-waiting first: the rest wait for the next turn."""

Outcome = Literal["changed", "kept", "duplicate", "gone", "none", "ambiguous", "error"]


@dataclass(frozen=True, slots=True)
class Placed:
    outcome: Outcome
    rivals: tuple[str, ...] = ()
    """For ``ambiguous``: the steps (``<delivery id>|<step>``) it could not be told apart from."""


class Matcher:
    def __init__(self, redis: Redis, settings: ReceiverSettings, metrics: ReceiverMetrics) -> None:
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self._match = MatchScript(redis)
        self._apply = ApplyScript(redis, stream_max=settings.stream_max, window_ttl=WINDOW_TTL)
        self.hold_for = settings.hold
        self._held = 0

    async def phone_of(self, user_id: str | None) -> str | None:
        """The phone a business-scoped user id was last seen with."""
        if not user_id:
            return None
        phone = await self.redis.get(keys.bsuid(user_id))
        return phone.decode() if phone else None

    async def place(
        self, status: MetaStatus, raw: dict[str, Any], user_id: str | None, *, held: bool = False
    ) -> Placed:
        """Match one status and apply it; a status that cannot be placed yet is held (unless it is already)."""
        at = status.at_ms
        phone = status.recipient_id or await self.phone_of(user_id)
        who = keys.who(phone) if phone else None
        found = await self._match(
            status.id,
            who,
            at,
            status=status.status,
            refused=status.status == "failed" and any(e.code in REFUSALS for e in status.errors),
            window_ms=int(self.settings.match_window * 1000),
            skew_ms=int(self.settings.clock_skew * 1000),
            wamid_ttl=WAMID_TTL,
        )
        if found.by == "none" or found.by == "ambiguous":
            if not held:
                await self.hold(raw, user_id)
            return Placed(found.by, found.refs)
        delivery_id, _, step = found.ref.rpartition("|")
        error = status.errors[0] if status.errors else None
        event = msgspec.json.encode(
            {
                "status": status.status,
                "at": iso(at),
                "received": iso(time.time() * 1000),
                "wamid": status.id,
                "meta": raw,
            }
        )
        update = StatusUpdate(
            step=step,
            status=status.status,
            at_ms=at,
            event=event,
            wamid=status.id,
            matched_by=found.by,
            error_code=str(error.code) if error else "",
            error_title=error.title if error else "",
            error_details=(error.error_data.details if error.error_data else error.message) if error else "",
            wa_id=status.recipient_id or "",
            user_id=user_id or "",
        )
        applied = await self._apply(delivery_id, update, window_key=keys.window(who) if who else None)
        self._count(status.status, at, applied)
        return Placed(applied.outcome)

    def _count(self, status: str, at: int, applied: Applied) -> None:
        if applied.outcome == "changed":
            self.metrics.deliveries.labels(status).inc()
            if status == "delivered":
                self.metrics.delivery_seconds.observe(max(0.0, (at - applied.sent_at_ms) / 1000))
        elif applied.outcome == "gone":
            self.metrics.unmatched.labels("gone").inc()

    # -- held statuses ---------------------------------------------------------------------------------------

    async def hold(self, raw: dict[str, Any], user_id: str | None) -> None:
        item = msgspec.json.encode([raw, user_id])
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.ORPHANS, {item: now + 1.0}, nx=True)
            pipe.hsetnx(keys.ORPHANS_SINCE, item, int(now * 1000))  # type: ignore[arg-type]
            await pipe.execute()

    async def retry_held(self) -> int:
        """Try the held statuses that are due; returns how many were placed."""
        now = time.time()
        due: list[bytes] = await self.redis.zrangebyscore(keys.ORPHANS, "-inf", now, start=0, num=HELD_PER_TURN)
        if not due:
            if self._held:  # the gauge follows the set down to zero without a call per turn after that
                self._held = int(await self.redis.zcard(keys.ORPHANS))
                self.metrics.held.set(self._held)
            return 0
        since_raw = await self.redis.hmget(keys.ORPHANS_SINCE, due)  # type: ignore[misc]
        placed = 0
        for item, since in zip(due, since_raw, strict=True):
            first = int(since) / 1000 if since else now
            try:
                raw, user_id = msgspec.json.decode(item)
                status = msgspec.convert(raw, MetaStatus)
                found = await self.place(status, raw, user_id, held=True)
            except RedisError:
                raise
            except Exception as exc:  # never let one held status stop the others: give it up, with its reason
                logger.error("a held status could not be applied ({}); kept in {}", type(exc).__name__, keys.UNMATCHED)
                await self._give_up(item, Placed("error"))
                continue
            age = now - first
            if found.outcome not in ("none", "ambiguous"):
                await self._forget(item)
                placed += 1
            elif age >= self.hold_for:
                await self._give_up(item, found)
            else:
                await self.redis.zadd(keys.ORPHANS, {item: min(now + max(1.0, age), first + self.hold_for)}, xx=True)
        self._held = int(await self.redis.zcard(keys.ORPHANS))
        self.metrics.held.set(self._held)
        return placed

    async def _forget(self, item: bytes) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.ORPHANS, item)
            pipe.hdel(keys.ORPHANS_SINCE, item)  # type: ignore[arg-type]
            await pipe.execute()

    async def _give_up(self, item: bytes, found: Placed) -> None:
        reason, rivals = found.outcome, found.rivals
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.ORPHANS, item)
            pipe.hdel(keys.ORPHANS_SINCE, item)  # type: ignore[arg-type]
            pipe.xadd(
                keys.UNMATCHED,
                {"status": item, "reason": reason, "rivals": len(rivals)},
                maxlen=UNMATCHED_MAX,
                approximate=True,
            )
            for ref in rivals:
                delivery_id, _, step = ref.rpartition("|")
                pipe.hincrby(keys.sends(delivery_id), f"u:{step}", 1)
                pipe.expire(keys.sends(delivery_id), SEND_LOG_TTL, nx=True)
            await pipe.execute()
        self.metrics.unmatched.labels(reason).inc()
