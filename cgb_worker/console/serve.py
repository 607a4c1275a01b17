"""Running the console: Redis through the start-up checks, the app on its address, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable

from aiohttp import web
from arq.connections import ArqRedis
from loguru import logger

from ..settings import ConsoleSettings, listen_problem
from .app import create_console
from .auth import ConsoleAuth


def serve(settings: ConsoleSettings, *, port_name: str = "CONSOLE_PORT") -> None:
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
