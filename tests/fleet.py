"""Real processes for fault tests: the simulator and worker fleets, each its own OS process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from cgb_worker import create_pool

from .conftest import PHONE_KEY, TOKEN, free_port

BIN = Path(sys.executable).parent


class Fleet:
    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.redis_url = redis_url
        self.workdir = workdir
        self.procs: list[asyncio.subprocess.Process] = []
        self.sim_url = ""
        self.pool: Any = None
        self._logs = 0

    def env(self, **overrides: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
        return {
            **base,
            "CGB_API_URL": self.sim_url + "/api",
            "CGB_API_KEY": TOKEN,
            "PHONE_HASH_KEY": PHONE_KEY,
            "REDIS_URL": self.redis_url,
            "CGB_TIMEOUT": "2000",
            "LOG_LEVEL": "INFO",
            **overrides,
        }

    async def _spawn(self, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        self._logs += 1
        with (self.workdir / f"proc{self._logs}.log").open("wb") as log:  # the child keeps its own copy
            proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    async def start_sim(self, latency: float = 0.0) -> None:
        port = free_port()
        await self._spawn(
            sys.executable,
            "-m",
            "cgb_worker.simulator",
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--latency",
            str(latency),
            "--seed",
            "3",
        )
        self.sim_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                await self.sim("GET", "/_sim/stats")
                return
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def sim(self, method: str, path: str, body: Any = None) -> Any:
        async with aiohttp.ClientSession() as http, http.request(method, self.sim_url + path, json=body) as resp:
            return await resp.json()

    async def start_worker(
        self, env: dict[str, str] | None = None, *, command: str = "arq"
    ) -> asyncio.subprocess.Process:
        """A worker process, started as ``arq cgb_worker.WorkerSettings`` or (``command="run"``) ``cgb-worker run``."""
        args = [str(BIN / "cgb-worker"), "run"] if command == "run" else [str(BIN / "arq"), "cgb_worker.WorkerSettings"]
        proc = await self._spawn(*args, env=self.env(**(env or {})))
        await self._wait_for_log(proc, b"cgb-worker ready")
        return proc

    async def _wait_for_log(self, proc: asyncio.subprocess.Process, text: bytes) -> None:
        log = self.workdir / f"proc{self.procs.index(proc) + 1}.log"
        deadline = time.monotonic() + 30
        while text not in log.read_bytes():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.05)

    async def enqueue(self, payloads: list[Any]) -> list[Any]:
        if self.pool is None:
            self.pool = await create_pool(self.redis_url)
        return [await self.pool.enqueue_job("whatsapp_send", p) for p in payloads]

    async def outcomes(self, jobs: list[Any], within: float) -> list[Any]:
        """Every job's result or exception, waiting at most ``within`` seconds in all."""
        deadline = time.monotonic() + within

        async def one(job: Any) -> Any:
            while True:
                try:
                    return await job.result(timeout=max(0.1, deadline - time.monotonic()), poll_delay=0.1)
                except TimeoutError:
                    return TimeoutError(f"job {job.job_id} had no result in time")
                except ConnectionError:  # Redis restarting under the producer too
                    await asyncio.sleep(0.2)
                except Exception as exc:
                    return exc

        return list(await asyncio.gather(*(one(j) for j in jobs)))

    async def outbox(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.sim("GET", "/_sim/outbox")
        return result

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(self.workdir.glob("proc*.log"))
        )


class OwnRedis:
    """A Redis with an append-only file that a test may stop and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    await client.ping()
                    return
                except redis.ConnectionError:
                    await asyncio.sleep(0.05)
            raise AssertionError("redis did not start")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await self.proc.wait()
