"""Shared fixtures: a real Redis server, the CGB simulator over real HTTP, an aiohttp session.

Redis: ``CGB_TEST_REDIS_URL`` points the tests at a Redis of your own (it is flushed!); otherwise a
throwaway ``redis-server`` is started on a free port for the session and stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio
from aiohttp import web

from cgb_worker.simulator import SimConfig, SimState, create_app

TOKEN = "1000001.TestTokenNotARealOneAbcdefghijklmnop"
"""A fake API key shaped like CGB's (``<digits>.<alphanumerics>``) so leak checks mean something."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    given = os.environ.get("CGB_TEST_REDIS_URL")
    if given:
        yield given
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.exit("redis-server is not installed: run the tests with `make test`, which installs it", 2)
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="cgb-test-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.exit("the test Redis did not start", 2)
            time.sleep(0.05)
    client.close()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


class Sim:
    """A running simulator: its base URL, its state (for direct inspection) and sim-only helpers."""

    def __init__(self, state: SimState, root: str) -> None:
        self.state = state
        self.root = root
        self.api_url = root + "/api"

    def configure(self, **changes: Any) -> None:
        self.state.config = SimConfig(**{**_config_dict(self.state.config), **changes})

    def requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.state.requests if endpoint is None or r["endpoint"] == endpoint]


def _config_dict(config: SimConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    state = SimState(SimConfig(token=TOKEN), seed=7)
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Sim(state, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
