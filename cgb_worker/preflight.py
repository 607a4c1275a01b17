"""Start-up checks and Redis outages said out loud, for every process: the worker, the receiver and the CLI.

A process starts in this order (:func:`open_redis`, then :func:`check_cgb` for the worker):

1. **Redis reachable.** Until it answers a PING, one line at once and then one every :data:`REPORT_EVERY`
   seconds names the (redacted) URL and the cause (refused, timed out, TLS, DNS...); after
   ``REDIS_CONNECT_TIMEOUT`` seconds it gives up with one line (exit 1). A password Redis refuses is not waited
   for: one line, exit 2.
2. **The server.** Redis :data:`MIN_REDIS_VERSION` or later; ``maxmemory-policy`` ``noeviction`` (read from
   ``INFO memory``, which managed Redis allows where it forbids ``CONFIG``), since an evicted send record is a
   message sent twice; for the receiver, a warning when nothing is persisted (neither AOF nor RDB saves).
3. **The data format** (``keys.FORMAT``): a newer one than :data:`FORMAT_VERSION` refuses to start; none (or an
   older one) is recorded as ours.
4. **The CGB key** (the worker only): 401/403 stops it (exit 2); CGB unreachable or failing is a warning.

Each refusal is a :class:`StartupError` carrying one line and an exit code; each entry point prints it as its
one line, so nothing here ever ends in a traceback, under ``arq`` too (the worker's checks run synchronously
while ``arq`` imports ``cgb_worker.WorkerSettings``, before arq's own ``create_pool`` could raise one).

After start-up, :class:`cgb_worker.connection.OutageRetry` says the same about an outage a process rides out: at
once, every :data:`REPORT_EVERY` seconds, and "Redis is back" when it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import aiohttp
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from . import keys, scripts
from .client import CGBClient
from .connection import REPORT_EVERY, cause
from .errors import CGBAuthError, CGBWorkerError
from .settings import Settings, redact_url

RETRY_EVERY = 0.5
"""Seconds between two connection attempts at start-up."""
ATTEMPT_TIMEOUT = 5.0
"""Seconds one connection attempt (connect, TLS, AUTH, PING) may take: a host that never answers is a timeout."""

SAY_CGB_AFTER = 2.0
"""Seconds the CGB key check may take before the worker says that it waits for CGB."""

MIN_REDIS_VERSION = (7, 0)
"""``EXPIRE ... NX`` (the send log and the receiver's matching keep a record's first expiry) needs 7.0;
``XAUTOCLAIM`` (the reactions outbox) and ``XTRIM MINID`` (the diagnostics streams) need 6.2."""
FORMAT_VERSION = 1
"""The layout of every ``cgb:*`` key this code reads and writes. A release that changes it raises it."""

Role = Literal["worker", "receiver", "cli"]
Say = Callable[[str], None]
_T = TypeVar("_T")


class StartupError(Exception):
    """Why a process cannot start, in one line, and its exit code (1: try again later; 2: fix something)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def _close(redis: Any) -> None:
    if redis is not None:
        with contextlib.suppress(RedisError, OSError):  # a pool that never connected has nothing to close cleanly
            await redis.aclose()


async def wait_for_redis(connect: Callable[[], Awaitable[_T]], url: str, *, give_up_after: float, say: Say) -> _T:
    """The client ``connect`` gives (an ``ArqRedis`` that fails fast), once it answers a PING; said out loud
    while it does not. Raises :class:`StartupError`: 2 at once for a refused password, 1 after ``give_up_after``
    seconds (``REDIS_CONNECT_TIMEOUT``)."""
    timeout = give_up_after
    shown = redact_url(url)
    started = time.monotonic()
    said_at: float | None = None
    while True:
        client: Any = None
        left = timeout - (time.monotonic() - started)
        try:
            # One attempt (REDIS_CONNECT_TIMEOUT=0, health checks) gets a whole attempt's time: a TLS handshake on a
            # busy machine can take a while.
            attempt = ATTEMPT_TIMEOUT if timeout <= 0 else max(0.2, min(ATTEMPT_TIMEOUT, left))
            async with asyncio.timeout(attempt):
                client = await connect()
                await client.ping()
            return client  # type: ignore[no-any-return]
        except AuthenticationError as exc:
            await _close(client)
            raise StartupError(f"Redis at {shown} refused the credentials: {cause(exc)}; check REDIS_URL", 2) from None
        except ResponseError as exc:
            await _close(client)
            raise StartupError(f"Redis at {shown} refused the connection: {exc}", 2) from None
        except (RedisError, OSError, TimeoutError) as exc:
            await _close(client)
            if _certificate_refused(exc):  # waiting does not fix a certificate: one line, at once
                raise StartupError(f"Redis at {shown}: {cause(exc, url)}; check REDIS_URL's ssl_* options", 2) from None
            why = cause(exc, url)
        now = time.monotonic()
        waited = now - started
        # said at the first failure even when it used up the time (a host that never answers), then every 10 s
        if timeout > 0 and (said_at is None or now - said_at >= REPORT_EVERY):
            said_at = now
            say(f"waiting for Redis at {shown}: {why} ({waited:.0f} s of REDIS_CONNECT_TIMEOUT={timeout:g})")
        if waited >= timeout:
            raise StartupError(
                f"Redis at {shown} unreachable: {why}; gave up after {waited:.0f} s "
                f"(REDIS_CONNECT_TIMEOUT={timeout:g})",
                1,
            )
        await asyncio.sleep(min(RETRY_EVERY, max(0.0, timeout - waited)))


