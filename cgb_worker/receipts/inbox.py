"""The processor: stored webhooks turned into timelines, one consumer of the inbox per receiver process.

The inbox (``cgb:webhooks:inbox``) is read through a consumer group, so several receivers share it and an entry
a dead receiver had taken is claimed by another after :data:`CLAIM_IDLE` seconds (at once by a receiver
restarted under the same ``WEBHOOK_CONSUMER``). Each item of a stored webhook is handled on its own
(:mod:`.payload`): statuses are placed (:mod:`.matching`), inbound messages open the window, contacts teach the
phone behind a business-scoped user id, and items the receiver cannot read are kept with the malformed ones.
An entry is acknowledged once all of it is applied; applying it again changes nothing. Each turn also carries
out reactions (:mod:`.reactions`), tries held statuses, and now and then marks sends with no status at all
``unconfirmed``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import msgspec
from arq.connections import ArqRedis
from loguru import logger
from redis.exceptions import RedisError, ResponseError

from .. import keys
from ..metrics import ReceiverMetrics
from ..scripts import ApplyScript, OpenWindowScript, StatusUpdate
from ..sends import TTL as SEND_LOG_TTL
from ..sends import parse_member
from ..settings import ReceiverSettings
from ..window import WINDOW_TTL
from .matching import BSUID_TTL, Matcher
from .payload import MalformedError, parse_payload
from .reactions import Reactor
from .timeline import iso

CLAIM_IDLE = 30.0
SWEEP_EVERY = 30.0
MALFORMED_MAX = 1000
TRACKING_LEASE = 24 * 3600
"""How long sends stay tracked after the last receiver stopped renewing: a receiver that is down for a
deploy misses nothing (Meta redelivers for days), and one taken away for good stops the bookkeeping."""


class Processor:
    """Turns stored webhooks into timelines (the module doc)."""

    def __init__(
        self, redis: ArqRedis, settings: ReceiverSettings, metrics: ReceiverMetrics, *, consumer: str | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self.consumer = consumer or settings.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.matcher = Matcher(redis, settings, metrics)
        self.reactor = Reactor(redis, metrics, self.consumer)
        self._open = OpenWindowScript(redis)
        self._apply = ApplyScript(redis, stream_max=settings.stream_max, window_ttl=WINDOW_TTL)
        self.alive = 0.0
        """time.monotonic() of the processor's last turn, for ``/healthz``."""
        self.claim_idle = CLAIM_IDLE
        self._swept: set[bytes] = set()
        self.inbox_length = 0
        """The inbox's length when last sampled: the POST handler answers 503 over :attr:`inbox_max`."""
        self.inbox_max = settings.inbox_max
        self.task: asyncio.Task[None] | None = None

    def health(self) -> tuple[bool, str]:
        """Whether the processor is alive, from its own state (no Redis round trip), and why not."""
        if self.task is not None and self.task.done():
            return False, "processor stopped"
        if time.monotonic() - self.alive > 30:
            return False, "processor stalled"
        return True, "ok"

    @property
    def orphan_grace(self) -> float:
        return self.matcher.hold_for

    @orphan_grace.setter
    def orphan_grace(self, seconds: float) -> None:
        self.matcher.hold_for = seconds

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.INBOX, keys.INBOX_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        """Process until ``stop`` is set; Redis errors are logged and waited out."""
        last_sweep = last_lease = 0.0
        group = False
        while not stop.is_set():
            self.alive = time.monotonic()
            try:
                if self.alive - last_lease > 60:
                    await self.redis.set(keys.TRACKING, "1", ex=TRACKING_LEASE)
                    last_lease = self.alive
                if not group:
                    await self.ensure_group()
                    group = True
                try:
                    await self.turn()
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    group = False  # the inbox went away (a Redis without persistence restarted): make it again
                    continue
                if self.alive - last_sweep > SWEEP_EVERY:
                    await self.sweep()
                    last_sweep = self.alive
            except RedisError as exc:
                logger.warning("webhook processor: Redis failed ({}); trying again in 1 s", type(exc).__name__)
                await asyncio.sleep(1.0)
            except Exception:
                logger.exception("webhook processor: unexpected error; going on in 1 s")
                await asyncio.sleep(1.0)

    async def turn(self, *, block_ms: int = 200) -> int:
        """One round: entries this consumer left unacknowledged, then others' stale ones, then new ones; then the
        reactions and the held statuses. Returns how many inbox entries it handled."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        group, name = keys.INBOX_GROUP, self.consumer
        for _stream, items in await self.redis.xreadgroup(group, name, {keys.INBOX: "0"}, count=100) or []:
            entries.extend(items)
        if not entries:
            claimed = await self.redis.xautoclaim(
                keys.INBOX, group, name, min_idle_time=int(self.claim_idle * 1000), count=100
            )
            entries.extend(claimed[1] if claimed else [])
        if not entries:
            # No wait while reactions or held statuses are due: they are tried every turn.
            busy = await self.redis.xlen(keys.REACTIONS) > 0
            read = await self.redis.xreadgroup(
                group, name, {keys.INBOX: ">"}, count=100, block=None if busy else block_ms
            )
            for _stream, items in read or []:
                entries.extend(items)
        for entry_id, fields in entries:
            if fields:  # an entry deleted while pending comes back empty
                try:
                    outcome = await self.process(fields[b"body"])
                except RedisError:
                    raise  # left pending: this consumer takes it again once Redis is back
                except Exception as exc:
                    # Never block the inbox on one entry: keep it with the malformed ones, for a person.
                    logger.exception("a stored webhook could not be processed; kept in {}", keys.MALFORMED)
                    await self.redis.xadd(
                        keys.MALFORMED,
                        {"body": fields[b"body"], "reason": f"processing failed: {type(exc).__name__}"},
                        maxlen=MALFORMED_MAX,
                        approximate=True,
                    )
                    outcome = "malformed"
                self.metrics.requests.labels(outcome).inc()
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(keys.INBOX, group, entry_id)
                pipe.xdel(keys.INBOX, entry_id)
                await pipe.execute()
        await self.reactor.turn()
        await self.matcher.retry_held()
        return len(entries)

    async def process(self, body: bytes) -> str:
        """Apply one stored webhook; ``duplicate`` when every status in it had been seen, else ``ok``."""
        try:
            parsed = parse_payload(body)
        except MalformedError:
            return "malformed"  # checked before it was stored; only a change of this code could get here
        bad = list(parsed.bad)
        statuses = duplicates = 0
        for change in parsed.changes:
            users: dict[str, str] = {c.wa_id: c.user_id for c in change.contacts if c.wa_id and c.user_id}
            for wa_id, uid in users.items():
                await self.redis.set(keys.bsuid(uid), wa_id, ex=BSUID_TTL)
            for message in change.messages:
                phone = message.from_ or await self.matcher.phone_of(message.from_user_id)
                if phone:
                    await self._open(keys.who(phone), int(message.timestamp) * 1000, ttl=WINDOW_TTL)
            for status, raw in change.statuses:
                statuses += 1
                user_id = status.recipient_user_id or users.get(status.recipient_id or "")
                try:
                    placed = await self.matcher.place(status, raw, user_id)
                except RedisError:
                    raise  # the entry stays pending and is processed again: applying twice changes nothing
                except Exception as exc:  # one status never spoils its neighbours
                    logger.error("a status could not be applied ({}); kept in {}", type(exc).__name__, keys.MALFORMED)
                    bad.append((f"applying it failed: {type(exc).__name__}", raw))
                    continue
                duplicates += placed.outcome == "duplicate"
        if bad:
            await self.set_aside(bad)
        return "duplicate" if statuses and duplicates == statuses else "ok"

    async def set_aside(self, bad: list[tuple[str, Any]]) -> None:
        """Items the receiver could not use, kept in the malformed stream with their reasons, and counted."""
        self.metrics.malformed_items.inc(len(bad))
        async with self.redis.pipeline(transaction=False) as pipe:
            for reason, item in bad[:100]:
                pipe.xadd(
                    keys.MALFORMED,
                    {"item": msgspec.json.encode(item), "reason": reason[:200], "at": int(time.time() * 1000)},
                    maxlen=MALFORMED_MAX,
                    approximate=True,
                )
            await pipe.execute()

    async def sweep(self) -> int:
        """Sends still without any status after ``STATUS_UNCONFIRMED_AFTER`` are marked ``unconfirmed`` (once per
        process; they stay in the awaiting set, so a later status still finds them); members older than the send
        log leave it. The set holds the sends still open to a first status (a few seconds' worth while webhooks
        flow) and the week's flows, which stay open to their messages' late statuses; it is walked in pages."""
        now = time.time() * 1000
        cutoff = now - self.settings.unconfirmed_after * 1000
        swept = 0
        start: bytes = b"-"
        present: set[bytes] = set()
        stale: list[bytes] = []
        drop: list[bytes] = []
        while page := await self.redis.zrangebylex(keys.AWAITING, start, b"+", start=0, num=500):
            for item in page:
                _who, at, _until, _delivery_id, _step = parse_member(item.decode())
                if at < now - SEND_LOG_TTL * 1000:  # its record is gone: nothing could be placed on it
                    drop.append(item)
                    continue
                present.add(item)
                if at < cutoff and item not in self._swept:
                    stale.append(item)
            start = b"(" + page[-1]
        if drop:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(keys.AWAITING, *drop)
                pipe.hdel(keys.AWAITING_PLACED, *{item.decode().split("|", 3)[3] for item in drop})
                await pipe.execute()
        self._swept &= present
        stamp = int(now)
        for item in stale:
            _who, _at, _until, delivery_id, step = parse_member(item.decode())
            event = msgspec.json.encode({"status": "unconfirmed", "at": iso(stamp), "received": iso(stamp)})
            applied = await self._apply(
                delivery_id, StatusUpdate(step=step, status="unconfirmed", at_ms=stamp, event=event), window_key=None
            )
            if applied.outcome == "gone":
                await self.redis.zrem(keys.AWAITING, item)
                continue
            if applied.outcome == "changed":
                self.metrics.deliveries.labels("unconfirmed").inc()
            self._swept.add(item)
            swept += 1
        return swept
