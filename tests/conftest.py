"""Shared fixtures: a real Redis server, the CGB simulator over real HTTP, an aiohttp session.

Redis: ``CGB_TEST_REDIS_URL`` points the tests at a Redis of your own (it is flushed!; under ``make test``'s two
processes, the second uses the next database number); otherwise a throwaway ``redis-server`` is started on a free
port for each test process and stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import redis
import redis.asyncio
from aiohttp import web

from cgb_worker import keys
from cgb_worker.simulator import Listener, SimConfig, SimState, create_app

TOKEN = "1000001.TestTokenNotARealOneAbcdefghijklmnop"
"""A fake API key shaped like CGB's (``<digits>.<alphanumerics>``) so leak checks mean something."""
PHONE_KEY = "test-phone-hash-key-not-a-real-one"
"""The tests' ``PHONE_HASH_KEY``: every worker and receiver a test starts is given it, so hashes agree."""


@pytest.fixture(scope="session", autouse=True)
def phone_key() -> str:
    """Phones hash under the tests' key in this process, as a worker's start-up would set it."""
    keys.use_phone_key(PHONE_KEY)
    return PHONE_KEY


# -- the operations console, served for a test (tests/test_console*.py) ----------------------------------------

CONSOLE_TOKEN = "console-test-token-0123456789"


class Console:
    """A console served for a test: its address and the Redis client it reads."""

    def __init__(self, url: str, redis: Any) -> None:
        self.url = url
        self.redis = redis

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # unsafe: cookies for an IP


