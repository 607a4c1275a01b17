"""Running the console: Redis through the start-up checks, the app on its address, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import traceback
from collections.abc import Awaitable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from arq.connections import ArqRedis
from loguru import logger

from ..settings import ConsoleSettings, listen_problem
from .app import create_console
from .auth import ConsoleAuth
from .masking import mask


class _QuietServerLog(logging.Filter):
    """On aiohttp's server logger in the console's process. Anyone who can reach the port can send a request
    aiohttp cannot parse (a request line or header over 8190 bytes, a header without a colon), and aiohttp logs
    its exception, whose text quotes the request's bytes (a phone number in a query, say), with a traceback.
    Such a record becomes one line naming what was wrong, at WARNING at most, without the request's bytes or
    a traceback. Any other record (a bug in a page, a traceback that helps) keeps its traceback as text,
    masked (:func:`.masking.mask`) as the pages are."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            source = f" from {remote}" if isinstance(remote, str) and _is_address(remote) else ""
            record.msg = f"refused a malformed request{source}: {type(exc).__name__} ({exc.code})"
            record.levelno = min(record.levelno, logging.WARNING)
            record.levelname = logging.getLevelName(record.levelno)
        else:
            args = record.args if isinstance(record.args, tuple) else ()
            shown = tuple(a if isinstance(a, str) and _is_address(a) else mask(str(a)) for a in args)
            try:  # the client's address kept readable; everything else masked
                text = mask(str(record.msg)) % shown if shown else mask(record.getMessage())
            except (TypeError, ValueError):  # a format that wants numbers
                text = mask(record.getMessage())
            if record.exc_info:
                text += "\n" + mask("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.msg = text
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def quiet_server_log() -> None:
    """Put :class:`_QuietServerLog` on aiohttp's server logger (once)."""
    server = logging.getLogger("aiohttp.server")
    for old in [f for f in server.filters if isinstance(f, _QuietServerLog)]:
        server.removeFilter(old)
    server.addFilter(_QuietServerLog())


def serve(settings: ConsoleSettings, *, port_name: str = "CONSOLE_PORT") -> None:
    quiet_server_log()
    asyncio.run(_serve(settings, port_name))


async def _serve(settings: ConsoleSettings, port_name: str) -> None:
    from ..preflight import StartupError, open_redis
    from ..worker import create_pool

    def connect() -> Awaitable[ArqRedis]:
        return create_pool(settings.redis, ride_out_outages=False)

    try:
        redis = await open_redis(
            connect, str(settings.redis), role="cli", give_up_after=settings.redis_connect_timeout, say=logger.warning
        )
    except StartupError as exc:
        logger.error("the console cannot start: {}", exc)
        raise SystemExit(exc.code) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_console(redis, ConsoleAuth(settings.token, redis), default_region=settings.default_region)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            logger.error("the console cannot start: {}", listen_problem(port_name, settings.host, settings.port, exc))
            raise SystemExit(2) from None
        where = f"[{settings.host}]" if ":" in settings.host else settings.host
        logger.info(
            "console on http://{}:{}/ ({}), Redis at {}",
            where,
            settings.port,
            "CONSOLE_TOKEN required" if settings.token else "no token: this machine only",
            settings.redis,
        )
        await stop.wait()
    finally:
        await runner.cleanup()
        await redis.aclose()
        logger.info("console stopped")
