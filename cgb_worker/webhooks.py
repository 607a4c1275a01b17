"""``cgb-worker webhooks``: the receiver of WhatsApp's status webhooks, and what turns them into timelines.

Routes (an ``aiohttp.web`` app, :func:`create_app`):

* ``GET /webhooks/whatsapp``: Meta's subscription handshake; ``hub.challenge`` back with a 200 when
  ``hub.mode=subscribe`` and ``hub.verify_token`` is ``WABA_VERIFY_TOKEN``, else 403.
* ``POST /webhooks/whatsapp``: ``X-Hub-Signature-256`` must be ``sha256=`` and the HMAC-SHA256 of the raw body
  under ``WABA_APP_SECRET`` (compared in constant time), else 401 and nothing is stored; a body over 1 MiB is
  a 413. A signed payload is checked for shape (:func:`parse_payload`): a bad one is kept in
  ``cgb:webhooks:malformed`` (the last 1,000) and answered 200, since Meta would redeliver it for days and it
  would never get better. A good one is appended to the stream ``cgb:webhooks:inbox`` before the 200, so a
  receiver that dies after answering loses nothing; Redis down is a 503, which Meta retries.
* ``GET /healthz`` (Redis reachable and the processor alive) and ``GET /metrics`` (Prometheus).

The processor (:class:`Processor`) reads the inbox through a consumer group, so several receivers share it
and an entry a dead receiver had taken is claimed by another after :data:`CLAIM_IDLE` seconds. Each status is
matched and applied by two Redis scripts (:mod:`cgb_worker.deliveries`), so receivers never race on a
message; a redelivered status (same wamid and status) changes nothing. A status that finds no send yet (its
webhook overtook CGB's answer to the worker) is tried again for :data:`ORPHAN_GRACE` seconds, then kept in
``cgb:webhooks:unmatched`` and counted. Inbound messages open the contact's 24-hour window. A text that
WhatsApp failed with 131047 and whose job carried a ``whatsappTemplate`` is followed by that template, as a
``whatsapp_send`` job with the id ``<job id>:fallback`` (so it is enqueued once, whoever sees the failure).

No log line carries a phone number, a wamid (it encodes the phone), a message text or a secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import time
from typing import Any, Literal

import msgspec
from aiohttp import web
from arq.connections import ArqRedis
from loguru import logger
from redis.exceptions import RedisError, ResponseError

from .deliveries import (
    ACCEPTED,
    APPLY,
    BSUID_TTL,
    CLOCK_SKEW,
    MATCH,
    OPEN_WINDOW,
    SINCE,
    STREAM,
    TRACKING,
    TRACKING_LEASE,
    WAMID_TTL,
    WINDOW_TTL,
    bsuid_key,
    iso,
    parse_member,
    recipient,
    wamid_key,
    window_key,
)
from .metrics import ReceiverMetrics
from .sends import key as sends_key
from .settings import ReceiverSettings, redact_url

PATH = "/webhooks/whatsapp"
MAX_BODY = 1024 * 1024
MAX_ITEMS = 1000
"""Statuses, messages and changes in one POST; Meta batches at most a few hundred."""
INBOX = "cgb:webhooks:inbox"
GROUP = "receivers"
MALFORMED = "cgb:webhooks:malformed"
MALFORMED_MAX = 1000
ORPHANS = "cgb:webhooks:orphans"
UNMATCHED = "cgb:webhooks:unmatched"
UNMATCHED_MAX = 10000
CLAIM_IDLE = 30.0
ORPHAN_GRACE = 60.0
SWEEP_EVERY = 10.0
FALLBACK_CODE = 131047

# -- Meta's payload, as far as the receiver relies on it ------------------------------------------------------


class MetaErrorData(msgspec.Struct):
    details: str = ""


class MetaError(msgspec.Struct):
    code: int
    title: str = ""
    message: str = ""
    error_data: MetaErrorData | None = None


class MetaStatus(msgspec.Struct):
    id: str
    status: Literal["sent", "delivered", "read", "failed", "played"]
    timestamp: str
    recipient_id: str | None = None
    recipient_user_id: str | None = None
    errors: list[MetaError] = msgspec.field(default_factory=list)


class MetaContact(msgspec.Struct):
    wa_id: str | None = None
    user_id: str | None = None


class MetaMessage(msgspec.Struct):
    id: str
    timestamp: str
    from_: str | None = msgspec.field(default=None, name="from")
    from_user_id: str | None = None


class MetaValue(msgspec.Struct):
    statuses: list[MetaStatus] = msgspec.field(default_factory=list)
    messages: list[MetaMessage] = msgspec.field(default_factory=list)
    contacts: list[MetaContact] = msgspec.field(default_factory=list)


class MetaChange(msgspec.Struct):
    field: str
    value: msgspec.Raw


class MetaEntry(msgspec.Struct):
    changes: list[MetaChange]
    id: str = ""


class MetaPayload(msgspec.Struct):
    object: str
    entry: list[MetaEntry]


class MalformedError(ValueError):
    """A signed payload the receiver cannot use; the reason says why (never its content)."""


_payload = msgspec.json.Decoder(MetaPayload)


def parse_payload(body: bytes) -> list[tuple[MetaValue, dict[str, Any]]]:
    """The ``messages`` changes of a webhook body, checked, each with its value as plain data (what Meta sent,
    kept in the timeline): :class:`MalformedError` for wrong types, unknown status values, missing parts,
    timestamps that are not Unix seconds, or more than :data:`MAX_ITEMS` items. Changes to other fields
    (template reviews, account updates) are valid and skipped."""
    try:
        payload = _payload.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedError(f"not a webhook payload: {exc}") from None
    if payload.object != "whatsapp_business_account":
        raise MalformedError("object is not whatsapp_business_account")
    values: list[tuple[MetaValue, dict[str, Any]]] = []
    items = 0
    for entry in payload.entry:
        items += len(entry.changes)
        if items > MAX_ITEMS:
            raise MalformedError(f"more than {MAX_ITEMS} items")
        for change in entry.changes:
            if change.field != "messages":
                continue
            try:
                raw = msgspec.json.decode(change.value)
                value = msgspec.convert(raw, MetaValue)
            except msgspec.DecodeError as exc:  # ValidationError included
                raise MalformedError(f"a messages change: {exc}") from None
            items += len(value.statuses) + len(value.messages)
            if items > MAX_ITEMS:
                raise MalformedError(f"more than {MAX_ITEMS} items")
            for status in value.statuses:
                if not status.id or not status.timestamp.isdigit():
                    raise MalformedError("a status without a wamid or a Unix timestamp")
                if not (status.recipient_id or status.recipient_user_id):
                    raise MalformedError("a status without a recipient")
            for message in value.messages:
                if not message.timestamp.isdigit() or not (message.from_ or message.from_user_id):
                    raise MalformedError("an inbound message without a sender or a Unix timestamp")
            values.append((value, raw))
    return values


def signature(secret: str, body: bytes) -> str:
    """``X-Hub-Signature-256`` for ``body``: what Meta sends, and what the simulator signs with."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(signature(secret, body), header.strip())


