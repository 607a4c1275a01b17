"""The worker's one override of arq (``survive_lost_claims``), pinned against arq's own behaviour, and the
settings both commands run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from arq.worker import Worker
from redis.exceptions import WatchError

from cgb_worker.worker import REDIS_RETRY, survive_lost_claims, worker_settings

from .conftest import PHONE_KEY, TOKEN, Harness

BIN = Path(sys.executable).parent


class _LostWatch:
    """A pipeline whose connection dies between WATCH and the reads under it, as redis-py reports it."""

    async def __aenter__(self) -> _LostWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def watch(self, *keys: str) -> None:
        return None

    async def exists(self, key: str) -> int:
        raise WatchError("A ConnectionError occurred on while watching one or more keys")


class _Pool:
    def __init__(self) -> None:
        self.pipelines = 0

    def pipeline(self, transaction: bool = True) -> _LostWatch:
        self.pipelines += 1
        return _LostWatch()


def _worker() -> Worker:
    async def job(ctx: dict[str, Any]) -> None:
        return None

    return Worker(functions=[job], max_jobs=3, handle_signals=False, redis_pool=_Pool())  # type: ignore[arg-type]


async def test_arq_loses_a_slot_when_redis_goes_away_mid_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the override relies on: arq 0.28's ``start_jobs`` lets the WatchError out after counting the job
    as started and taking a semaphore permit for it."""
    original = getattr(Worker.start_jobs, "__wrapped__", Worker.start_jobs)
    monkeypatch.setattr(Worker, "start_jobs", original)
    worker = _worker()
    with pytest.raises(WatchError):
        await worker.start_jobs([b"job-1"])
    assert worker.job_counter == 1
    assert worker.sem._value == 3  # max_jobs + 1, less the one permit taken


async def test_the_override_gives_the_slot_back_and_keeps_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Worker, "start_jobs", getattr(Worker.start_jobs, "__wrapped__", Worker.start_jobs))
    survive_lost_claims()
    survive_lost_claims()  # once is enough: a second call does not wrap twice
    assert Worker.start_jobs.__wrapped__.__name__ == "start_jobs"  # type: ignore[attr-defined]
    assert not hasattr(Worker.start_jobs.__wrapped__, "__wrapped__")  # type: ignore[attr-defined]
    worker = _worker()
    await worker.start_jobs([b"job-1"])  # no exception: the next poll claims the job
    assert worker.job_counter == 0
    assert worker.sem._value == 4


async def test_arq_asks_redis_about_its_own_running_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the override's second part relies on: arq's ``start_jobs`` opens a pipeline (WATCH, EXISTS, ...)
    for an id the worker itself is running, and the override does not."""
    monkeypatch.setattr(Worker, "start_jobs", getattr(Worker.start_jobs, "__wrapped__", Worker.start_jobs))
    worker = _worker()
    worker.tasks["running-here"] = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
    with pytest.raises(WatchError):  # the fake pool's reads fail: arq did go to Redis
        await worker.start_jobs([b"running-here"])
    assert worker._pool.pipelines == 1  # type: ignore[union-attr]
    survive_lost_claims()
    worker = _worker()
    worker.tasks["running-here"] = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
    await worker.start_jobs([b"running-here"])
    assert worker._pool.pipelines == 0  # type: ignore[union-attr]
    assert (worker.job_counter, worker.sem._value) == (0, 4)


def test_every_redis_command_rides_out_an_outage() -> None:
    settings = worker_settings(
        {"CGB_API_KEY": TOKEN, "PHONE_HASH_KEY": PHONE_KEY, "REDIS_URL": "redis://127.0.0.1:6399/3"}
    )
    pool = settings.redis_pool  # type: ignore[attr-defined]
    options = pool.connection_pool.connection_kwargs
    assert (options["host"], options["port"], options["db"]) == ("127.0.0.1", 6399, 3)
    assert options["retry"] is REDIS_RETRY
    assert ConnectionRefusedError in options["retry_on_error"] or OSError in options["retry_on_error"]
    total = sum(REDIS_RETRY._backoff.compute(n) for n in range(1, REDIS_RETRY._retries + 1))
    assert 100 < total < 150  # about two minutes of retries per command
    # arq's own settings, for `arq --check`, name the same server
    redis = settings.redis_settings  # type: ignore[attr-defined]
    assert (redis.host, redis.port, redis.database, redis.conn_retries) == ("127.0.0.1", 6399, 3, 0)


def test_settings_carry_the_configured_knobs() -> None:
    settings: Any = worker_settings(
        {"CGB_API_KEY": TOKEN, "PHONE_HASH_KEY": PHONE_KEY, "CGB_RATE_LIMIT": "20", "WORKER_JOB_TIMEOUT": "12"}
    )
    assert (settings.max_jobs, settings.poll_delay, settings.job_timeout) == (40, 0.02, 12)
    assert settings.log_results is False
    assert [f.name for f in settings.functions] == ["whatsapp_send"]


async def test_both_commands_write_json_from_the_first_line(harness: Harness) -> None:
    """Symptom 11: with LOG_JSON=true under ``arq cgb_worker.WorkerSettings`` the first lines were arq's
    plain text."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
    env.update(harness.env)
    env.update(LOG_JSON="true", LOG_LEVEL="DEBUG")  # DEBUG: arq's own start-up lines are shown too
    for command in ([str(BIN / "arq"), "cgb_worker.WorkerSettings", "--burst"], [str(BIN / "cgb-worker"), "run"]):
        proc = await asyncio.create_subprocess_exec(*command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            lines: list[bytes] = []
            while not any(b"cgb-worker ready" in line for line in lines):
                line = await asyncio.wait_for(proc.stderr.readline(), 30)  # type: ignore[union-attr]
                assert line, b"".join(lines)
                lines.append(line)
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
        parsed = [json.loads(line) for line in lines]  # every line, the first included, is one JSON object
        # arq's own first line, logged before the worker's start-up runs, is JSON too.
        assert any(p["logger"] == "arq.worker" and p["message"].startswith("Starting worker") for p in parsed)
        assert all({"time", "level", "message", "logger"} <= set(p) for p in parsed)
