"""The receiver's HTTP side: the public app (:func:`create_app`), the admin app, and ``cgb-worker webhooks``
(:func:`serve`, :class:`Endpoints`).

The public port serves only ``/webhooks/whatsapp``, and faces the internet:

* ``GET``: Meta's subscription handshake; ``hub.challenge`` back with a 200 when ``hub.mode=subscribe`` and
  ``hub.verify_token`` is ``WABA_VERIFY_TOKEN``, else 403.
* ``POST``: ``X-Hub-Signature-256`` must appear once, as ``sha256=`` and 64 hex digits, or the request is
  answered 401 before its body is read. The body (at most ``WEBHOOK_MAX_BODY``, else 413) is read within
  ``WEBHOOK_READ_TIMEOUT`` (else 408) while its HMAC-SHA256 under ``WABA_APP_SECRET`` is computed; a mismatch
  is a 401 and nothing is kept. A signed body is appended, raw and unparsed, to the stream
  ``cgb:webhooks:inbox`` before the 200: whatever it holds (any bytes, any nesting, any number of items), the
  processor (:mod:`.inbox`) reads it, item by item, and keeps what it cannot use with the malformed ones. So a
  receiver that dies after answering loses nothing, and no signed body is ever a 500. Redis slower than
  ``WEBHOOK_REDIS_TIMEOUT``, or the inbox over ``WEBHOOK_INBOX_MAX`` entries, is a 503, which Meta retries.

Connections and bodies are bounded by the guard (:mod:`.guard`). ``/healthz`` and ``/metrics`` are served on
the admin port (``WEBHOOK_ADMIN_HOST``:``WEBHOOK_ADMIN_PORT``, 127.0.0.1:9090 unless set), from the state the
processor keeps: a probe costs no Redis round trip.

No log line carries a phone number, a wamid (it encodes the phone), a message text, a URL or a secret.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from aiohttp import web
from arq.connections import ArqRedis
from loguru import logger
from redis.exceptions import RedisError

from .. import keys
from ..metrics import ReceiverMetrics
from ..settings import ReceiverSettings, listen_problem
from .guard import (
    Budget,
    ConnectionGuard,
    Noise,
    client_logger,
    connection_cap,
    quiet_accept_errors,
    return_big_blocks,
)
from .inbox import Processor

PATH = "/webhooks/whatsapp"
_SIGNATURE = re.compile(r"sha256=([0-9a-fA-F]{64})")
SINCE_EVERY = 60.0


def signature(secret: str, body: bytes) -> str:
    """``X-Hub-Signature-256`` for ``body``: what Meta sends, and what the simulator signs with."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


REDIS: web.AppKey[ArqRedis] = web.AppKey("redis", ArqRedis)
SETTINGS: web.AppKey[ReceiverSettings] = web.AppKey("settings", ReceiverSettings)
METRICS: web.AppKey[ReceiverMetrics] = web.AppKey("metrics", ReceiverMetrics)
PROCESSOR: web.AppKey[Processor] = web.AppKey("processor", Processor)
BUDGET: web.AppKey[Budget] = web.AppKey("budget", Budget)
GUARD: web.AppKey[ConnectionGuard] = web.AppKey("guard", ConnectionGuard)
PUBLIC: web.AppKey[web.Application] = web.AppKey("public", web.Application)
_SINCE: web.AppKey[list[float]] = web.AppKey("since", list)
_PROCESSING: web.AppKey[bool] = web.AppKey("processing", bool)
_STORE_FAILURES: web.AppKey[Noise] = web.AppKey("store_failures", Noise)
_STORING: web.AppKey[Budget] = web.AppKey("storing", Budget)
STORES_AT_ONCE = 128
"""XADDs in flight at once: each holds a Redis connection, and descriptors are what a flood runs short of (the
connection cap leaves room for them). Meta's concurrency is far below it; a wait for a slot costs more CPU than
the XADD."""


async def handshake(request: web.Request) -> web.Response:
    guard = request.app.get(GUARD)
    if guard is not None:  # answered at once: the connection's next deadline is its idle one
        guard.started(request.transport)
        guard.finished(request.transport)
    settings = request.app[SETTINGS]
    query = request.query
    token = query.get("hub.verify_token", "")
    expected = settings.verify_token.get_secret_value() if settings.verify_token else None
    if query.get("hub.mode") == "subscribe" and expected and hmac.compare_digest(token.encode(), expected.encode()):
        return web.Response(text=query.get("hub.challenge", ""))
    return web.Response(status=403, text="forbidden")


