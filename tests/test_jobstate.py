"""``cgb-worker status``: each place a job can be, reached for real (real Redis, real arq Workers, the simulator
over HTTP), asserted through the command's output and exit code."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from arq import create_pool as arq_create_pool
from arq.connections import RedisSettings

from cgb_worker import keys, simulator
from cgb_worker.jobstate import LastRetry, locate
from cgb_worker.simulator import FaultRule
from cgb_worker.tasks import cancel_and_wait

from .conftest import Harness, communicate
from .test_cli import cli

A = "+972500000001"
B = "+12025550100"


async def test_queued_jobs_show_their_position_and_age(harness: Harness) -> None:
    [first] = await harness.enqueue({"to": A, "message": "one"})
    await asyncio.sleep(0.01)  # arq orders by enqueue time in ms, and jobs of the same ms by their random ids
    [second] = await harness.enqueue({"to": B, "message": "two"})
    code, out, err = await cli(harness, "status", second.job_id)
    assert (code, err) == (0, "")
    assert re.fullmatch(rf"{second.job_id}: queued, position 2, enqueued \d+ s ago\n", out)
    code, out, _ = await cli(harness, "status", first.job_id, "--json")
    data = json.loads(out)
    assert (code, data["state"], data["position"], data["function"]) == (0, "queued", 1, "whatsapp_send")
    assert "delivery" not in data


async def test_a_deferred_job_says_until_when(harness: Harness) -> None:
    [job] = await harness.enqueue({"to": A, "message": "later"}, _defer_by=3600)
    code, out, _ = await cli(harness, "status", job.job_id)
    assert code == 0
    assert re.fullmatch(
        rf"{job.job_id}: deferred until \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in 60 min\), enqueued \d+ s ago\n", out
    )


async def test_a_job_held_by_a_slow_cgb_is_running(
    harness: Harness, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    released = asyncio.Event()

    async def held(delay: float) -> None:  # the simulator's fault delay lasts until the test lets go
        await released.wait()

    monkeypatch.setattr(simulator, "asyncio", SimpleNamespace(**{**vars(asyncio), "sleep": held}))
    await harness.known(A)
    harness.set_env(CGB_TIMEOUT="100000", WORKER_JOB_TIMEOUT="300")
    harness.sim.state.faults.append(FaultRule(delay=1.0, path="/send/text$", count=1))
    [job] = await harness.enqueue({"to": A, "message": "slow"})
    worker = asyncio.ensure_future(harness.run(max_burst_jobs=1))
    try:
        while not harness.sim.requests("send_text"):
            assert not worker.done()
            await asyncio.sleep(0.02)
        code, out, _ = await cli(harness, "status", job.job_id)
        assert code == 0
        lines = out.splitlines()
        assert re.fullmatch(rf"{job.job_id}: running \(try 1\), enqueued \d+ s ago", lines[0])
        assert lines[1:3] == ["delivery: sending (service)", "  text: sending"]  # the request left, no answer yet
        data = json.loads((await cli(harness, "status", job.job_id, "--json"))[1])
        assert (data["state"], data["jobTry"]) == ("running", 1)
    finally:
        released.set()
        await worker
    code, out, _ = await cli(harness, "status", job.job_id)
    assert code == 0
    assert re.match(rf"{job.job_id}: succeeded \(try 1, finished .* UTC\)\n", out)
    assert out.splitlines()[1:3] == ["delivery: accepted (service)", "  text: accepted"]
    assert [m["text"] for m in harness.sim.state.outbox] == ["slow"]


async def test_a_try_its_worker_stopped_is_retrying_with_no_error(
    harness: Harness, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    released = asyncio.Event()

    async def held(delay: float) -> None:
        await released.wait()

    monkeypatch.setattr(simulator, "asyncio", SimpleNamespace(**{**vars(asyncio), "sleep": held}))
    await harness.known(A)
    harness.set_env(CGB_TIMEOUT="100000", WORKER_JOB_TIMEOUT="300")
    harness.sim.state.faults.append(FaultRule(delay=1.0, path="/send/text$", count=1))
    [job] = await harness.enqueue({"to": A, "message": "stopped"})
    worker = asyncio.ensure_future(harness.run(max_burst_jobs=1))
    while not harness.sim.requests("send_text"):
        assert not worker.done()
        await asyncio.sleep(0.02)
    await cancel_and_wait(worker)  # the worker stops mid-send: arq puts the job back, its try counted
    released.set()
    code, out, _ = await cli(harness, "status", job.job_id)
    assert code == 0
    assert out.startswith(f"{job.job_id}: retrying: try 1 was interrupted (its worker stopped); try 2 due now")


async def test_a_job_cgb_answers_5xx_is_retrying_with_its_last_error(harness: Harness, redis_client: Any) -> None:
    await harness.known(A)
    harness.set_env(CGB_RETRY_BASE_DELAY="3600", CGB_RETRY_MAX_DELAY="3600")
    harness.sim.state.faults.append(FaultRule(status=503, path="/send/text$"))
    [job] = await harness.enqueue({"to": A, "message": "hi"})
    await harness.run(max_burst_jobs=1)  # one try, then the worker stops
    code, out, err = await cli(harness, "status", job.job_id)
    assert (code, err) == (0, "")
    assert out.startswith(
        f"{job.job_id}: retrying: attempt 1 failed with CGBServerError (HTTP 503 on send_text); try 2 "
    )
    code, out, _ = await cli(harness, "status", job.job_id, "--json")
    data = json.loads(out)
    assert (data["state"], data["jobTry"]) == ("retrying", 1)
    last = data["lastRetry"]
    assert (last["errorType"], last["attempt"], last["jobTry"], last["status"], last["endpoint"]) == (
        "CGBServerError",
        1,
        1,
        503,
        "send_text",
    )
    assert last["counted"] is True
    assert data["dueAt"] > time.time()
    stored = await redis_client.get(keys.last_retry(job.job_id))
    assert b"500000001" not in stored  # no phone
    assert b"hi" not in stored  # no text
    assert 0 < await redis_client.ttl(keys.last_retry(job.job_id)) <= 86400
    assert harness.sim.state.outbox == []


async def test_dead_lettered_exits_1_and_a_replay_links_both_ways(harness: Harness, redis_client: Any) -> None:
    await harness.known(A)
    harness.sim.state.faults.append(FaultRule(status=401, path="/send/text$", count=1))
    [job] = await harness.enqueue({"to": A, "message": "again"})
    await harness.run()
    old = job.job_id
    code, out, _ = await cli(harness, "status", old)
    assert code == 1
    assert (
        out == f"{old}: failed and dead-lettered after 1 attempt: CGBAuthError: HTTP 401 on send_text: Injected 401\n"
    )

    code, out, _ = await cli(harness, "dead-letters", "replay", old)
    assert code == 0
    new = re.search(rf"replayed {old} as (\S+)", out).group(1)  # type: ignore[union-attr]
    assert await redis_client.get(keys.replayed_as(old)) == new.encode()
    assert await redis_client.get(keys.replay_of(new)) == old.encode()
    assert 0 < await redis_client.ttl(keys.replay_of(new)) <= 7 * 86400

    code, out, _ = await cli(harness, "status", old)
    assert code == 0  # judged by its replay, which is queued
    lines = out.splitlines()
    assert lines[0] == f"{old}: failed (CGBAuthError: HTTP 401 on send_text: Injected 401), replayed as {new}"
    assert re.fullmatch(rf"  then {new}: queued, position 1, enqueued \d+ s ago \(replay of {old}\)", lines[1])

    await harness.run()
    assert [m["text"] for m in harness.sim.state.outbox] == ["again"]
    code, out, _ = await cli(harness, "status", new)
    assert code == 0
    lines = out.splitlines()
    assert re.fullmatch(rf"{new}: succeeded \(try 1, finished .* UTC\) \(replay of {old}\)", lines[0])
    assert lines[1:3] == [f"delivery (the record of {old}): accepted (service)", "  text: accepted"]
    code, out, _ = await cli(harness, "status", old, "--json")
    data = json.loads(out)
    assert (data["state"], data["replayedAs"], data["replays"][0]["state"]) == ("replayed", new, "succeeded")
    assert data["delivery"]["status"] == "accepted"


async def test_a_failed_delivery_exits_1_and_an_unknown_job_3(harness: Harness, redis_client: Any) -> None:
    failed = {"status": "failed", "at": 1764650000000, "error": {"code": 131026, "title": "undeliverable"}}
    await redis_client.hset("cgb:sends:visa-9", mapping={"d:text": json.dumps(failed), "text": "sent"})
    code, out, _ = await cli(harness, "status", "visa-9")
    assert code == 1
    assert out.splitlines()[0] == "visa-9: finished; arq no longer holds its result, its delivery record follows"
    assert out.splitlines()[1].startswith("delivery: failed 131026 (")
    code, out, err = await cli(harness, "status", "no-such-job")
    assert (code, err) == (3, "")
    assert out.startswith("no-such-job: unknown: no queued, running or finished job, dead letter or delivery record")


async def test_send_wait_timing_out_says_where_the_job_is(harness: Harness, redis_client: Any) -> None:
    code, out, err = await cli(harness, "send", "--to", B, "--message", "hi", "--wait", "--timeout", "0.5")
    assert code == 1
    job_id = out.split()[1]
    assert re.fullmatch(
        rf"cgb-worker: TimeoutError: no result within 0.5 s; {job_id}: queued, position 1, enqueued \d+ s ago\n", err
    )


async def test_a_pickled_job_gets_one_line_saying_how_to_enqueue(
    harness: Harness, redis_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = await arq_create_pool(RedisSettings.from_dsn(harness.redis_url))  # arq's default: pickle
    try:
        job = await plain.enqueue_job("whatsapp_send", {"to": A, "message": "pickled"})
    finally:
        await plain.aclose()
    assert job is not None
    capsys.readouterr()
    await harness.run()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "deserializ" in line]
    assert len(lines) == 1
    assert lines[0].endswith(
        f"deserializing job {job.job_id} failed: the job is a pickle (arq's default serializer): producers must "
        "enqueue with cgb_worker.create_pool(), or give arq.create_pool "
        "job_serializer=cgb_worker.serialization.serialize and job_deserializer=cgb_worker.serialization.deserialize"
    )
    assert "Traceback" not in err
    assert harness.sim.state.outbox == []
    code, out, _ = await cli(harness, "status", job.job_id)
    assert code == 1
    assert out.startswith(f"{job.job_id}: failed: UndecodableJobError: the job is a pickle (arq's default serializer)")


async def test_a_queued_pickled_job_is_told_unreadable(harness: Harness, redis_client: Any) -> None:
    plain = await arq_create_pool(RedisSettings.from_dsn(harness.redis_url))
    try:
        job = await plain.enqueue_job("whatsapp_send", {"to": A, "message": "pickled"})
    finally:
        await plain.aclose()
    assert job is not None
    found = await locate(redis_client, job.job_id)
    assert (found.state, found.error_type) == ("queued", "UndecodableJobError")
    assert found.error is not None
    assert "producers must enqueue with cgb_worker.create_pool()" in found.error


def test_the_last_retry_record_carries_no_message() -> None:
    assert "error" not in LastRetry.__struct_fields__
    assert "message" not in LastRetry.__struct_fields__


@pytest.mark.parametrize("seconds", ["nan", "inf", "-5", "0"])
async def test_send_wait_refuses_a_timeout_that_is_no_wait(harness: Harness, redis_client: Any, seconds: str) -> None:
    code, out, err = await cli(harness, "send", "--to", B, "--message", "hi", "--wait", "--timeout", seconds)
    assert code == 2, err
    assert "--timeout" in err
    assert out == ""
    assert await redis_client.zcard("arq:queue") == 0  # refused before anything was enqueued


async def test_send_wait_interrupted_names_the_job_it_enqueued(harness: Harness, redis_client: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
    env.update(harness.env)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "cgb-worker"), "send", "--to", B, "--message", "hi", "--wait",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    line = await asyncio.wait_for(proc.stdout.readline(), 60)  # type: ignore[union-attr]
    job_id = line.decode().split()[1]
    assert line.decode() == f"enqueued {job_id}\n"  # said before the wait
    proc.send_signal(signal.SIGINT)
    _, err = await communicate(proc, 60)
    assert proc.returncode == 130
    assert err.decode() == (f"cgb-worker: interrupted while waiting; the job is enqueued: cgb-worker status {job_id}\n")
    assert await redis_client.zscore("arq:queue", job_id) is not None


LOST_CANCEL = """
import asyncio, os, signal, sys
from cgb_worker import cli

