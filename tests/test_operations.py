"""What an operator relies on: metrics, health checks, JSON logs, and the demo."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from arq.worker import create_worker

from cgb_worker import series, worker_settings
from cgb_worker.simulator import FaultRule
from cgb_worker.tasks import cancel_and_wait

from .conftest import Harness, free_port

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
    worker = create_worker(cast(Any, worker_settings(harness.env)), poll_delay=0.01, handle_signals=False)
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
        await cancel_and_wait(task)
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

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "REDIS_", "WABA_", "WEBHOOK_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "cgb_worker.demo"], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "9 of 9 jobs ended as expected" in out
    assert "text or template: window open, so text   sent text" in out
    delivery = out.split("Delivery, from WhatsApp's status webhooks")[1]
    assert delivery.count(" read ") == 8  # every message sent was read, by the receiver's account
    assert "invalid phone                            nothing sent" in delivery
    assert "native template, document header" in out
    assert "whatsapp_template delivered  visa_approval_file_phone" in out
    assert "two CGB 503s, then success" in out
    assert "contacts created: 4 for 4 numbers" in out
    assert "Hello Dana, your B-2 visa is approved." in out
    assert "972500000001" not in out  # phones are masked in the report too


def test_make_console_demo_serves_the_demos_data_until_ctrl_c() -> None:
    import re
    import signal
    import subprocess
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "REDIS_", "WABA_", "WEBHOOK_", "CONSOLE_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cgb_worker.demo", "--console"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        lines = []
        for line in proc.stdout:  # the report, then the console's address
            lines.append(line)
            if line.startswith("console: "):
                break
        address = re.search(r"console: (http://127\.0\.0\.1:\d+/)", "".join(lines))
        assert address, "".join(lines)
        assert "9 of 9 jobs ended as expected" in "".join(lines)
        # the worker writes its counts every FLUSH_EVERY seconds: the page is read until they are all in, or a
        # few flushes have passed
        deadline = time.monotonic() + 4 * series.FLUSH_EVERY
        while True:
            with urllib.request.urlopen(address.group(1), timeout=10) as resp:
                page = resp.read().decode()
            if _funnel(page) == ("9", "9") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        with urllib.request.urlopen(address.group(1) + "failures", timeout=10) as resp:
            failures = resp.read().decode()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:  # a hang is killed, not left running into the next test
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "demo stopped" in out
    # the demo's messages, accepted and read, as the workers and the receiver counted them
    assert _funnel(page) == ("9", "9"), page  # eight jobs read, one of them a file and its text
    assert "InvalidPhoneError" in failures  # the demo's invalid phone, dead-lettered
    assert "972500000001" not in page + failures


def _funnel(page: str) -> tuple[str, ...] | None:
    """The overview's funnel: messages accepted and read, the last day."""
    import re

    found = re.search(
        r"<td>accepted</td><td class=\"num\">(\d+)</td>.*?<td>read</td><td class=\"num\">(\d+)<", page, re.S
    )
    return found.groups() if found else None
