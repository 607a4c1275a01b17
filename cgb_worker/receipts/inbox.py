"""The processor: stored webhooks turned into timelines, one consumer of the inbox per receiver process.

The inbox (``cgb:webhooks:inbox``) is read through a consumer group, so several receivers share it. Each receiver
keeps a heartbeat key (``cgb:webhooks:consumer:<name>``, renewed every second, lasting :data:`HEARTBEAT_TTL`): only
the entries of a receiver whose heartbeat is gone are taken over (``claim_dead.lua``), so a receiver busy with a
long batch never has its entries processed twice, and a dead one's name leaves the group once it holds none. A
receiver restarted under the same ``WEBHOOK_CONSUMER`` takes up its own unfinished entries at once.

Entries are read in batches and processed together (:meth:`Processor.process_entries`): every body is parsed
(:mod:`.payload`; a body whose envelope is not a webhook is kept, redacted, in ``cgb:webhooks:malformed``), then
the batch's writes go out in the order one-by-one processing made them, as pipelines of at most :data:`SLICE`
commands: contacts teach the BSUID map, inbound messages open windows, statuses are placed (:mod:`.matching`,
one ``place.lua`` call each). Holds, set-aside items and the acknowledgements follow. An entry is acknowledged once
all of it is applied; a Redis error leaves the batch pending, to be done again (applying twice changes nothing).
Each turn also carries out reactions (:mod:`.reactions`), tries held statuses, and now and then marks sends with no
status at all ``unconfirmed``. A monitor beside the processing samples the backlog once a second, for the gauges
and :meth:`Processor.health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from arq.connections import ArqRedis
from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import keys
from ..connection import cause
from ..metrics import ReceiverMetrics
from ..privacy import mask_body, redact
from ..scripts import ApplyScript, ClaimDeadScript, OpenWindowScript, StatusUpdate, SuppressScript
from ..sends import TTL as SEND_LOG_TTL
from ..sends import parse_member
from ..settings import ReceiverSettings
from ..suppression import LIFTED_TTL, PERSON_REASONS, keyword_action
from ..tasks import cancel_and_wait
from ..window import WINDOW_TTL
from .guard import Noise
from .matching import BSUID_TTL, Matcher, Pending, masked, script_error, who_from
from .payload import UNDECODABLE, MalformedError, Parsed, parse_payload
from .reactions import Reactor
from .timeline import iso

SWEEP_EVERY = 30.0
MALFORMED_MAX = 1000
TRACKING_LEASE = 24 * 3600
"""How long sends stay tracked after the last receiver stopped renewing: a receiver that is down for a
deploy misses nothing (Meta redelivers for days), and one taken away for good stops the bookkeeping."""
BATCH = 100
"""Inbox entries read at once."""
BATCH_BYTES = 1024 * 1024
"""Bodies processed together at most (a bigger entry alone): bounds what a batch holds in memory."""
SLICE = 500
"""Commands in one pipeline: a body of thousands of statuses goes out in slices, so the event loop (the HTTP side,
the heartbeat) is never held long."""
HEARTBEAT_TTL = 15
MONITOR_EVERY = 1.0
BIG_BODY = 256 * 1024
"""Bytes over which a stored body is parsed in a thread."""
CLAIM_EVERY = 2.0
"""Seconds between looks for dead receivers' entries, when this one has none of its own."""
SET_ASIDE_MAX = 100
"""Items of one body kept in the malformed stream at most (all are counted)."""