async def written():  # a socket write that finishes at once, as redis-py's does through asyncio.wait_for
    return None

async def work():
    print("waiting", flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # lands while this task runs: the cancel waits for the next await
    await asyncio.wait_for(written(), 5)  # finishes in the same turn: Python 3.11's wait_for loses the cancel
    await asyncio.sleep(float(sys.argv[2]))
    return "finished"

try:
    print(cli._run(work) if sys.argv[1] == "cli" else asyncio.run(work()))
except KeyboardInterrupt:
    print("interrupted")
except SystemExit as exc:  # the CLI's one line (on stderr) and exit 130
    print("interrupted", exc.code)
"""


LOST_BEFORE_312 = "finished" if sys.version_info < (3, 12) else "interrupted"  # 3.12's wait_for keeps it


@pytest.mark.parametrize(("runner", "said"), [("cli", "interrupted 130"), ("asyncio.run", LOST_BEFORE_312)])
def test_ctrl_c_is_not_lost_in_a_write(tmp_path: Path, runner: str, said: str) -> None:
    """The CLI's Ctrl-C does not count on cancelling the task: a cancellation that lands mid-step is lost when
    the next await is a ``wait_for`` whose work finished in the same turn (asyncio.run's own handling, the
    second case, sleeps on under Python 3.11: run to show the hazard is real)."""
    import subprocess

    script = tmp_path / "lost.py"
    script.write_text(LOST_CANCEL)
    done = subprocess.run(
        [sys.executable, str(script), runner, "2"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout == f"waiting\n{said}\n"
    assert done.stderr == ("cgb-worker: interrupted\n" if runner == "cli" else "")


async def test_ctrl_c_while_waiting_for_redis_is_one_line_and_130(harness: Harness) -> None:
    """Not click's "Aborted!" and exit 1: any command, interrupted while it waits for Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
    env |= {**harness.env, "REDIS_URL": "redis://127.0.0.1:1/0", "REDIS_CONNECT_TIMEOUT": "60"}
    for args in (["status", "x"], ["workers"], ["dead-letters", "list"], ["send", "--to", B, "--message", "m"]):
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "cgb-worker"), *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        first = await asyncio.wait_for(proc.stderr.readline(), 60)  # type: ignore[union-attr]
        assert b"waiting for Redis" in first, first
        proc.send_signal(signal.SIGINT)
        out, err = await communicate(proc, 60)
        said = "interrupted: nothing enqueued" if args[0] == "send" else "interrupted"
        assert (proc.returncode, out, err.decode()) == (130, b"", f"cgb-worker: {said}\n"), args


