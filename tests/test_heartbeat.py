"""One heartbeat per worker (``cgb-worker workers``, ``cgb-worker health``) and the queue's gauges at ``/metrics``,
against real arq Workers, a real Redis and the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio
from prometheus_client import CONTENT_TYPE_LATEST

from cgb_worker import __version__, keys
from cgb_worker.deadletters import DeadLetters
from cgb_worker.heartbeat import live_workers, this_hosts
from cgb_worker.tasks import cancel_and_wait

from .conftest import Harness, close_worker, free_port

BIN = Path(sys.executable).parent
A, B = "+972500000001", "+12025550100"
SLOW = 12.0
"""Seconds CGB takes to answer a send in the tests that look at running jobs: they are looked at while it waits."""
SLOW_OK = {"CGB_TIMEOUT": "20000", "WORKER_JOB_TIMEOUT": "30"}


async def until(check: Any, within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {within} s"
        await asyncio.sleep(0.05)


class Running:
    """Real arq Workers, not in burst mode, each as ``arq cgb_worker.WorkerSettings`` builds it."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.workers: list[Any] = []
        self.tasks: list[asyncio.Task[Any]] = []

    async def start(self, **env: str) -> Any:
        from arq.worker import create_worker

        from cgb_worker import worker_settings

        settings = worker_settings({**self.harness.env, "WORKER_HEALTH_CHECK_INTERVAL": "1", **env})
        worker = create_worker(cast(Any, settings), handle_signals=False, poll_delay=0.01)
        self.workers.append(worker)
        self.tasks.append(asyncio.create_task(worker.async_run()))
        return worker

    async def stop(self, worker: Any) -> None:
        await close_worker(worker)  # cancels its main task and running jobs, then runs on_shutdown
        task = self.tasks.pop(self.workers.index(worker))
        self.workers.remove(worker)
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def running(harness: Harness) -> AsyncIterator[Running]:
    made = Running(harness)
    try:
        yield made
    finally:
        for worker in list(made.workers):
            await made.stop(worker)


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "cgb-worker"), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def in_process(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The command, run by click in a thread of this process (its own event loop): a fresh process would
    take seconds to import, longer than the tests' jobs are held running."""
    from click.testing import CliRunner

    from cgb_worker.cli import main

    result = await asyncio.to_thread(CliRunner().invoke, main, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


async def test_each_worker_keeps_its_own_heartbeat_and_workers_lists_them(
    harness: Harness, running: Running, worker_env: dict[str, str], redis_client: redis.asyncio.Redis
) -> None:
    await harness.known(A, B)
    harness.sim.configure(latency=SLOW)
    first = await running.start(WORKER_MAX_JOBS="7", **SLOW_OK)
    second = await running.start(WORKER_MAX_JOBS="7", **SLOW_OK)
    await harness.enqueue({"to": A, "message": "one"}, {"to": B, "message": "two"})

    async def both_running() -> list[Any] | None:
        seen = await live_workers(redis_client)
        return seen if len(seen) == 2 and sum(s.beat.running for s in seen) == 2 else None

    await until(both_running)
    code, out, err = await in_process(worker_env, "workers", "--json")
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert len(listed) == 2
    assert {w["host"] for w in listed} == {socket.gethostname()}
    assert {w["pid"] for w in listed} == {os.getpid()}  # both run in this test process, each with its own key
    assert len({w["id"] for w in listed}) == 2
    assert {(w["version"], w["queue"], w["max_jobs"], w["stale"]) for w in listed} == {
        (__version__, "arq:queue", 7, None)
    }
    assert sum(w["running"] for w in listed) == 2
    assert all(w["poll_age"] is not None and w["started"] > 0 for w in listed)
    stored = sorted(k.decode() for k in await redis_client.keys("cgb:worker*"))
    assert stored == sorted([keys.WORKERS, *(keys.worker(w["id"]) for w in listed)])
    assert 0 < await redis_client.pttl(keys.worker(listed[0]["id"])) <= 3000  # three intervals of 1 s

    code, out, err = await in_process(worker_env, "workers")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "2 worker(s)"
    assert lines[1].split() == ["host", "pid", "up", "since", "(UTC)", "running", "last", "poll", "version"]
    rows = [
        re.fullmatch(rf"{re.escape(socket.gethostname())}\s+{os.getpid()}\s+\S+ \S+\s+(\d)/7\s+\S+ s\s+0\.1\.0", line)
        for line in lines[2:]
    ]
    assert sum(int(row.group(1)) for row in rows if row) == 2, lines  # wherever the two jobs run

    await running.stop(first)  # its heartbeat goes with it, at once
    [left] = await live_workers(redis_client)
    assert left.beat.id in {w["id"] for w in listed}
    assert await redis_client.zcard(keys.WORKERS) == 1
    assert second in running.workers


async def test_health_checks_the_worker_running_here_not_any_worker(
    harness: Harness, running: Running, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cgb-worker health`` against a real worker process, while another worker (in this test process, its PID
    namespace made another one's, as a second container on the host's network would be) stays alive and
    keeps ``arq --check`` passing."""
    monkeypatch.setattr("cgb_worker.heartbeat.pid_namespace", lambda: "pid:[another-container]")
    await running.start()
    env = {**worker_env, "WORKER_HEALTH_CHECK_INTERVAL": "1"}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "cgb-worker"), "run", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:

        async def health(expected: int) -> tuple[str, str] | None:
            code, out, err = await cli(env, "health")
            return (out, err) if code == expected else None

        out, err = await until(lambda: health(0))
        assert re.fullmatch(rf"healthy: worker pid {proc.pid}, 0 running, polled \d+\.\d s ago\n", out), out
        assert err == ""

        os.kill(proc.pid, signal.SIGSTOP)  # still there, but neither refreshing nor polling
        out, err = await until(lambda: health(1))
        assert out == ""
        assert re.fullmatch(
            rf"cgb-worker: unhealthy: worker pid {proc.pid} (no heartbeat for \d+ s|is running but has no "
            rf"heartbeat \(it stopped refreshing it\))\n",
            err,
        ), err  # stale, then expired

        async def expired() -> str | None:
            found = await health(1)
            return found[1] if found and "is running but has no heartbeat" in found[1] else None

        # Its heartbeat gone, the frozen worker is still judged: by the note it left on this machine.
        err = await until(expired)
        assert err == (
            f"cgb-worker: unhealthy: worker pid {proc.pid} is running but has no heartbeat (it stopped refreshing it)\n"
        )
        arq = await asyncio.create_subprocess_exec(
            str(BIN / "arq"), "--check", "cgb_worker.WorkerSettings", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await arq.wait() == 0  # arq's one shared key: the other worker keeps it alive

        os.kill(proc.pid, signal.SIGCONT)
        out, err = await until(lambda: health(0))
        assert out.startswith(f"healthy: worker pid {proc.pid}, ")

        proc.kill()  # killed outright: its heartbeat outlives it, but no process here has its pid
        await proc.wait()
        code, out, err = await cli(env, "health")
        assert (code, out, err) == (1, "", "cgb-worker: unhealthy: no worker running here has a live heartbeat\n")
        client = await harness.pool()
        await until(lambda: _gone(client, proc.pid))  # and it leaves the list three intervals after its last beat
        assert [s.beat.pidns for s in await live_workers(client)] == ["pid:[another-container]"]
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            await proc.wait()


async def _gone(redis_client: Any, pid: int) -> bool:
    return all(s.beat.pid != pid for s in await live_workers(redis_client))


async def test_health_counts_only_this_hosts_workers(harness: Harness, running: Running) -> None:
    await running.start()
    client = await harness.pool()

    async def polled() -> list[Any]:
        return [s for s in await live_workers(client) if s.poll_age is not None]

    [seen] = await until(polled)
    assert this_hosts([seen]) == [seen]
    assert this_hosts([seen], host="another-host") == []
    assert this_hosts([seen], pidns="pid:[1]") == []  # another container on the host's network


async def test_the_heartbeat_adds_no_redis_command_per_job(
    harness: Harness, redis_url: str, redis_client: redis.asyncio.Redis
) -> None:
    """Every command the worker sent, watched with MONITOR: the heartbeat's are its start, its first poll and
    its removal, for twenty jobs as for none; its poll time is stamped in memory."""
    await harness.known(A)
    watcher = redis.asyncio.Redis.from_url(redis_url)
    seen: list[str] = []

    async def watch(ready: asyncio.Event) -> None:
        async with watcher.monitor() as monitor:
            ready.set()
            async for event in monitor.listen():
                seen.append(f"{event.get('client_type', '')}|{event['command']}")

    ready = asyncio.Event()
    watching = asyncio.create_task(watch(ready))
    await ready.wait()
    try:
        jobs = await harness.enqueue(*({"to": A, "message": f"n{i}"} for i in range(20)))
        harness.set_env(WORKER_HEALTH_CHECK_INTERVAL="30")
        await harness.run()
        results = [await harness.outcome(job) for job in jobs]
        await redis_client.set("monitor-end", "1")
        await until(lambda: _seen(seen, "monitor-end"))
    finally:
        await cancel_and_wait(watching)
        await watcher.aclose()
    assert all(r["success"] for r in results)
    assert len(harness.sim.requests("send_text")) == 20
    heartbeat = [c for c in seen if "cgb:worker" in c]
    by_us = [c for c in heartbeat if not c.startswith("lua|")]
    assert {c.split()[0] for c in by_us} == {"tcp|EVALSHA"}  # nothing but the script, sent by the worker
    executed = [c.split()[0] for c in heartbeat if c.startswith("lua|")]
    # written at start-up and at the first poll (which can be one and the same moment), removed at shutdown
    assert executed in (["lua|SET", "lua|ZADD", "lua|ZREMRANGEBYSCORE"] * n + ["lua|DEL", "lua|ZREM"] for n in (1, 2))


async def _seen(seen: list[str], marker: str) -> bool:
    return any(marker in c for c in seen)


def _gauges(text: str) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in re.findall(
            r"^(cgb_(?:queue_\w+|jobs_in_progress|workers\w*|dead_letters)) (\S+)$", text, re.M
        )
    }


async def test_metrics_are_served_at_metrics_only_and_count_the_queue_at_scrape(
    harness: Harness, running: Running, redis_client: redis.asyncio.Redis
) -> None:
    await harness.known(A, B)
    port = free_port()
    await running.start(METRICS_PORT=str(port), WORKER_MAX_JOBS="1", **SLOW_OK)
    url = f"http://127.0.0.1:{port}"
    await harness.enqueue({"to": A})  # no content: refused, dead-lettered
    store = DeadLetters(redis_client)
    await until(lambda: store.count())

    harness.sim.configure(latency=SLOW)
    [slow] = await harness.enqueue({"to": A, "message": "slow"})

    async def one_running() -> bool:
        return sum(s.beat.running for s in await live_workers(redis_client)) == 1

    await until(one_running)
    await harness.enqueue({"to": B, "message": "waits 1"}, {"to": B, "message": "waits 2"})
    await harness.enqueue({"to": B, "message": "later"}, _defer_by=3600)
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST  # prometheus_client's text format
            text = await resp.text()
        gauges = _gauges(text)
        oldest = gauges.pop("cgb_queue_oldest_ready_seconds")
        assert gauges == {
            "cgb_queue_jobs": 3,
            "cgb_queue_ready_jobs": 2,
            "cgb_queue_deferred_jobs": 1,
            "cgb_jobs_in_progress": 1,
            "cgb_workers": 1,
            "cgb_workers_stale": 0,
            "cgb_dead_letters": 1,
        }
        assert 0 <= oldest < 30
        assert 'cgb_jobs_total{kind="invalid",outcome="failed"} 1.0' in text  # the worker's own counters too
        for path in ("/", "/metrics/", "/health", "/metricsx"):
            async with http.get(url + path) as resp:
                assert resp.status == 404, path

        assert await store.purge() == 1  # by another process: the gauge follows at the next scrape
        async with http.get(url + "/metrics") as resp:
            assert _gauges(await resp.text())["cgb_dead_letters"] == 0
    assert harness.sim.requests("send_text")[0]["body"]["text"] == "slow"
    assert slow.job_id


async def test_a_backlog_the_rate_limit_defers_shows_in_the_queue_age(
    harness: Harness, running: Running, redis_client: redis.asyncio.Redis
) -> None:
    """At CGB_RATE_LIMIT=1 the jobs that find no turn within their try are deferred by arq to their turn: arq
    holds them as deferred, not ready, yet they are a backlog. The queue's age counts them from when they fell
    due, and the queue's depth counts them."""
    phones = [f"+120255501{i:02d}" for i in range(20)]
    await harness.known(*phones)
    port = free_port()
    await running.start(METRICS_PORT=str(port), CGB_RATE_LIMIT="1", WORKER_MAX_JOBS="10")
    enqueued_at = time.time()
    jobs = await harness.enqueue(*({"to": phone, "message": "in turn"} for phone in phones))
    ids = {job.job_id for job in jobs}

    async def deferred_by_the_rate() -> int:
        return int(await redis_client.zcard(keys.RATE_WAITING))

    await until(lambda: deferred_by_the_rate())
    members = dict(await redis_client.zrange(keys.RATE_WAITING, 0, -1, withscores=True))
    assert {m.decode() for m in members} <= ids
    assert all(abs(score / 1000 - enqueued_at) < 5 for score in members.values())  # scored by when each fell due
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        gauges = _gauges(await resp.text())
    elapsed = time.time() - enqueued_at
    assert gauges["cgb_queue_deferred_jobs"] >= 1
    assert gauges["cgb_queue_jobs"] == gauges["cgb_queue_ready_jobs"] + gauges["cgb_queue_deferred_jobs"] >= 1
    assert 0 < gauges["cgb_queue_oldest_ready_seconds"] <= elapsed + 1  # since it fell due, not since its turn


async def test_a_job_the_rate_limit_defers_is_noted_by_when_it_fell_due(redis_client: redis.asyncio.Redis) -> None:
    """arq's score for the try (when it fell due), not its enqueue time: a job scheduled for later is no lag before
    its time; the first note stands (NX), and a note from the future is taken as now."""
    from cgb_worker.jobs import _wait_for_the_rate

    now = int(time.time() * 1000)
    try:
        for job_id, due in (("scheduled", now - 7_000), ("scheduled", now - 1_000), ("ahead", now + 60_000)):
            async with redis_client.pipeline(transaction=False) as pipe:
                _wait_for_the_rate(pipe, job_id, due)
                await pipe.execute()
        assert await redis_client.zscore(keys.RATE_WAITING, "scheduled") == now - 7_000
        assert now <= (await redis_client.zscore(keys.RATE_WAITING, "ahead") or 0) <= int(time.time() * 1000)
    finally:
        await redis_client.delete(keys.RATE_WAITING)


async def test_the_queue_stats_drop_jobs_that_left_the_queue(redis_client: redis.asyncio.Redis) -> None:
    """queue_stats.lua on its own: of the jobs the rate limit deferred, one that left the queue is dropped, one
    running is passed over, and the oldest still waiting gives its enqueue time."""
    from cgb_worker.scripts import QueueStatsScript

    now = int(time.time() * 1000)
    queue, in_progress = "test:queue", "test:in-progress:"  # not arq's: a later test's worker must not find them
    await redis_client.zadd(queue, {"running": now - 5000, "waiting": now + 2000, "later": now + 3000})
    await redis_client.set(in_progress + "running", b"1")
    await redis_client.zadd(keys.RATE_WAITING, {"gone": now - 90_000, "running": now - 80_000, "waiting": now - 70_000})
    try:
        stats = await QueueStatsScript(redis_client, queue, in_progress)(now)
        assert (stats.due, stats.deferred, stats.running, stats.oldest_ms) == (1, 2, 1, None)
        assert stats.waiting_since_ms == now - 70_000
        assert await redis_client.zrange(keys.RATE_WAITING, 0, -1) == [b"running", b"waiting"]
    finally:
        await redis_client.delete(queue, in_progress + "running", keys.RATE_WAITING)


async def test_metrics_leave_the_queue_out_when_redis_does_not_answer(harness: Harness, redis_url: str) -> None:
    from loguru import logger

    from cgb_worker.metrics import Metrics

    metrics = Metrics()
    dead = redis.asyncio.Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens there
    metrics.watch_queue(dead, "arq:queue", "arq:in-progress:", DeadLetters(dead))
    said: list[str] = []
    sink = logger.add(lambda message: said.append(str(message).strip()), format="{message}")
    try:
        for _ in range(3):  # a scrape every few seconds through an outage: one line per 10 s, not one per scrape
            text = (await metrics.render()).decode()
    finally:
        logger.remove(sink)
        await dead.aclose()
    assert said == ["metrics: the queue's gauges are left out of scrapes: Redis connection refused"]
    assert "cgb_queue_ready_jobs" not in text
    assert "cgb_dead_letters" not in text
    assert "cgb_jobs_total" in text


async def test_health_and_workers_say_in_one_line_that_redis_is_unreachable(worker_env: dict[str, str]) -> None:
    """``health`` tries once whatever REDIS_CONNECT_TIMEOUT says (a HEALTHCHECK has 10 s); ``workers`` waits it."""
    env = {**worker_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    for command, extra in (("health", {}), ("workers", {"REDIS_CONNECT_TIMEOUT": "0"})):
        code, out, err = await cli({**env, **extra}, command)
        assert (code, out) == (1, ""), err
        assert err.startswith("cgb-worker: Redis at redis://127.0.0.1:"), err
        assert "unreachable: connection refused; gave up after 0 s" in err, err
        assert len(err.splitlines()) == 1, err


def test_the_local_notes_live_in_a_folder_of_the_users_own_and_follow_no_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user could plant a symlink named by a coming pid in a shared folder, and a root worker's note
    would overwrite its target; or plant notes that make health fail."""
    from cgb_worker import heartbeat

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = heartbeat.local_dir("redis://127.0.0.1:6379/0")
    assert folder.parent.name == f"cgb-worker-heartbeats-{os.getuid()}"
    victim = tmp_path / "victim"
    victim.write_text("someone's config")

    folder.parent.mkdir(mode=0o777)
    folder.parent.chmod(0o777)  # open to all: not trusted
    with pytest.raises(OSError, match="not a directory of this user's alone"):
        heartbeat._write_note(folder / "123", "x\n1\n")
    assert heartbeat.running_here("redis://127.0.0.1:6379/0") == {}
    folder.parent.chmod(0o700)

    folder.mkdir(mode=0o700)
    (folder / "123").symlink_to(victim)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):  # O_NOFOLLOW
        heartbeat._write_note(folder / "123", "x\n1\n")
    assert victim.read_text() == "someone's config"

    me = os.getpid()
    started = heartbeat._process_start(me)
    assert started is not None
    (folder / str(me)).write_text("host:1:aa\n\n")  # no start time: cannot be told from a reused pid
    (folder / "1234567").write_text("host:2:bb\n1\n")  # no such process
    heartbeat._write_note(folder / "999999", f"host:3:cc\n{started}\n")  # a pid that is not this process's
    assert heartbeat.running_here("redis://127.0.0.1:6379/0") == {}
    assert list(folder.iterdir()) == []  # the stale notes are gone, the symlink too (not what it pointed at)
    assert victim.read_text() == "someone's config"
    heartbeat._write_note(folder / str(me), f"host:4:dd\n{started}\n")
    assert heartbeat.running_here("redis://127.0.0.1:6379/0") == {me: "host:4:dd"}
