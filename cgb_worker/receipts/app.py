"""The receiver's HTTP side: an ``aiohttp.web`` app (:func:`create_app`) and ``cgb-worker webhooks`` (:func:`serve`).

* ``GET /webhooks/whatsapp``: Meta's subscription handshake; ``hub.challenge`` back with a 200 when
  ``hub.mode=subscribe`` and ``hub.verify_token`` is ``WABA_VERIFY_TOKEN``, else 403.
* ``POST /webhooks/whatsapp``: ``X-Hub-Signature-256`` must be ``sha256=`` and the HMAC-SHA256 of the raw body
  under ``WABA_APP_SECRET`` (compared in constant time), else 401 and nothing is stored; a body over 1 MiB is
  a 413. A signed body whose envelope is not a WhatsApp webhook is kept in ``cgb:webhooks:malformed`` (the last
  1,000) and answered 200, since Meta would redeliver it for days and it would never get better. Any other is
  appended to the stream ``cgb:webhooks:inbox`` before the 200 (its items are checked one by one when it is
  processed, :mod:`.inbox`), so a receiver that dies after answering loses nothing; Redis down is a 503, which
  Meta retries.
* ``GET /healthz`` (Redis reachable and the processor alive) and ``GET /metrics`` (Prometheus).

No log line carries a phone number, a wamid (it encodes the phone), a message text or a secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any

from aiohttp import web
from arq.connections import ArqRedis
from loguru import logger
from redis.exceptions import RedisError

from .. import keys
from ..metrics import ReceiverMetrics
from ..settings import ReceiverSettings, redact_url
from .inbox import MALFORMED_MAX, Processor
from .payload import MalformedError, parse_payload

PATH = "/webhooks/whatsapp"
MAX_BODY = 1024 * 1024


def signature(secret: str, body: bytes) -> str:
    """``X-Hub-Signature-256`` for ``body``: what Meta sends, and what the simulator signs with."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(signature(secret, body), header.strip())


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
        logger.warning("a signed webhook was malformed ({}); kept in {}", exc, keys.MALFORMED)
        try:
            await redis.xadd(
                keys.MALFORMED, {"body": body, "reason": str(exc), "at": now}, maxlen=MALFORMED_MAX, approximate=True
            )
        except RedisError:
            return web.Response(status=503, text="store unavailable")
        return web.Response(text="ok")
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xadd(keys.INBOX, {"body": body, "at": now})
            pipe.set(keys.SINCE, now, nx=True)
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
    from ..worker import create_pool

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
