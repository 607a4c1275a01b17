"""What an operator relies on: metrics, health checks, JSON logs, and the demo."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import pytest
from arq.connections import RedisSettings
from arq.worker import create_worker

from cgb_worker import WorkerSettings
from cgb_worker.simulator import FaultRule

from .conftest import Harness, free_port

if TYPE_CHECKING:
    from cgb_worker.worker import CGBWorker

BIN = Path(sys.executable).parent


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in an exposition text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        metric, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and got == want:
            return float(value)
    return 0.0


async def test_metrics_are_scraped_after_real_jobs(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    harness.set_env(METRICS_PORT=str(port))
    harness.sim.state.faults.append(FaultRule(status=503, count=1, path="/contacts/972500000002/send/text$"))
    jobs = await harness.enqueue(
        {"to": "+972500000001", "message": "one"},
        {"to": "+972500000002", "message": "two"},
        {"to": "+972 12", "message": "bad phone"},
    )
    for key, value in harness.env.items():
        monkeypatch.setenv(key, value)
    worker = create_worker(
        cast(Any, WorkerSettings),
        redis_settings=RedisSettings.from_dsn(harness.redis_url),
        poll_delay=0.01,
        handle_signals=False,
    )
    task = asyncio.ensure_future(worker.main())
    try:
        for job in jobs:
            await harness.outcome(job)
        # Enqueued only now, so that its contact is certainly cached.
        [template] = await harness.enqueue({"to": "+972500000001", "template": "visa_approved"})
        assert (await harness.outcome(template))["kind"] == "template"
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()
    assert sample(text, "cgb_jobs_total", kind="text", outcome="sent") == 2
    assert sample(text, "cgb_jobs_total", kind="template", outcome="sent") == 1
    assert sample(text, "cgb_jobs_total", kind="invalid", outcome="failed") == 1
    assert sample(text, "cgb_job_retries_total", error_class="CGBServerError") == 1
    assert sample(text, "cgb_dead_letters") == 1
    # Contact lookups: 972500000001 missed once, then hit for the template; 972500000002 missed, then hit.
    assert sample(text, "cgb_contact_cache_total", result="miss") == 2
    assert sample(text, "cgb_contact_cache_total", result="hit") == 2
    assert sample(text, "cgb_request_duration_seconds_count", endpoint="send_text", status="200") == 2
    assert sample(text, "cgb_request_duration_seconds_count", endpoint="send_text", status="503") == 1
    assert sample(text, "cgb_request_duration_seconds_count", endpoint="send_flow", status="200") == 1
    assert sample(text, "cgb_request_duration_seconds_count", endpoint="create_contact", status="200") == 2


async def test_json_log_lines_carry_the_job_event(harness: Harness, capfd: Any) -> None:
    harness.set_env(LOG_JSON="true", LOG_LEVEL="DEBUG")
    harness.sim.state.faults.append(FaultRule(status=429, retry_after="0", count=1, path="/send/text$"))
    [job] = await harness.enqueue({"to": "+972500000001", "message": "hi"})
    await harness.run()
    assert (await harness.outcome(job))["attempts"] == 2
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    events = [e for e in lines if e.get("event") == "job"]
    assert [(e["outcome"], e["job_try"], e["error_class"], e["kind"]) for e in events] == [
        ("retry", 1, "CGBRateLimitError", "text"),
        ("sent", 2, None, "text"),
    ]
    assert all(e["job_id"] == job.job_id and isinstance(e["elapsed_ms"], float) for e in events)
    assert all({"time", "level", "message", "logger"} <= set(e) for e in lines)
    assert any(e["logger"] == "arq.worker" for e in lines)
    assert "972500000001" not in json.dumps(lines)


async def _run(*args: str, env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 60)


async def test_arq_check_sees_a_dead_worker(worker_env: dict[str, str]) -> None:
    env = {**worker_env, "WORKER_HEALTH_CHECK_INTERVAL": "1"}
    assert await _run(str(BIN / "arq"), "--check", "cgb_worker.WorkerSettings", env=env) == 1  # no worker yet
    worker = await asyncio.create_subprocess_exec(
        str(BIN / "arq"),
        "cgb_worker.WorkerSettings",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if await _run(str(BIN / "arq"), "--check", "cgb_worker.WorkerSettings", env=env) == 0:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the worker never reported healthy")
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
        # The health key lives interval + 1 s: gone within 2 s here (within 11 s with the default of 10).
        await asyncio.sleep(2.5)
        assert await _run(str(BIN / "arq"), "--check", "cgb_worker.WorkerSettings", env=env) == 1
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


def test_make_demo_runs_the_whole_product() -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "REDIS_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "cgb_worker.demo"], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "7 of 7 jobs ended as expected" in out
    assert "two CGB 503s, then success" in out
    assert "contacts created: 4 for 4 numbers" in out
    assert "Hello Dana, your B-2 visa is approved." in out
    assert "972500000001" not in out  # phones are masked in the report too


async def test_pool_checks_connections_outside_its_lock(harness: Harness) -> None:
    """Each command's connection check runs beside the others', not one after another under the pool lock;
    the connections handed out are distinct and work."""
    from redis.asyncio.connection import ConnectionPool

    from cgb_worker import create_pool
    from cgb_worker.worker import QuickCheckoutPool, quick_checkout

    pool = await create_pool(harness.redis_url)
    try:
        quick_checkout(pool)
        assert type(pool.connection_pool) is QuickCheckoutPool
        in_check, most = 0, 0
        ensure = ConnectionPool.ensure_connection

        async def slow_check(self: ConnectionPool, connection: Any) -> None:
            nonlocal in_check, most
            in_check += 1
            most = max(most, in_check)
            await asyncio.sleep(0.01)
            await ensure(self, connection)
            in_check -= 1

        harness.monkeypatch.setattr(ConnectionPool, "ensure_connection", slow_check)
        await asyncio.gather(*(pool.set(f"k{i}", i) for i in range(10)))
        assert most >= 5  # the new connections check side by side; redis-py's own pool lets one at a time
        assert await pool.mget([f"k{i}" for i in range(10)]) == [str(i).encode() for i in range(10)]
        assert len(pool.connection_pool._available_connections) == 10
    finally:
        await pool.aclose()


async def test_quick_checkout_reads_nothing_and_drops_leftovers(harness: Harness) -> None:
    """A clean connection is handed out without redis-py's zero-timeout read; one with bytes left over from
    an earlier reply is reconnected, so the stale bytes are never taken for the next command's answer."""
    from redis._parsers.hiredis import _AsyncHiredisParser

    from cgb_worker import create_pool
    from cgb_worker.worker import quick_checkout

    reads = 0
    can_read = _AsyncHiredisParser.can_read_destructive

    async def counting(self: _AsyncHiredisParser) -> Any:
        nonlocal reads
        reads += 1
        return await can_read(self)  # type: ignore[no-untyped-call]

    harness.monkeypatch.setattr(_AsyncHiredisParser, "can_read_destructive", counting)
    pool = await create_pool(harness.redis_url)
    try:
        quick_checkout(pool)
        reads = 0  # create_pool's own ping went through redis-py's check
        await pool.set("k", "fresh")
        [connection] = pool.connection_pool._available_connections
        assert await pool.get("k") == b"fresh"
        assert reads == 0

        writer = connection._writer
        assert connection._reader is not None
        connection._reader.feed_data(b"$5\r\nstale\r\n")  # a reply nobody read
        assert await pool.get("k") == b"fresh"
        assert connection._writer is not writer  # a new socket
        assert reads == 0
    finally:
        await pool.aclose()


