"""What statuses call for, carried out exactly once.

``apply.lua`` appends a reaction to the outbox stream ``cgb:reactions`` in the same atomic step that applies
the status (today: ``fallback``, a text WhatsApp failed with 131047 whose job carried a ``whatsappTemplate``),
and only when the status changes the message's status, which it does once. The :class:`Reactor` reads the
outbox through a consumer group: an entry is acknowledged only once its action is done, so a Redis error or a
receiver killed mid-way leaves it pending, to be done again by this receiver or, after :data:`CLAIM_IDLE`, by
another. Doing one again is harmless: the fallback is a ``whatsapp_send`` job with the id ``<job id>:fallback``,
which arq refuses to enqueue twice while it or its result lives, and whose send log (seven days) keeps it from
being sent twice after that.
"""

from __future__ import annotations

import msgspec
from arq.connections import ArqRedis
from loguru import logger
from redis.exceptions import ResponseError

from .. import keys
from ..metrics import ReceiverMetrics

CLAIM_IDLE = 30.0
BATCH = 100


class Reactor:
    def __init__(self, redis: ArqRedis, metrics: ReceiverMetrics, consumer: str) -> None:
        self.redis = redis
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
        if kind == "fallback":
            await self.fallback(fields[b"job"].decode(), fields[b"step"].decode())
        else:
            logger.warning("an unknown reaction {!r} was dropped", kind[:40])
            return
        self.metrics.reactions.labels(kind).inc()

    async def fallback(self, delivery_id: str, step: str) -> None:
        """The job's text failed with 131047: send its ``whatsappTemplate``, as a job of its own."""
        fields = await self.redis.hget(keys.sends(delivery_id), f"f:{step}")  # type: ignore[misc]
        if not fields:
            return  # the record expired: nothing to send
        job = await self.redis.enqueue_job(
            "whatsapp_send", msgspec.json.decode(fields), fallback_of=delivery_id, _job_id=f"{delivery_id}:fallback"
        )
        logger.bind(job_id=delivery_id).info(
            "the text failed outside the 24-hour window (131047): {}",
            "sending the job's whatsappTemplate instead" if job is not None else "its template is already queued",
        )
