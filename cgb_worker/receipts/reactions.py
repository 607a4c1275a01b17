"""What statuses call for, carried out exactly once.

``apply.lua`` appends a ``failed`` reaction (the job, the step, WhatsApp's code and Meta's stamp) to the outbox
stream ``cgb:reactions`` in the same atomic step that makes a message ``failed``, which happens once per message.
The :class:`Reactor` reads the outbox through a consumer group and does what the code's row in
:mod:`cgb_worker.whatsapp_errors` says: the 131047 fallback template, an automatic resend, a pause of the fleet's
rate limit, an opt-out, an undeliverable mark. An entry is acknowledged only once its action is done, so a Redis
error or a receiver killed mid-way leaves it pending, to be done again by this receiver or, after
:data:`CLAIM_IDLE`, by another. Doing one again is harmless: a fallback or a resend is a ``whatsapp_send`` job
whose id names what it sends (``<job id>:fallback``, ``<job id>:resend:text~1``), which arq refuses to enqueue
twice while it or its result lives, and whose send log (seven days) keeps it from being sent twice after that;
an opt-out or a mark written twice is the same opt-out or mark.
"""

from __future__ import annotations

from typing import Any

import msgspec
from arq.connections import ArqRedis
from loguru import logger
from redis.exceptions import ResponseError

from .. import keys, sealed
from ..metrics import ReceiverMetrics
from ..ratelimit import pause_fleet
from ..settings import ReactionSettings
from ..suppression import suppress_who
from ..whatsapp_errors import base_step, chain, next_step, resend_delay, rule_for

CLAIM_IDLE = 30.0
RECORD_SLACK = 86400
"""Seconds a job's record outlives the wait for its resend at least."""
BATCH = 100