async def test_quick_checkout_reconnects_when_redis_closed_the_connection(harness: Harness, redis_client: Any) -> None:
    """A connection the server has closed (as after a Redis restart) is replaced before it is handed out."""
    from cgb_worker import create_pool
    from cgb_worker.worker import quick_checkout

    pool = await create_pool(harness.redis_url)
    try:
        quick_checkout(pool)
        await pool.set("k", "kept")
        [connection] = pool.connection_pool._available_connections
        writer = connection._writer
        client_id = await pool.client_id()
        await redis_client.client_kill_filter(_id=client_id)
        for _ in range(100):  # until the event loop has seen the end of the stream
            if connection._reader is not None and connection._reader.at_eof():
                break
            await asyncio.sleep(0.01)
        assert await pool.get("k") == b"kept"
        assert connection._writer is not writer
    finally:
        await pool.aclose()


_PACK_CASES: list[tuple[Any, ...]] = [
    ("SET", "k", "v"),
    ("SET", b"k", b"\xff\x00\r\n"),  # binary, with the protocol's own delimiters inside
    ("EVALSHA", "a" * 40, 2, "arq:in-progress:x", "arq:queue", "x", 1764170000000, 60000),
    ("SET", "k", 0.1),
    ("SET", "k", 1e20),
    ("SET", "k", -0.0),
    ("SET", "k", float("inf")),
    ("SET", "k", 2**70),
    ("SET", "k", -3),
    ("SET", "\u00fc\u20ac\U0001f600", ""),  # UTF-8 of several widths, and an empty value
    ("SET", "k", memoryview(b"view")),
    ("SET", "k", "x" * 100_000),  # past redis-py's 6,000-byte chunking
    ("CONFIG GET", "maxmemory"),  # a two-word command name, as str and as bytes
    (b"CONFIG GET", "maxmemory"),
]