async def test_a_second_ctrl_c_ends_at_once_in_one_line(harness: Harness) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
    env.update(harness.env)
    for gap in (0.0, 0.002, 0.05):
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "cgb-worker"), "send", "--to", B, "--message", "hi", "--wait",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        line = await asyncio.wait_for(proc.stdout.readline(), 60)  # type: ignore[union-attr]
        job_id = line.decode().split()[1]
        proc.send_signal(signal.SIGINT)
        await asyncio.sleep(gap)
        proc.send_signal(signal.SIGINT)
        _, err = await communicate(proc, 60)
        # 130, or the second SIGINT's own death once the first had ended the command (a shell says 130 for both)
        assert proc.returncode in (130, -signal.SIGINT), gap
        assert (
            err.decode() == f"cgb-worker: interrupted while waiting; the job is enqueued: cgb-worker status {job_id}\n"
        )


async def _holding_proxy(target_port: int, held: asyncio.Event) -> tuple[asyncio.Server, int]:
    """A proxy to Redis that stops passing Redis's answers on once a client has sent EXEC: an enqueue whose
    transaction reached Redis and whose answer has not come back."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool) -> None:
        try:
            while data := await reader.read(65536):
                if not answers and b"EXEC" in data:
                    held.set()
                if answers and held.is_set():
                    await asyncio.sleep(3600)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_ctrl_c_while_the_enqueue_is_in_flight_names_the_job(harness: Harness, redis_client: Any) -> None:
    from urllib.parse import urlsplit

    held = asyncio.Event()
    server, port = await _holding_proxy(urlsplit(harness.redis_url).port or 6379, held)
    db = urlsplit(harness.redis_url).path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
    env |= {**harness.env, "REDIS_URL": f"redis://127.0.0.1:{port}{db}"}
    try:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "cgb-worker"), "send", "--to", B, "--message", "hi",
            "--job-id", "inflight-1", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(held.wait(), 60)
        while not await redis_client.exists("arq:job:inflight-1"):
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = await communicate(proc, 60)
    finally:
        server.close()
    assert proc.returncode == 130
    assert out == b""  # its answer never came: not said to be enqueued
    assert err.decode() == (
        "cgb-worker: interrupted while enqueuing; the job may be enqueued: cgb-worker status inflight-1\n"
    )
    assert await redis_client.zscore("arq:queue", "inflight-1") is not None  # and it was