_REFUSED_TLS = ("CERTIFICATE_VERIFY_FAILED", "CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE")
"""OpenSSL's words for a certificate refused, ours by the server or the server's by us."""


def _certificate_refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a certificate refused, either way: waiting will not help."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or any(sign in str(seen) for sign in _REFUSED_TLS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


async def check_server(redis: Any, url: str, *, role: Role) -> list[str]:
    """Refuse a Redis this code cannot use safely (:class:`StartupError`, exit 2); the warnings to say once
    nothing refused (about a Redis that loses data on a restart, for the receiver, whose inbox is what Meta
    was told was received)."""
    shown = redact_url(url)
    warnings: list[str] = []
    async with redis.pipeline(transaction=False) as pipe:
        pipe.info("server")
        pipe.info("memory")
        pipe.info("persistence")
        server, memory, persistence = await pipe.execute()
    version = str(server.get("redis_version", "0"))
    if _version(version) < MIN_REDIS_VERSION:
        wanted = ".".join(map(str, MIN_REDIS_VERSION))
        raise StartupError(
            f"Redis at {shown} is {version}; cgb-worker needs {wanted} or later (EXPIRE ... NX in the send log)", 2
        )
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        message = (
            f"Redis at {shown} has maxmemory-policy {policy}: it may evict a send record, and the message is then "
            "sent twice; set it to noeviction"
        )
        if role == "cli":  # an operator's look at a store is still worth having; a writer is refused
            warnings.append(f"warning: {message}")
        else:
            raise StartupError(message, 2)
    if role == "receiver" and not int(persistence.get("aof_enabled", 0)):
        try:
            saves = (await redis.config_get("save")).get("save", "")
        except ResponseError:  # managed Redis often forbids CONFIG; its persistence is the provider's
            saves = None
        if saves == "":
            warnings.append(
                f"Redis at {shown} persists nothing (no AOF, no RDB saves): a restart loses every stored webhook "
                "Meta was told was received, and every delivery record; turn on appendonly or save"
            )
    return warnings


async def check_format(redis: Any, url: str) -> int:
    """The data format Redis holds (recorded as :data:`FORMAT_VERSION` when none, or an older one, is); a newer
    one is a :class:`StartupError` (exit 2): a newer release wrote it, and this one would misread it."""
    found = await redis.register_script(scripts.source("format"))(keys=[keys.FORMAT], args=[FORMAT_VERSION])
    if found is None:
        return FORMAT_VERSION
    text = found.decode() if isinstance(found, bytes) else str(found)
    if not text.isdigit():
        raise StartupError(f"Redis at {redact_url(url)} holds {keys.FORMAT} = {text[:40]!r}, not a format number", 2)
    if int(text) > FORMAT_VERSION:
        raise StartupError(
            f"Redis at {redact_url(url)} holds data format {text} ({keys.FORMAT}), newer than the {FORMAT_VERSION} "
            "this release knows: run the release that wrote it (README, 'Upgrading across a fleet')",
            2,
        )
    return max(int(text), FORMAT_VERSION)


async def open_redis(
    connect: Callable[[], Awaitable[_T]], url: str, *, role: Role, give_up_after: float, say: Say
) -> _T:
    """Steps 1 to 3 of the module doc: the client ``connect`` gives, reachable and checked; closed on a refusal."""
    redis: Any = await wait_for_redis(connect, url, give_up_after=give_up_after, say=say)
    try:
        warnings = await check_server(redis, url, role=role)
        await check_format(redis, url)
    except StartupError:
        await _close(redis)
        raise
    except (RedisError, OSError, TimeoutError) as exc:
        await _close(redis)
        raise StartupError(f"Redis at {redact_url(url)} failed the start-up checks: {cause(exc, url)}", 1) from None
    for warning in warnings:  # after every refusal, so that a refused start is one line
        say(warning)
    return redis  # type: ignore[no-any-return]


async def check_cgb(settings: Settings, say: Say) -> None:
    """Step 4: one cheap authenticated call (the account). A refused key stops the worker, or it would say
    "ready" and dead-letter every job; CGB away or failing is only a warning, since jobs retry through that."""
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = CGBClient(session, settings.api_key, base_url=settings.api_url, timeout=settings.timeout)
        asked = asyncio.ensure_future(client.account())
        try:
            done, _ = await asyncio.wait({asked}, timeout=SAY_CGB_AFTER)
            if not done:  # no silent wait: CGB may take the whole CGB_TIMEOUT to fail
                say(f"waiting for CGB at {settings.api_url} to check CGB_API_KEY (at most {settings.timeout:g} s)")
            await asked
        except CGBAuthError as exc:
            raise StartupError(
                f"CGB at {settings.api_url} refused CGB_API_KEY ({exc.status}): check the key and CGB_API_URL", 2
            ) from None
        except CGBWorkerError as exc:
            say(f"CGB at {settings.api_url} could not be checked ({type(exc).__name__}: {exc}); starting anyway")