@pytest.mark.parametrize("args", _PACK_CASES, ids=lambda a: repr(a)[:40])
def test_pack_command_is_byte_identical_to_redis_py(args: tuple[Any, ...]) -> None:
    from redis.asyncio.connection import Connection

    from cgb_worker.worker import pack_command

    assert pack_command(*args) == [b"".join(bytes(part) for part in Connection().pack_command(*args))]


def test_pack_commands_is_byte_identical_to_redis_py() -> None:
    from redis.asyncio.connection import Connection

    from cgb_worker.worker import pack_commands

    commands: list[tuple[Any, ...]] = [("MULTI",), *_PACK_CASES, ("EXEC",)]
    assert pack_commands(commands) == [b"".join(bytes(part) for part in Connection().pack_commands(commands))]


@pytest.mark.parametrize("bad", [True, None, [1], {"a": 1}, bytearray(b"x")], ids=repr)
def test_pack_command_rejects_what_redis_py_rejects(bad: Any) -> None:
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from cgb_worker.worker import pack_command

    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(DataError, match="Convert to a bytes, string, int or float"):
        pack_command("SET", "k", bad)
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate: redis-py's strict UTF-8 refuses it too
        pack_command("SET", "k", "\ud800")


async def test_switched_pool_packs_in_c_unless_its_encoding_differs(harness: Harness) -> None:
    """Connections made before and after the switch both pack with hiredis, and Redis understands them;
    a pool with another encoding keeps redis-py's packing, which honours it."""
    import redis.asyncio

    from cgb_worker import create_pool
    from cgb_worker.worker import pack_command, pack_commands, quick_checkout

    pool = await create_pool(harness.redis_url)
    try:
        [before] = pool.connection_pool._available_connections  # create_pool's ping
        quick_checkout(pool)
        assert before.pack_command is pack_command
        assert before.pack_commands is pack_commands
        await asyncio.gather(*(pool.set(f"k{i}", f"\u20ac{i}") for i in range(3)))  # new connections too
        assert all(c.pack_command is pack_command for c in pool.connection_pool._available_connections)
        async with pool.pipeline(transaction=True) as tr:
            tr.get("k0")
            tr.incr("n")
            tr.expire("n", 60)
            assert await tr.execute() == ["\u20ac0".encode(), 1, True]
    finally:
        await pool.aclose()

    latin = redis.asyncio.Redis.from_url(harness.redis_url, encoding="latin-1")
    try:
        quick_checkout(latin)
        await latin.set("latin", "\u00e9")
        [connection] = latin.connection_pool._available_connections
        assert connection.pack_command is not pack_command
        assert await latin.get("latin") == b"\xe9"  # latin-1, not UTF-8
    finally:
        await latin.aclose()


def test_only_a_plain_pool_is_switched() -> None:
    from redis.asyncio.connection import BlockingConnectionPool

    from cgb_worker.worker import quick_checkout

    redis = cast(Any, type("R", (), {"connection_pool": BlockingConnectionPool()})())
    quick_checkout(redis)
    assert type(redis.connection_pool) is BlockingConnectionPool


@pytest.mark.parametrize("worker_class", ["arq", "CGBWorker"])
async def test_workers_run_on_the_switched_pool(harness: Harness, worker_class: str) -> None:
    """Started the arq way (``on_startup`` switches the pool, and the Worker becomes a CGBWorker) or as a CGBWorker
    (which switches it before its first poll), the worker's commands all go through the switched pool."""
    from cgb_worker.worker import CGBWorker, QuickCheckoutPool

    handed_out = 0
    get_connection = QuickCheckoutPool.get_connection

    async def counting(self: QuickCheckoutPool, *args: Any, **kwargs: Any) -> Any:
        nonlocal handed_out
        handed_out += 1
        return await get_connection(self, *args, **kwargs)

    harness.monkeypatch.setattr(QuickCheckoutPool, "get_connection", counting)
    [job] = await harness.enqueue({"to": "+972500000001", "message": "on the switched pool"})
    await harness.run(worker_class=CGBWorker if worker_class == "CGBWorker" else None)
    assert (await harness.outcome(job))["success"] is True
    assert handed_out >= 4  # the claim, arq's job read, the send log, arq's finish: all on this pool