# -- the processor -------------------------------------------------------------------------------------------


class Processor:
    """Turns stored webhooks into timelines; one per receiver process (see the module doc)."""

    def __init__(
        self, redis: ArqRedis, settings: ReceiverSettings, metrics: ReceiverMetrics, *, consumer: str | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._match = redis.register_script(MATCH)
        self._apply = redis.register_script(APPLY)
        self._open = redis.register_script(OPEN_WINDOW)
        self.alive = 0.0
        """time.monotonic() of the processor's last turn, for ``/healthz``."""
        self.claim_idle = CLAIM_IDLE
        self.orphan_grace = ORPHAN_GRACE

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(INBOX, GROUP, id="0", mkstream=True)
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
                    await self.redis.set(TRACKING, "1", ex=TRACKING_LEASE)
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
        """One round: entries this consumer left unacknowledged, then others' stale ones, then new ones; then
        the orphans. Returns how many inbox entries it handled."""
        handled = 0
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        for _stream, items in await self.redis.xreadgroup(GROUP, self.consumer, {INBOX: "0"}, count=100) or []:
            entries.extend(items)
        if not entries:
            claimed = await self.redis.xautoclaim(
                INBOX, GROUP, self.consumer, min_idle_time=int(self.claim_idle * 1000), count=100
            )
            entries.extend(claimed[1] if claimed else [])
        if not entries:
            read = await self.redis.xreadgroup(GROUP, self.consumer, {INBOX: ">"}, count=100, block=block_ms)
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
                    logger.exception("a stored webhook could not be processed; kept in {}", MALFORMED)
                    await self.redis.xadd(
                        MALFORMED,
                        {"body": fields[b"body"], "reason": f"processing failed: {type(exc).__name__}"},
                        maxlen=MALFORMED_MAX,
                        approximate=True,
                    )
                    outcome = "malformed"
                self.metrics.requests.labels(outcome).inc()
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(INBOX, GROUP, entry_id)
                pipe.xdel(INBOX, entry_id)
                await pipe.execute()
            handled += 1
        await self.retry_orphans()
        return handled

    async def process(self, body: bytes) -> str:
        """Apply one stored webhook; ``duplicate`` when every status in it had been seen, else ``ok``."""
        try:
            values = parse_payload(body)
        except MalformedError:
            return "malformed"  # checked before it was stored; only a change of this code could get here
        statuses = 0
        duplicates = 0
        for value, raw_value in values:
            users: dict[str, str] = {c.wa_id: c.user_id for c in value.contacts if c.wa_id and c.user_id}
            for wa_id, uid in users.items():
                await self.redis.set(bsuid_key(uid), wa_id, ex=BSUID_TTL)
            for message in value.messages:
                phone = message.from_ or await self._phone_of(message.from_user_id)
                if phone:
                    await self._open(keys=[window_key(phone)], args=[int(message.timestamp) * 1000, WINDOW_TTL])
            for status, raw_status in zip(value.statuses, raw_value.get("statuses") or [], strict=False):
                statuses += 1
                user_id = status.recipient_user_id or users.get(status.recipient_id or "")
                outcome = await self.status(status, raw_status, user_id)
                duplicates += outcome == "duplicate"
        return "duplicate" if statuses and duplicates == statuses else "ok"

    async def _phone_of(self, user_id: str | None) -> str | None:
        if not user_id:
            return None
        phone = await self.redis.get(bsuid_key(user_id))
        return phone.decode() if phone else None

    async def status(
        self, status: MetaStatus, raw: dict[str, Any], user_id: str | None, *, orphan: bool = False
    ) -> str:
        """Match one status to its send and apply it: ``changed``, ``kept``, ``duplicate``, ``orphan`` or
        ``gone`` (the send's record has expired)."""
        at = int(status.timestamp) * 1000
        phone = status.recipient_id or await self._phone_of(user_id)
        if phone:
            who = recipient(phone)
            low = max(0, at - int(self.settings.match_window * 1000))
            bounds = [f"[{who}|{low:013d}", f"({who}|{at + int(CLOCK_SKEW * 1000) + 1:013d}"]
        else:
            bounds = ["", ""]
        found = await self._match(keys=[wamid_key(status.id), ACCEPTED], args=[*bounds, WAMID_TTL])
        if not found:
            if not orphan:
                await self.redis.zadd(ORPHANS, {msgspec.json.encode([raw, user_id]): time.time()}, nx=True)
            return "orphan"
        ref, matched_by = (v.decode() for v in found)
        delivery_id, _, step = ref.rpartition("|")
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
        result = await self._apply(
            keys=[sends_key(delivery_id), STREAM, window_key(phone) if phone else "", ACCEPTED],
            args=[
                step,
                status.status,
                at,
                event,
                status.id,
                matched_by,
                error.code if error else "",
                error.title if error else "",
                error.error_data.details if error and error.error_data else (error.message if error else ""),
                self.settings.stream_max,
                delivery_id,
                status.recipient_id or "",
                user_id or "",
                "",
            ],
        )
        outcome = str(result[0].decode())
        if outcome == "changed":
            self.metrics.deliveries.labels(status.status).inc()
            if status.status == "delivered":
                self.metrics.delivery_seconds.observe(max(0.0, (at - float(result[2])) / 1000))
            if int(result[3]) == 1:
                await self.fallback(delivery_id, step)
        elif outcome == "gone":
            self.metrics.unmatched.inc()
        return outcome

    async def fallback(self, delivery_id: str, step: str) -> None:
        """The job's text failed with 131047: send its ``whatsappTemplate``, once (arq refuses a second job
        with the same id while the first or its result lives)."""
        fields = await self.redis.hget(sends_key(delivery_id), f"f:{step}")  # type: ignore[misc]
        if not fields:
            return
        job = await self.redis.enqueue_job(
            "whatsapp_send", msgspec.json.decode(fields), fallback_of=delivery_id, _job_id=f"{delivery_id}:fallback"
        )
        logger.bind(job_id=delivery_id).info(
            "the text failed outside the 24-hour window (131047): {}",
            "sending the job's whatsappTemplate instead" if job is not None else "its template is already queued",
        )

    async def retry_orphans(self) -> None:
        now = time.time()
        for item, first_seen in await self.redis.zrange(ORPHANS, 0, 99, withscores=True):
            raw, user_id = msgspec.json.decode(item)
            status = msgspec.convert(raw, MetaStatus)
            if now - first_seen > self.orphan_grace:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zrem(ORPHANS, item)
                    pipe.xadd(UNMATCHED, {"status": item}, maxlen=UNMATCHED_MAX, approximate=True)
                    await pipe.execute()
                self.metrics.unmatched.inc()
                continue
            if await self.status(status, raw, user_id, orphan=True) != "orphan":
                await self.redis.zrem(ORPHANS, item)

    async def sweep(self) -> int:
        """Sends still without a status after ``STATUS_UNCONFIRMED_AFTER`` become ``unconfirmed``. The set is
        ordered by recipient, not time, so this walks it in pages: it holds only the sends still waiting for
        their first status, a few seconds' worth while webhooks flow."""
        cutoff = (time.time() - self.settings.unconfirmed_after) * 1000
        now = int(time.time() * 1000)
        swept = 0
        start: bytes = b"-"
        stale: list[bytes] = []
        while page := await self.redis.zrangebylex(ACCEPTED, start, b"+", start=0, num=500):
            stale.extend(m for m in page if parse_member(m.decode())[1] < cutoff)
            start = b"(" + page[-1]
        for item in stale:
            _who, _at, delivery_id, step = parse_member(item.decode())
            event = msgspec.json.encode({"status": "unconfirmed", "at": iso(now), "received": iso(now)})
            result = await self._apply(
                keys=[sends_key(delivery_id), STREAM, "", ACCEPTED],
                args=[
                    step,
                    "unconfirmed",
                    now,
                    event,
                    "",
                    "",
                    "",
                    "",
                    "",
                    self.settings.stream_max,
                    delivery_id,
                    "",
                    "",
                    item,
                ],
            )
            if result[0] == b"gone":
                await self.redis.zrem(ACCEPTED, item)
            elif result[0] == b"changed":
                self.metrics.deliveries.labels("unconfirmed").inc()
            swept += 1
        return swept


# -- the HTTP side -------------------------------------------------------------------------------------------

REDIS: web.AppKey[ArqRedis] = web.AppKey("redis", ArqRedis)
SETTINGS: web.AppKey[ReceiverSettings] = web.AppKey("settings", ReceiverSettings)
METRICS: web.AppKey[ReceiverMetrics] = web.AppKey("metrics", ReceiverMetrics)
PROCESSOR: web.AppKey[Processor] = web.AppKey("processor", Processor)


async def handshake(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    query = request.query
    token = query.get("hub.verify_token", "")
    expected = settings.verify_token.get_secret_value() if settings.verify_token else None
    if query.get("hub.mode") == "subscribe" and expected and hmac.compare_digest(token.encode(), expected.encode()):
        return web.Response(text=query.get("hub.challenge", ""))
    return web.Response(status=403, text="forbidden")


async def receive(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.requests.labels("too_large").inc()
        raise
    if not signature_ok(app[SETTINGS].app_secret.get_secret_value(), body, request.headers.get("X-Hub-Signature-256")):
        metrics.requests.labels("bad_signature").inc()
        return web.Response(status=401, text="bad signature")
    redis = app[REDIS]
    now = int(time.time() * 1000)
    try:
        parse_payload(body)
    except MalformedError as exc:
        metrics.requests.labels("malformed").inc()
        logger.warning("a signed webhook was malformed ({}); kept in {}", exc, MALFORMED)
        try:
            await redis.xadd(
                MALFORMED, {"body": body, "reason": str(exc), "at": now}, maxlen=MALFORMED_MAX, approximate=True
            )
        except RedisError:
            return web.Response(status=503, text="store unavailable")
        return web.Response(text="ok")
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xadd(INBOX, {"body": body, "at": now})
            pipe.set(SINCE, now, nx=True)
            await pipe.execute()
    except RedisError as exc:
        metrics.requests.labels("store_failed").inc()
        logger.error("could not store a webhook ({}): answered 503, Meta will redeliver", type(exc).__name__)
        return web.Response(status=503, text="store unavailable")
    return web.Response(text="ok")


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    try:
        await app[REDIS].ping()
    except RedisError:
        return web.json_response({"status": "redis unavailable"}, status=503)
    processor = app.get(PROCESSOR)
    if processor is not None and time.monotonic() - processor.alive > 30:
        return web.json_response({"status": "processor stalled"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics_view(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain")


def create_app(
    redis: ArqRedis, settings: ReceiverSettings, *, metrics: ReceiverMetrics | None = None, process: bool = True
) -> web.Application:
    """The receiver as an aiohttp app on ``redis`` (an arq pool: the 131047 fallback enqueues a job). With
    ``process`` (the default) the app runs its :class:`Processor` while it serves."""
    app = web.Application(client_max_size=MAX_BODY)
    app[REDIS] = redis
    app[SETTINGS] = settings
    app[METRICS] = metrics or ReceiverMetrics()
    app.router.add_get(PATH, handshake)
    app.router.add_post(PATH, receive)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    if process:
        app.cleanup_ctx.append(_run_processor)
    return app


async def _run_processor(app: web.Application) -> Any:
    processor = Processor(app[REDIS], app[SETTINGS], app[METRICS])
    app[PROCESSOR] = processor
    processor.alive = time.monotonic()
    stop = asyncio.Event()
    task = asyncio.create_task(processor.run(stop))
    yield
    stop.set()
    await task


def serve(settings: ReceiverSettings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the receiver until SIGTERM or SIGINT (aiohttp's ``run_app``, which stops the processor and closes
    Redis on the way out)."""
    from .worker import create_pool

    host, port = host or settings.host, port or settings.port

    async def make() -> web.Application:
        redis = await create_pool(settings.redis_url, ride_out_outages=False)
        app = create_app(redis, settings)

        async def started(app: web.Application) -> None:
            if settings.verify_token is None:
                logger.warning("WABA_VERIFY_TOKEN is not set: Meta's subscription handshake will be refused")
            logger.info("webhook receiver on {}:{}{}, Redis at {}", host, port, PATH, redact_url(settings.redis_url))

        async def stopped(app: web.Application) -> None:
            await redis.aclose()
            logger.info("webhook receiver stopped")

        app.on_startup.append(started)
        app.on_cleanup.append(stopped)
        return app

    web.run_app(make(), host=host, port=port, access_log=None, print=None)