def _refuse(status: int, text: str) -> web.Response:
    """An answer that closes the connection: its client may still be sending a body nobody will read."""
    response = web.Response(status=status, text=text)
    response.force_close()
    return response


def _count(app: web.Application, outcome: str) -> None:
    app[METRICS].request(outcome)


async def receive(request: web.Request) -> web.Response:
    """The POST (the module doc), between the guard's ``started`` and ``finished``. One coroutine, with no
    middleware and no await on the common path but the store's: answering is what Meta's bursts are made of."""
    app = request.app
    guard = app.get(GUARD)
    transport = request.transport
    if guard is not None:
        guard.started(transport)
    try:
        settings = app[SETTINGS]
        headers = request.headers.getall("X-Hub-Signature-256", ())
        wanted = _SIGNATURE.fullmatch(headers[0].strip()) if len(headers) == 1 else None
        if wanted is None:
            _count(app, "bad_signature")
            return _refuse(401, "bad signature")
        if any(v.strip().lower() != "identity" for v in request.headers.getall("Content-Encoding", ())):
            # Meta signs and sends the body as it is; a compressed one would be signed over other bytes
            _count(app, "bad_body")
            return _refuse(415, "content-encoding not accepted")
        length = request.content_length
        if length is not None and length > settings.max_body:
            _count(app, "too_large")
            return _refuse(413, "too large")
        processor = app.get(PROCESSOR)
        if processor is not None and processor.inbox_length >= settings.inbox_max:
            _count(app, "overloaded")
            return _refuse(503, "busy")
        # Room in the read budget is taken for the bytes as they arrive, not for what the headers announce: a
        # client that announces 3 MiB and sends a byte a second holds a byte, not 3 MiB of everyone's room.
        held = _Held(app[BUDGET])
        try:
            mac = hmac.new(settings.app_secret.get_secret_value().encode(), digestmod=hashlib.sha256)
            room = settings.max_body
            try:
                # Meta's bodies are small: the whole of one has nearly always come with its headers
                first = request.content.read_nowait(room + 1)
            except (web.RequestPayloadError, OSError, ValueError):
                first, chunks, outcome = b"", None, "bad_body"
            else:
                if not held.take(len(first)):
                    chunks, outcome = None, "overloaded"
                elif len(first) == length:
                    mac.update(first)
                    chunks, outcome = [first], "ok"
                else:
                    mac.update(first)
                    if guard is not None:
                        guard.reading(transport, True)
                    try:
                        chunks, outcome = await _read_rest(request, settings, room, first, mac, held)
                    finally:
                        if guard is not None:
                            guard.reading(transport, False)
            if chunks is None:
                _count(app, outcome)
                code = {"too_large": 413, "read_timeout": 408, "overloaded": 503}.get(outcome, 400)
                return _refuse(code, outcome.replace("_", " "))
            if not hmac.compare_digest(mac.hexdigest(), wanted.group(1).lower()):
                _count(app, "bad_signature")
                return _refuse(401, "bad signature")  # its chunks were never joined: no second copy of a forgery
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            return await _store(app, settings, body)
        finally:
            held.release()
    finally:
        if guard is not None:
            guard.finished(transport)