async def _cgb_worker_on(harness: Harness, **options: Any) -> CGBWorker:
    """A CGBWorker for ``whatsapp_send`` on the harness's pool, not started: the test drives it."""
    from cgb_worker.jobs import whatsapp_send
    from cgb_worker.worker import CGBWorker

    worker = CGBWorker(
        functions=[whatsapp_send],
        redis_settings=RedisSettings.from_dsn(harness.redis_url),
        handle_signals=False,
        **options,
    )
    worker._pool = await harness.pool()
    return worker


async def test_cgb_worker_claims_jobs_like_arq(harness: Harness, redis_client: Any) -> None:
    """CGBWorker's one-script claim: the same checks and the same in-progress key as arq's start_jobs."""
    queued, elsewhere, deferred = await harness.enqueue({"to": "+972500000001", "message": "a"}, {}, {})
    pool = await harness.pool()
    later = await pool.enqueue_job("whatsapp_send", {}, _defer_by=60)
    await redis_client.set(f"arq:in-progress:{elsewhere.job_id}", b"1")  # another worker runs it
    await redis_client.zrem("arq:queue", deferred.job_id)  # finished meanwhile
    worker = await _cgb_worker_on(harness, job_timeout=30)
    started: list[tuple[str, int]] = []

    async def run_job(job_id: str, score: int) -> None:
        started.append((job_id, score))

    worker.run_job = run_job  # type: ignore[method-assign]
    worker.tasks["running-here"] = cast(Any, asyncio.get_running_loop().create_future())
    ids = [b"running-here", queued.job_id.encode(), elsewhere.job_id.encode(), deferred.job_id.encode()]
    await worker.start_jobs([*ids, later.job_id.encode()])
    # Each claim runs in its job's task; one was started per id not running here, none for "running-here".
    assert set(worker.tasks) == {"running-here", queued.job_id, elsewhere.job_id, deferred.job_id, later.job_id}
    await asyncio.gather(*(task for job_id, task in worker.tasks.items() if job_id != "running-here"))
    score = await redis_client.zscore("arq:queue", queued.job_id)
    assert started == [(queued.job_id, int(score))]  # the others' claims found them taken, gone or not due
    ttl = await redis_client.pttl(f"arq:in-progress:{queued.job_id}")
    assert 30_000 < ttl <= 40_000  # arq's in_progress_timeout: job_timeout + 10 s
    assert await redis_client.exists(f"arq:in-progress:{later.job_id}") == 0
    assert await redis_client.exists(f"arq:in-progress:{deferred.job_id}") == 0
    assert await redis_client.exists("arq:in-progress:running-here") == 0
    await asyncio.sleep(0)  # the tasks' done callbacks
    assert worker.job_counter == 0  # every slot given back: the four claims' tasks have ended
    assert worker._claims._value == worker.claims_in_flight
    worker.tasks["running-here"].cancel()


async def test_cgb_worker_keeps_claims_in_flight_within_its_limit(harness: Harness) -> None:
    """Claims go out without waiting for each other's answers, but never more than ``claims_in_flight``
    at once; every job is still claimed once and run once."""
    from cgb_worker.worker import _CLAIM, CGBWorker

    jobs = await harness.enqueue(*({"to": "+972500000001", "message": f"m{i}"} for i in range(12)))
    pool = await harness.pool()
    harness.monkeypatch.setattr(CGBWorker, "claims_in_flight", 3)
    worker = await _cgb_worker_on(harness, max_jobs=20)
    in_flight, most = 0, 0
    release = asyncio.Event()
    started: list[str] = []

    async def run_job(job_id: str, score: int) -> None:
        started.append(job_id)
        await release.wait()

    worker.run_job = run_job  # type: ignore[method-assign]
    worker._claim = pool.register_script(_CLAIM)
    claim = worker._claim

    async def slow_claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        try:
            return await claim(*args, **kwargs)
        finally:
            in_flight -= 1

    worker._claim = slow_claim
    await worker.start_jobs([job.job_id.encode() for job in jobs])
    await asyncio.sleep(0.3)
    assert most == 3  # side by side, up to the limit and no further
    assert sorted(started) == sorted(job.job_id for job in jobs)  # each claimed and run once
    release.set()
    await asyncio.gather(*worker.tasks.values())
    assert worker.job_counter == 0