@dataclass(slots=True)
class _Entry:
    entry_id: bytes | None
    body: bytes
    parsed: Parsed | None = None
    malformed: str = ""
    statuses: int = 0
    duplicates: int = 0
    bad: list[tuple[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class _Backlog:
    """What the monitor last sampled."""

    inbox: int = 0
    pending: int = 0
    oldest_seconds: float = 0.0
    held: int = 0
    awaiting: int = 0
    malformed: int = 0
    unmatched: int = 0


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
        self.reactor = Reactor(redis, metrics, self.consumer, settings.reactions)
        self._open = OpenWindowScript(redis)
        self._suppress = SuppressScript(redis, lifted_ttl=LIFTED_TTL)
        self._apply = ApplyScript(redis, stream_max=settings.stream_max, window_ttl=WINDOW_TTL)
        self._claim_dead = ClaimDeadScript(redis)
        self.alive = 0.0
        """time.monotonic() of the processor's last turn."""
        self.heartbeat_ttl = HEARTBEAT_TTL
        self.backlog = _Backlog()
        self._sampled = 0.0
        """time.monotonic() of the monitor's last successful round."""
        self._task: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._looked = -CLAIM_EVERY
        self._swept: set[bytes] = set()
        self._where = str(settings.redis)  # the redacted URL, or the sentinels
        self._redis_failures = Noise(
            lambda _kind: None,
            f"webhook processor: Redis at {self._where} failed ({{}}) since the last such line; "
            "trying again each second",
        )
        self._down_since: float | None = None
        """time.monotonic() of the first Redis failure of an outage, to say when it ends."""
        self.processing = True
        """False in a receiver that only answers (``WEBHOOK_ROLE=answer``): it samples, for its health and the
        inbox cap, but takes no entries."""

    @property
    def orphan_grace(self) -> float:
        return self.matcher.hold_for

    @orphan_grace.setter
    def orphan_grace(self, seconds: float) -> None:
        self.matcher.hold_for = seconds

    @property
    def inbox_length(self) -> int:
        """Stored webhooks not yet processed, as last sampled (the POST handler's cap reads it: no round trip)."""
        return self.backlog.inbox

    def health(self) -> tuple[bool, str]:
        """Whether this receiver is doing its work, from what the processor and its monitor last saw; no Redis
        round trip, so a frozen Redis is reported (within ``WEBHOOK_REDIS_TIMEOUT``: the monitor samples every second)
        rather than
        waited on. A long batch is healthy: the monitor runs beside it."""
        if self._task is None:
            return False, "the processor has not started"
        if self._task.done() or self._monitor is None or self._monitor.done():
            return False, "the processor has stopped"
        quiet = time.monotonic() - self._sampled
        if quiet > self.settings.redis_timeout:
            return False, f"no answer from Redis for {quiet:.1f} s"
        if self.processing and self.backlog.oldest_seconds > self.settings.max_lag:
            return False, f"the oldest stored webhook has waited {self.backlog.oldest_seconds:.0f} s"
        return True, "ok"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.INBOX, keys.INBOX_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event, *, process: bool = True) -> None:
        """Process until ``stop`` is set; Redis errors are logged and waited out. The monitor (and with it the
        heartbeat) runs beside it; on the way out this receiver leaves the group when it holds nothing. Without
        ``process`` only the monitor runs (a receiver that only answers: its health is Redis's, not the
        backlog's, which processors elsewhere answer for)."""
        self._task = asyncio.current_task()
        self._sampled = time.monotonic()
        self.processing = process
        self._monitor = asyncio.create_task(self.monitor(stop))
        try:
            if process:
                await self._loop(stop)
            else:
                await stop.wait()
        finally:
            await cancel_and_wait(self._monitor)
            if process:
                await self.leave()

    async def _loop(self, stop: asyncio.Event) -> None:
        last_sweep = last_lease = 0.0
        group = False
        while not stop.is_set():
            self.alive = time.monotonic()
            try:
                if self.alive - last_lease > 60:
                    await self.redis.set(keys.TRACKING, "1", ex=TRACKING_LEASE)
                    last_lease = self.alive
                if not group:
                    await self.beat()
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
                if self._down_since is not None:
                    self._redis_failures.flush()
                    logger.info(
                        "webhook processor: Redis is back at {} after {:.1f} s",
                        self._where, time.monotonic() - self._down_since,
                    )  # fmt: skip
                    self._down_since = None
            except RedisError as exc:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                lost = isinstance(exc, RedisConnectionError | RedisTimeoutError)
                self._redis_failures(cause(exc, self._where) if lost else type(exc).__name__)
                await asyncio.sleep(1.0)
            except Exception:
                logger.exception("webhook processor: unexpected error; going on in 1 s")
                await asyncio.sleep(1.0)

    async def beat(self) -> None:
        await self.redis.set(keys.consumer(self.consumer), "1", ex=self.heartbeat_ttl)

    async def leave(self) -> None:
        """A clean stop: the heartbeat goes, and the consumer too unless it still holds entries (another receiver
        then takes them at once)."""
        try:
            await self.redis.delete(keys.consumer(self.consumer))
            await self._claim_dead(self.consumer, self.consumer, count=1)
        except RedisError as exc:
            logger.warning("webhook processor: could not leave the group cleanly ({})", type(exc).__name__)

    # -- the monitor -------------------------------------------------------------------------------------------

    async def monitor(self, stop: asyncio.Event) -> None:
        """Once a second: renew the heartbeat and sample the backlog, in one round trip."""
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.settings.redis_timeout + 5):  # not wait_for: see .tasks
                    await self.sample()
            except (RedisError, TimeoutError) as exc:
                logger.debug("webhook monitor: Redis failed ({})", type(exc).__name__)
            except Exception:
                logger.exception("webhook monitor: unexpected error")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MONITOR_EVERY):
                    await stop.wait()

    async def sample(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            if self.processing:
                pipe.set(keys.consumer(self.consumer), "1", ex=self.heartbeat_ttl)
            else:
                pipe.ping()
            pipe.xlen(keys.INBOX)
            pipe.xpending(keys.INBOX, keys.INBOX_GROUP)
            pipe.xrange(keys.INBOX, count=1)
            pipe.zcard(keys.ORPHANS)
            pipe.zcard(keys.AWAITING)
            pipe.xlen(keys.MALFORMED)
            pipe.xlen(keys.UNMATCHED)
            answers = await pipe.execute(raise_on_error=False)
        for answer in answers:
            if isinstance(answer, Exception) and "NOGROUP" not in str(answer):
                raise answer
        _beat, inbox, pending, first, held, awaiting, malformed, unmatched = answers
        oldest = 0.0
        if first and not isinstance(first, Exception):
            oldest = max(0.0, time.time() - int(first[0][0].split(b"-")[0]) / 1000)
        b = self.backlog
        b.inbox, b.held, b.awaiting, b.malformed, b.unmatched = inbox, held, awaiting, malformed, unmatched
        b.pending = 0 if isinstance(pending, Exception) else int(pending["pending"])
        b.oldest_seconds = oldest
        self._sampled = time.monotonic()
        m = self.metrics
        m.inbox_length.set(b.inbox)
        m.inbox_pending.set(b.pending)
        m.inbox_oldest.set(oldest)
        m.held_sampled.set(b.held)
        m.awaiting.set(b.awaiting)
        m.malformed_kept.set(b.malformed)
        m.unmatched_kept.set(b.unmatched)

    # -- the inbox ---------------------------------------------------------------------------------------------

    async def turn(self, *, block_ms: int = 200) -> int:
        """One round: entries this consumer left unacknowledged, then dead receivers' ones, then new ones; then
        the reactions and the held statuses. Returns how many inbox entries it handled."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        group, name = keys.INBOX_GROUP, self.consumer
        for _stream, items in await self.redis.xreadgroup(group, name, {keys.INBOX: "0"}, count=BATCH) or []:
            entries.extend(items)
        if not entries:
            entries = await self.claim()
        if not entries:
            # No wait while reactions or held statuses are due: they are tried every turn.
            busy = await self.redis.xlen(keys.REACTIONS) > 0
            read = await self.redis.xreadgroup(
                group, name, {keys.INBOX: ">"}, count=BATCH, block=None if busy else block_ms
            )
            for _stream, items in read or []:
                entries.extend(items)
        work: list[tuple[bytes | None, bytes]] = []
        gone: list[bytes] = []
        for entry_id, fields in entries:
            if fields:  # an entry deleted while pending comes back empty
                work.append((entry_id, fields[b"body"]))
            else:
                gone.append(entry_id)
        await self.process_entries(work)
        if gone:
            await self._ack(gone)
        await self.reactor.turn()
        await self.matcher.retry_held()
        return len(entries)

    async def claim(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries of receivers whose heartbeat is gone (at most every :data:`CLAIM_EVERY` s); a dead receiver
        that holds none is removed from the group."""
        now = time.monotonic()
        if now - self._looked < CLAIM_EVERY:
            return []
        self._looked = now
        for c in await self.redis.xinfo_consumers(keys.INBOX, keys.INBOX_GROUP):
            name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
            if name == self.consumer or not (c["pending"] or c["idle"] > self.heartbeat_ttl * 1000):
                continue
            taken = await self._claim_dead(name, self.consumer, count=BATCH)
            if taken:
                logger.info("took over {} stored webhooks of a receiver that stopped", len(taken))
                return taken
        return []

    async def _ack(self, ids: list[bytes]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(keys.INBOX, keys.INBOX_GROUP, *ids)
            pipe.xdel(keys.INBOX, *ids)
            await pipe.execute()

    async def process(self, body: bytes) -> str:
        """Apply one stored webhook: ``duplicate`` when every status in it had been seen, ``malformed`` when it is
        no webhook at all (kept), else ``ok``."""
        return (await self.process_entries([(None, body)]))[0]

    def read(self, body: bytes) -> Parsed:
        """One body, parsed (:func:`parse_payload`; raises :class:`MalformedError`)."""
        return parse_payload(body)

    async def process_entries(self, entries: list[tuple[bytes | None, bytes]]) -> list[str]:
        """Process entries in groups of at most :data:`BATCH_BYTES`, acknowledge those with ids; the outcome of
        each. A bug met in a group is retried entry by entry, and the entry that meets it alone is kept in the
        malformed stream, so it never blocks the inbox; a Redis error leaves the rest pending."""
        outcomes: list[str] = []
        start = 0
        while start < len(entries):
            end, size = start, 0
            while end < len(entries) and (end == start or size + len(entries[end][1]) <= BATCH_BYTES):
                size += len(entries[end][1])
                end += 1
            outcomes.extend(await self._group(entries[start:end]))
            start = end
        return outcomes

    async def _group(self, group: list[tuple[bytes | None, bytes]]) -> list[str]:
        try:
            outcomes = await self._batch([_Entry(entry_id, body) for entry_id, body in group])
        except RedisError:
            raise  # left pending: this consumer takes it again once Redis is back
        except Exception as exc:
            if len(group) > 1:
                return [o for one in group for o in await self._group([one])]
            logger.exception("a stored webhook could not be processed; kept in {}", keys.MALFORMED)
            entry = _Entry(group[0][0], group[0][1], malformed=f"processing failed: {type(exc).__name__}")
            outcomes = await self._finish([entry])
        return outcomes

    async def _batch(self, entries: list[_Entry]) -> list[str]:
        for e in entries:
            try:
                # a big body is parsed in a thread: its items' Python work would otherwise hold the event loop
                # (and the answers to Meta's posts) for as long as it takes
                e.parsed = await asyncio.to_thread(self.read, e.body) if len(e.body) > BIG_BODY else self.read(e.body)
            except MalformedError as exc:
                e.malformed = str(exc)
            except RecursionError:
                e.malformed = "not a webhook payload: nested too deep"
        ops = await self._plan(entries)
        holds: list[Pending] = []
        for begin in range(0, len(ops), SLICE):
            chunk = ops[begin : begin + SLICE]
            queued: list[tuple[Any, ...]] = []
            async with self.redis.pipeline(transaction=False) as pipe:
                for op in chunk:
                    if op[0] == "bsuid":
                        pipe.set(keys.bsuid(op[1]), op[2], ex=BSUID_TTL)
                    elif op[0] == "open":
                        self._open.queue(pipe, op[1], op[2], ttl=WINDOW_TTL)
                    elif op[0] == "reachable":
                        pipe.delete(keys.undeliverable(op[1]))
                    elif op[0] == "opt-out":
                        self._suppress.queue_add(pipe, op[1], "all", "keyword", op[2], ref=op[3])
                    elif op[0] == "opt-in":
                        self._suppress.queue_lift(pipe, op[1], op[2], reasons=",".join(PERSON_REASONS), ref=op[3])
                    else:
                        try:
                            self.matcher.queue(pipe, op[1])
                        except Exception as exc:  # one status never spoils its neighbours
                            self._unusable(op[2], op[1], exc)
                            continue
                    queued.append(op)
                answers = await pipe.execute(raise_on_error=False)
            for op, answer in zip(queued, answers, strict=True):
                if op[0] != "place":
                    if isinstance(answer, Exception):
                        raise answer
                    if op[0] in ("opt-out", "opt-in") and answer:
                        # the person's hash, shortened: never the number, never what they wrote
                        logger.info("an {} keyword {} person {}", op[0], _DID[op[0]], op[1][:8])
                    continue
                p, e = op[1], op[2]
                if isinstance(answer, Exception) and not script_error(answer):
                    raise answer  # the entry stays pending and is processed again: applying twice changes nothing
                try:
                    if isinstance(answer, Exception):
                        raise answer
                    placed = self.matcher.placed(p, answer)
                except Exception as exc:
                    self._unusable(e, p, exc)
                    continue
                if placed.outcome in ("none", "ambiguous"):
                    holds.append(p)
                e.duplicates += placed.outcome == "duplicate"
        return await self._finish(entries, holds)

    @staticmethod
    def _unusable(e: _Entry, p: Pending, exc: Exception) -> None:
        logger.error("a status could not be applied ({}); kept in {}", type(exc).__name__, keys.MALFORMED)
        e.bad.append((f"applying it failed: {type(exc).__name__}", p.raw))

    async def _plan(self, entries: list[_Entry]) -> list[tuple[Any, ...]]:
        """The batch's writes in the order one-by-one processing made them. A BSUID is resolved from what the batch
        itself taught before that point, else from Redis (read at once for the whole batch, beforehand)."""
        wanted: set[str] = set()
        for e in entries:
            for change in e.parsed.changes if e.parsed else ():
                users = {c.wa_id: c.user_id for c in change.contacts if c.wa_id and c.user_id}
                wanted.update(m.from_user_id for m in change.messages if not m.from_ and m.from_user_id)
                for status, _raw in change.statuses:
                    uid = status.recipient_user_id or users.get(status.recipient_id or "")
                    if not status.recipient_id and uid:
                        wanted.add(uid)
        known: dict[str, str | None] = {}
        if wanted:
            names = sorted(wanted)
            stored = await self.redis.mget([keys.bsuid(u) for u in names])
            known = {u: who_from(v) for u, v in zip(names, stored, strict=True)}
        ops: list[tuple[Any, ...]] = []
        for e in entries:
            if e.parsed is None:
                continue
            e.bad.extend(e.parsed.bad)
            for change in e.parsed.changes:
                users = {c.wa_id: c.user_id for c in change.contacts if c.wa_id and c.user_id}
                for wa_id, uid in users.items():
                    who = keys.who(wa_id)
                    known[uid] = who
                    ops.append(("bsuid", uid, who))
                for message in change.messages:
                    who_in = keys.who(message.from_) if message.from_ else known.get(message.from_user_id or "")
                    if who_in:
                        at_ms = int(message.timestamp) * 1000
                        ops.append(("open", who_in, at_ms))
                        ops.append(("reachable", who_in))  # a person who writes can receive: 131026's mark goes
                        body = message.body
                        action = body is not None and keyword_action(
                            body, opt_out=self.settings.opt_out_keywords, opt_in=self.settings.opt_in_keywords
                        )
                        if action:
                            ref = keys.wamid(message.id)[len(keys.WAMID_PREFIX) :][:16]  # keyed: ids carry phones
                            ops.append(("opt-out" if action == "out" else "opt-in", who_in, at_ms, ref))
                for status, raw in change.statuses:
                    e.statuses += 1
                    uid = status.recipient_user_id or users.get(status.recipient_id or "")
                    to = keys.who(status.recipient_id) if status.recipient_id else known.get(uid or "")
                    ops.append(("place", Pending(status, masked(raw), uid, to), e))
        return ops

    async def _finish(self, entries: list[_Entry], holds: list[Pending] = ()) -> list[str]:  # type: ignore[assignment]
        """Holds and what is set aside, then (once those are stored) the acknowledgements."""
        now = int(time.time() * 1000)
        outcomes: list[str] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in holds:
                self.matcher.queue_hold(pipe, p)
            kept = 0
            for e in entries:
                if e.malformed:
                    logger.warning("a signed webhook was malformed ({}); kept in {}", e.malformed, keys.MALFORMED)
                    pipe.xadd(
                        keys.MALFORMED, {"body": _kept(e.body), "reason": e.malformed[:200], "at": now},
                        maxlen=MALFORMED_MAX, approximate=True,
                    )  # fmt: skip
                    kept += 1
                    outcomes.append("malformed")
                    continue
                if e.bad:
                    self.metrics.malformed_items.inc(len(e.bad))
                    for reason, item in e.bad[:SET_ASIDE_MAX]:
                        pipe.xadd(
                            keys.MALFORMED, {"item": _kept_item(item), "reason": reason[:200], "at": now},
                            maxlen=MALFORMED_MAX, approximate=True,
                        )  # fmt: skip
                        kept += 1
                outcomes.append("duplicate" if e.statuses and e.duplicates == e.statuses else "ok")
            if kept:
                # exact: an approximate MINID trims whole nodes only, which a small stream never fills
                pipe.xtrim(keys.MALFORMED, minid=self.matcher.min_id(), approximate=False)
            answers = await pipe.execute(raise_on_error=False)
        for answer in answers[: len(holds)]:
            self.matcher.held(answer)
        for answer in answers[len(holds) :]:
            if isinstance(answer, Exception):
                raise answer
        ids = [e.entry_id for e in entries if e.entry_id is not None]
        if ids:
            await self._ack(ids)
            for outcome in outcomes:
                self.metrics.request(outcome)
        return outcomes

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


_DID = {"opt-out": "suppressed", "opt-in": "lifted the opt-outs of"}


def _kept(body: bytes) -> bytes:
    """A body kept in the malformed stream: its JSON redacted, or its first bytes masked when it is not JSON."""
    try:
        return msgspec.json.encode(redact(msgspec.json.decode(body)))
    except UNDECODABLE:
        return mask_body(body).encode()


def _kept_item(item: Any) -> bytes:
    if isinstance(item, bytes):
        return msgspec.json.encode(mask_body(item))
    return msgspec.json.encode(redact(item))