class Reactor:
    def __init__(
        self, redis: ArqRedis, metrics: ReceiverMetrics, consumer: str, rules: ReactionSettings | None = None
    ) -> None:
        self.redis = redis
        self.rules = rules or ReactionSettings()
        self.metrics = metrics
        self.consumer = consumer
        self.claim_idle = CLAIM_IDLE
        self._group = False

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.REACTIONS, keys.REACTIONS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group = True

    async def turn(self) -> int:
        """Carry out this consumer's pending reactions, then others' stale ones, then new ones; never blocks."""
        if not self._group:
            await self.ensure_group()
        try:
            entries = await self._read()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group = False  # the outbox went away with a Redis that lost its data: make it again
            return 0
        for entry_id, fields in entries:
            if fields:  # an entry deleted while pending comes back empty
                await self.react(fields)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(keys.REACTIONS, keys.REACTIONS_GROUP, entry_id)
                pipe.xdel(keys.REACTIONS, entry_id)
                await pipe.execute()
        return len(entries)

    async def _read(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        group, name = keys.REACTIONS_GROUP, self.consumer
        for _stream, items in await self.redis.xreadgroup(group, name, {keys.REACTIONS: "0"}, count=BATCH) or []:
            entries.extend(items)
        if not entries:
            claimed = await self.redis.xautoclaim(
                keys.REACTIONS, group, name, min_idle_time=int(self.claim_idle * 1000), count=BATCH
            )
            entries.extend(claimed[1] if claimed else [])
        if not entries:
            for _stream, items in await self.redis.xreadgroup(group, name, {keys.REACTIONS: ">"}, count=BATCH) or []:
                entries.extend(items)
        return entries

    async def react(self, fields: dict[bytes, bytes]) -> None:
        kind = fields.get(b"kind", b"").decode()
        job, step = fields.get(b"job", b"").decode(), fields.get(b"step", b"").decode()
        if kind == "fallback":  # appended by a receiver of the previous version
            await self.fallback(job, step)
        elif kind == "failed":
            code, at = int(fields.get(b"code") or 0), fields.get(b"at")
            kind = await self.failed(job, step, code, int(at) if at else None)
            self.metrics.whatsapp_error(code)  # once the action is done: a reaction redone is counted once more
        else:
            logger.warning("an unknown reaction {!r} was dropped", kind[:40])
            return
        self.metrics.reactions.labels(kind).inc()

    async def failed(self, delivery_id: str, step: str, code: int, at_ms: int | None = None) -> str:
        """A message of ``delivery_id`` failed with ``code`` (stamped ``at_ms`` by Meta): the code's row in the table
        says what to do. Returns what was done: the action, ``fail`` when nothing could be, ``given_up``."""
        rule = rule_for(code)
        record = keys.sends(delivery_id)
        # the step, and every earlier send of it (``text``, ``text~1``, ...): what the chain of resends was for
        state_raw, fallback, payload, *earlier = await self.redis.hmget(  # type: ignore[misc]
            record, [f"d:{step}", f"f:{step}", f"p:{step}", *(f"d:{name}" for name in chain(step))]
        )
        state: dict[str, Any] = msgspec.json.decode(state_raw) if state_raw else {}
        codes = [msgspec.json.decode(raw).get("resendCode") for raw in earlier if raw]
        who: str = state.get("who") or ""
        log = logger.bind(job_id=delivery_id, step=step, code=code)
        # one line per failed message, with its code: the job id (bound) and the step name it, never the person
        log.info("WhatsApp failed the {}: {} ({})", step, code, rule.meaning)
        rules = self.rules
        action = rule.action
        if action == "fallback":
            if not fallback:
                return "fail"  # a text with no whatsappTemplate to fall back to
            await self.fallback(delivery_id, step)
            return action
        if action in ("suppress", "undeliverable") and not who:
            return "fail"  # sent while no receiver tracked sends: the record does not say who it was
        if action == "suppress":
            # as of Meta's stamp: a 131050 from before the person's START (redelivered, or from a backlog) is stale
            await suppress_who(self.redis, who, scope="marketing", reason="131050", at_ms=at_ms)
            log.info("WhatsApp said the person stopped marketing messages (131050): marketing to them is suppressed")
            return action
        if action == "undeliverable":
            await self.redis.set(keys.undeliverable(who), str(code), ex=int(rules.undeliverable_ttl))
            log.info(
                "WhatsApp cannot deliver to this number (131026): jobs to it fail for {:.0f} s", rules.undeliverable_ttl
            )
            return action
        if action == "marketing_cap" and (not rules.marketing_cap_retry_after or code in codes):
            log.info("WhatsApp's per-person marketing cap (131049): not sent again")
            return "fail"
        if action == "fail":
            return action
        if action == "throttle":
            await pause_fleet(self.redis)
            log.warning("WhatsApp's throughput limit ({}): every worker's rate limit backs off", code)
        if base_step(step) == "flow":
            # a flow may have sent several messages, and sending it again would send them all again
            log.warning("WhatsApp failed a flow's message with {}: a flow is not sent again automatically", code)
            return "given_up"
        # the pacing and throughput resends of the chain count against WA_RESEND_MAX; the cap's one does not
        n = sum(1 for c in codes if c is not None and rule_for(c).action in ("resend", "throttle")) + 1
        if not payload or (action != "marketing_cap" and n > rules.resend_max):
            # beyond the last resend; or sent while no receiver tracked sends, or the record expired
            why = (
                f"after {n - 1} automatic resend(s)"
                if payload
                else "and it cannot be sent again (its payload is not kept)"
            )
            log.warning("WhatsApp failed the message with {} {}: it stays failed", code, why)
            return "given_up"
        if action == "marketing_cap":
            delay = rules.marketing_cap_retry_after
        else:
            delay = resend_delay(n, first=rules.resend_delay, factor=rules.resend_factor)
        await self.resend(delivery_id, step, code, delay)
        return action

    async def resend(self, delivery_id: str, step: str, code: int, delay: float) -> None:
        """Send ``step`` again after ``delay`` seconds, as a job of its own whose id names the step it sends: arq
        refuses it twice while it or its result lives, and its send log keeps it from being sent twice after."""
        new_step = next_step(step)
        record = keys.sends(delivery_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(record, f"r:{step}", new_step)  # the timeline says a resend is on its way
            pipe.ttl(record)
            _, ttl = await pipe.execute()
        if 0 <= ttl < delay + RECORD_SLACK:  # the resend reads its payload from the record: it must outlive the wait
            await self.redis.expire(record, int(delay + RECORD_SLACK))
        job = await self.redis.enqueue_job(
            "whatsapp_send",
            resend_of=delivery_id,
            resend_step=step,
            resend_code=code,
            _job_id=f"{delivery_id}:resend:{new_step}",
            _defer_by=delay,
        )
        logger.bind(job_id=delivery_id, step=step).info(
            "WhatsApp failed the message with {}: {}",
            code,
            f"sending it again in {delay:.1f} s as {new_step}" if job is not None else "its resend is already queued",
        )

    async def fallback(self, delivery_id: str, step: str) -> None:
        """The job's text failed with 131047: send its ``whatsappTemplate``, as a job of its own."""
        sealed_fields = await self.redis.hget(keys.sends(delivery_id), f"f:{step}")  # type: ignore[misc]
        fields = unsealed(sealed_fields) if sealed_fields else None
        if not fields:
            return  # the record expired (or was sealed under another key): nothing to send
        job = await self.redis.enqueue_job(
            "whatsapp_send", msgspec.json.decode(fields), fallback_of=delivery_id, _job_id=f"{delivery_id}:fallback"
        )
        logger.bind(job_id=delivery_id).info(
            "the text failed outside the 24-hour window (131047): {}",
            "sending the job's whatsappTemplate instead" if job is not None else "its template is already queued",
        )


def unsealed(value: bytes) -> bytes | None:
    """A sealed fallback; one written in clear by the previous version is read as it is."""
    return value if value.startswith(b"{") else sealed.unseal(value)