async def _serve(redis_url: str, token: str | None) -> AsyncIterator[Console]:
    """The console's app over ``redis_url``, served on a free port, with ``token`` as its CONSOLE_TOKEN."""
    from aiohttp import web

    from cgb_worker import create_pool
    from cgb_worker.console.app import create_console
    from cgb_worker.console.auth import ConsoleAuth
    from cgb_worker.settings import Secret

    redis = await create_pool(redis_url)
    runner = web.AppRunner(create_console(redis, ConsoleAuth(Secret(token) if token else None, redis)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Console(f"http://127.0.0.1:{port}", redis)
    finally:
        await runner.cleanup()
        await redis.aclose()


@pytest.fixture
async def guarded(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Console]:
    from cgb_worker.console import app as app_module
    from cgb_worker.console import auth as auth_module

    monkeypatch.setattr(auth_module, "FAILED_SIGN_IN_DELAY", 0.0)  # a wrong token is answered at once here
    monkeypatch.setattr(app_module, "FAILED_SIGN_IN_DELAY", 0.0)
    async for console in _serve(redis_url, CONSOLE_TOKEN):
        yield console


@pytest.fixture
async def open_console(redis_url: str) -> AsyncIterator[Console]:
    async for console in _serve(redis_url, None):
        yield console


def start_redis_server(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server (no persistence) on a free loopback port, and its URL, once it answers PING;
    RuntimeError (the server killed) when it does not within 10 s."""
    binary = shutil.which("redis-server") or "redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return proc, url
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


async def close_worker(worker: Any) -> None:
    """``worker.close()`` for a worker stopped with jobs under way. arq's close cancels the job tasks and
    gathers them without ``return_exceptions``: one cancelled before its job began (in arq's own first round
    trip) re-raises there, and the rest of close (``on_shutdown``: our heartbeat and recorder) is skipped. The
    tasks are done by then, so a second call runs it."""
    try:
        await worker.close()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this test is being cancelled: not arq's gather
        await worker.close()


async def communicate(proc: asyncio.subprocess.Process, limit: float) -> tuple[bytes, bytes]:
    """``proc.communicate()``, bounded: a process still running after ``limit`` seconds (a hang, not a
    timing) is killed and reaped before the error, so that its pipes are not left for the garbage collector to
    report in whichever test runs next."""
    try:
        return await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    given = os.environ.get("CGB_TEST_REDIS_URL")
    if given:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1 (make test's two processes): a database each
        if worker.startswith("gw"):
            parts = urlsplit(given)
            given = urlunsplit(parts._replace(path=f"/{int(parts.path.strip('/') or 0) + int(worker[2:])}"))
        yield given
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.exit("redis-server is not installed: run the tests with `make test`, which installs it", 2)
    workdir = tempfile.mkdtemp(prefix="cgb-test-redis-")
    try:
        proc, url = start_redis_server(workdir)
    except RuntimeError:
        pytest.exit("the test Redis did not start", 2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _redis_left_empty(redis_url: str) -> Iterator[None]:
    """Every test leaves the test process's Redis empty: a job a test deferred for an hour, or a key it made, must
    not be found by the next test's worker (a burst worker would wait for that job)."""
    yield
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


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
    state.listener = Listener(runner, "127.0.0.1", 0)
    port = await state.listener.start()
    try:
        yield Sim(state, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- a real arq worker against the simulator ----------------------------------------------------------------


class Harness:
    """Enqueue jobs through a real arq pool and run real arq Workers over them until the queue is empty."""

    def __init__(self, redis_url: str, sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
        self.redis_url = redis_url
        self.sim = sim
        self.monkeypatch = monkeypatch
        self.env: dict[str, str] = {
            "CGB_API_KEY": TOKEN,
            "PHONE_HASH_KEY": PHONE_KEY,
            "CGB_API_URL": sim.api_url,
            "REDIS_URL": redis_url,
            "CGB_RETRY_ATTEMPTS": "3",
            "CGB_RETRY_BASE_DELAY": "0.01",
            "CGB_RETRY_MAX_DELAY": "0.05",
            "CGB_TIMEOUT": "2000",
            "CGB_TEMPLATE_VISA_APPROVED": "1752250957765",
            "CGB_RATE_LIMIT": "50",  # on, as in production: the limiter is on every job's path
            "LOG_LEVEL": "DEBUG",
        }

    def set_env(self, **values: str | None) -> None:
        for key, value in values.items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value

    _pool: Any = None

    async def pool(self) -> Any:
        """The producer's pool, shared by every Job handle the harness returns; closed by the fixture."""
        from cgb_worker import create_pool

        if self._pool is None:
            self._pool = await create_pool(self.redis_url)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    async def known(self, *phones: str, cached: bool = True) -> None:
        """Make each phone a contact CGB already has and, with ``cached``, one the worker has in its cache;
        the simulator's request log is cleared afterwards."""
        from cgb_worker.contacts import phone_key

        async with aiohttp.ClientSession() as http:
            for phone in phones:
                async with http.post(
                    self.sim.api_url + "/contacts", json={"phone": phone}, headers={"X-ACCESS-TOKEN": TOKEN}
                ) as resp:
                    assert resp.status == 200
        if cached:
            client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(self.redis_url)
            try:
                for phone in phones:
                    await client.set(f"cgb:contact:{phone_key(phone)}", phone.lstrip("+"), ex=3600)
            finally:
                await client.aclose()
        self.sim.state.requests.clear()

    async def enqueue(self, *payloads: Any, **kwargs: Any) -> list[Any]:
        pool = await self.pool()
        return [await pool.enqueue_job("whatsapp_send", p, **kwargs) for p in payloads]

    async def run(self, workers: int = 1, **worker_kwargs: Any) -> list[Any]:
        """Run ``workers`` arq Workers (each with its own ctx, as separate processes would be) in burst mode,
        from the settings class both commands use, built from the harness's environment."""
        from arq.worker import create_worker

        from cgb_worker import worker_settings

        settings = worker_settings(self.env)
        options = {"burst": True, "poll_delay": 0.01, "handle_signals": False, **worker_kwargs}
        made = [create_worker(cast(Any, settings), **options) for _ in range(workers)]
        try:
            await asyncio.gather(*(w.main() for w in made))
        finally:
            for w in made:
                await w.close()
        return made

    async def outcome(self, job: Any) -> Any:
        """The job's result, or the exception ``Job.result()`` raised."""
        try:
            return await job.result(timeout=5)
        except Exception as exc:
            return exc


@pytest.fixture
async def harness(
    redis_url: str, sim: Sim, monkeypatch: pytest.MonkeyPatch, redis_client: Any
) -> AsyncIterator[Harness]:
    h = Harness(redis_url, sim, monkeypatch)
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def worker_env(harness: Harness) -> dict[str, str]:
    """The environment a worker subprocess needs: the harness's settings on top of PATH and HOME."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_", "METRICS_"))}
    return {**base, **harness.env}