class _Held:
    """What one request holds of the read budget; given back when it ends."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.size = 0

    def take(self, size: int) -> bool:
        if not self.budget.try_take(size):
            return False
        self.size += size
        return True

    def release(self) -> None:
        if self.size:
            self.budget.give(self.size)
            self.size = 0


async def _read_rest(
    request: web.Request, settings: ReceiverSettings, room: int, first: bytes, mac: Any, held: _Held
) -> tuple[list[bytes] | None, str]:
    """The body's chunks after ``first``, read within the read timeout and never past ``room`` bytes, each fed to
    ``mac`` and charged to the read budget as it comes; else None and why (``overloaded``: the budget is spent,
    a 503)."""
    if len(first) > room:
        return None, "too_large"
    chunks = [first] if first else []
    size = len(first)
    try:
        async with asyncio.timeout(settings.read_timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > room:
                    return None, "too_large"
                if not held.take(len(chunk)):
                    return None, "overloaded"
                mac.update(chunk)
                chunks.append(chunk)
    except TimeoutError:
        return None, "read_timeout"
    except (OSError, web.HTTPException, web.RequestPayloadError, asyncio.IncompleteReadError, ValueError) as exc:
        # the client went away, or its chunked encoding was broken (aiohttp's payload errors are OSErrors
        # or ValueErrors): nobody is there to answer
        return None, "client_gone" if isinstance(exc, ConnectionError) else "bad_body"
    return chunks, "ok"


async def _store(app: web.Application, settings: ReceiverSettings, body: bytes) -> web.Response:
    """One XADD (the entry's id says when it came), within the Redis timeout; a cancelled command's connection
    is dropped by redis-py, so no late reply is read as another's."""
    redis = app[REDIS]
    now = time.time()
    since = app[_SINCE]
    stores = app[_STORING]
    try:
        async with asyncio.timeout(settings.redis_timeout):
            if not stores.try_take(1):  # no await unless all slots are taken
                await stores.take(1, wait=settings.redis_timeout)
            try:
                if now - since[0] < SINCE_EVERY:
                    await redis.xadd(keys.INBOX, {"body": body})
                else:
                    # when webhooks began to flow (window.py reads it); said again now and then, in case Redis
                    # lost it
                    async with redis.pipeline(transaction=False) as pipe:
                        pipe.xadd(keys.INBOX, {"body": body})
                        pipe.set(keys.SINCE, int(now * 1000), nx=True)
                        await pipe.execute()
                    since[0] = now
            finally:
                stores.give(1)
    except (RedisError, TimeoutError, OSError) as exc:
        app[_STORE_FAILURES](type(exc).__name__)
        return web.Response(status=503, text="store unavailable")
    _count(app, "stored")
    return web.Response(text="ok")


async def healthz(request: web.Request) -> web.Response:
    public = request.app[PUBLIC]
    processor = public.get(PROCESSOR)
    if processor is None:
        return web.json_response({"status": "ok"})
    ok, reason = processor.health()
    return web.json_response({"status": reason}, status=200 if ok else 503)


async def metrics_view(request: web.Request) -> web.Response:
    return web.Response(body=request.app[PUBLIC][METRICS].render(), content_type="text/plain")


def create_app(
    redis: ArqRedis,
    settings: ReceiverSettings,
    *,
    metrics: ReceiverMetrics | None = None,
    process: bool = True,
    monitor: bool = True,
) -> web.Application:
    """The public app on ``redis`` (an arq pool: the 131047 fallback enqueues a job). With ``process`` (the
    default) it runs its :class:`Processor` while it serves; with only ``monitor``, the processor's monitor
    (health, the inbox cap, the backlog gauges), as a receiver that only answers does; with neither, nothing
    beside the requests (tests). :func:`admin_app` serves its health and metrics."""
    app = web.Application(client_max_size=settings.max_body)
    app[REDIS] = redis
    app[SETTINGS] = settings
    app[METRICS] = metrics or ReceiverMetrics()
    app[BUDGET] = Budget(settings.read_memory)
    app[_SINCE] = [0.0]
    app[_STORE_FAILURES] = Noise(
        lambda _kind: _count(app, "store_failed"),
        "could not store webhooks ({}) since the last such line: answered 503, Meta will redeliver",
    )
    app[_STORING] = Budget(STORES_AT_ONCE)
    app.router.add_get(PATH, handshake)
    app.router.add_post(PATH, receive)
    if process or monitor:
        app[_PROCESSING] = process
        app.cleanup_ctx.append(_run_processor)
    return app


def admin_app(public: web.Application) -> web.Application:
    """``/healthz`` and ``/metrics`` of ``public``, for the admin port."""
    app = web.Application()
    app[PUBLIC] = public
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app


async def _run_processor(app: web.Application) -> AsyncIterator[None]:
    processor = Processor(app[REDIS], app[SETTINGS], app[METRICS])
    app[PROCESSOR] = processor
    stop = asyncio.Event()
    task = asyncio.create_task(processor.run(stop, process=app[_PROCESSING]))
    yield
    stop.set()
    await task


class Endpoints:
    """The public port, guarded (:mod:`.guard`), and the admin port, for one public app."""

    def __init__(self, public: web.Application, settings: ReceiverSettings) -> None:
        self.public = public
        self.settings = settings
        self.noise = Noise(
            lambda kind: _count(public, kind), "public port: {} since the last such line (clients' doing; in metrics)"
        )
        self.guard = ConnectionGuard(
            max_connections=connection_cap(settings.max_connections, reserve=STORES_AT_ONCE),
            read_timeout=settings.read_timeout,
            noise=self.noise,
        )
        public[GUARD] = self.guard
        # auto_decompress off: the HMAC is over the bytes as sent (a compressed body is refused anyway)
        self._runner = web.AppRunner(
            public,
            access_log=None,
            logger=client_logger(self.noise),
            lingering_time=1.0,
            handle_signals=False,
            auto_decompress=False,
        )
        self._admin = web.AppRunner(admin_app(public), access_log=None)
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port = self.admin_port = 0

    async def start(
        self,
        host: str,
        port: int,
        admin_host: str,
        admin_port: int,
        *,
        public: bool = True,
        port_name: str = "WEBHOOK_PORT",
    ) -> None:
        """Listen; without ``public`` (``WEBHOOK_ROLE=process``) the app runs, its processor too, but only the
        admin port listens. A port that cannot be had raises :class:`CannotListen`, naming its variable
        (``port_name``: ``--port`` when the command line chose it)."""
        quiet_accept_errors(self.noise)
        return_big_blocks()
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        if public:
            loop = asyncio.get_running_loop()
            try:
                self._server = await loop.create_server(self.guard.factory(server), host, port, backlog=128)
            except OSError as exc:
                raise CannotListen(listen_problem(port_name, host, port, exc)) from None
            self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self.guard.run())
        await self._admin.setup()
        try:
            await web.TCPSite(self._admin, admin_host, admin_port).start()
        except OSError as exc:
            raise CannotListen(listen_problem("WEBHOOK_ADMIN_PORT", admin_host, admin_port, exc)) from None
        self.admin_port = self._admin.addresses[0][1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._admin.cleanup()
        await self._runner.cleanup()
        self.noise.flush()
        self.public[_STORE_FAILURES].flush()


class CannotListen(Exception):
    """A port the receiver cannot listen on; the message names its variable and says why, in one line."""


_ROLES = {"all": "answering and processing", "answer": "answering only", "process": "processing only"}


def serve(settings: ReceiverSettings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the receiver until SIGTERM or SIGINT; then stop taking requests, let the processor finish its
    round, and close Redis."""
    port_name = "--port" if port else "WEBHOOK_PORT"
    asyncio.run(_serve(settings, host or settings.host, port or settings.port, port_name))


async def _serve(settings: ReceiverSettings, host: str, port: int, port_name: str = "WEBHOOK_PORT") -> None:
    from ..preflight import StartupError, open_redis
    from ..worker import create_pool

    def connect() -> Awaitable[ArqRedis]:
        return create_pool(settings.redis, ride_out_outages=False)

    try:  # before the signal handlers: a SIGTERM while Redis is awaited ends the wait
        redis = await open_redis(
            connect,
            str(settings.redis),  # the redacted URL, or the sentinels
            role="receiver",
            give_up_after=settings.redis_connect_timeout,
            say=logger.warning,
        )
    except StartupError as exc:
        logger.error("the webhook receiver cannot start: {}", exc)
        raise SystemExit(exc.code) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    endpoints = Endpoints(create_app(redis, settings, process=settings.role != "answer"), settings)
    try:
        try:
            await endpoints.start(
                host, port, settings.admin_host, settings.admin_port, public=settings.role != "process",
                port_name=port_name,
            )  # fmt: skip
        except CannotListen as exc:
            logger.error("the webhook receiver cannot start: {}", exc)
            raise SystemExit(2) from None
        # What start-up built (modules, settings, the app) lives as long as the process: out of the collector's
        # sight, it is not walked again by every full collection a busy port's garbage sets off.
        gc.freeze()
        if settings.verify_token is None:
            logger.warning("WABA_VERIFY_TOKEN is not set: Meta's subscription handshake will be refused")
        logger.info(
            "webhook receiver ({}) on {}, health and metrics on {}:{}, Redis at {}",
            _ROLES[settings.role],
            f"{host}:{endpoints.port}{PATH}" if endpoints.port else "no public port",
            settings.admin_host, endpoints.admin_port, settings.redis,
        )  # fmt: skip
        await stop.wait()
    finally:
        await endpoints.stop()
        await redis.aclose()
        logger.info("webhook receiver stopped")
