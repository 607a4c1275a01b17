"""How fast the receiver answers signed POSTs, side by side with the minimal app (:mod:`benchmarks.minimal_receiver`).

Both run as processes of their own pinned to one core, the client on the other, against one Redis; they are
measured in turns (minimal, ours, minimal, ours, ...) so that a busy moment of the machine falls on both. Each
turn posts the same signed status webhooks, 64 in flight, and counts answers per second and the server's CPU
per answer. ``ours`` is ``cgb-worker webhooks`` answering only (``WEBHOOK_ROLE=answer``, as a public-facing
process of a split deployment runs) and, apart, as it runs by default, processing what it stores as it goes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from .processing import PHONE_KEY
from .system import cpu_seconds, free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-app-secret-not-real"  # noqa: S105 - a stand-in, signs only the bench's posts


def _pin(core: int) -> Any:
    cores = sorted(os.sched_getaffinity(0))

    def pin() -> None:
        if len(cores) > 1:
            os.sched_setaffinity(0, {cores[core % len(cores)]})

    return pin


def _bodies(n: int, seed: int) -> list[tuple[bytes, dict[str, str]]]:
    at = int(time.time())
    out = []
    for i in range(n):
        body = json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [
            {"field": "messages", "value": {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "15550000000", "phone_number_id": "106540352242922"},
             "statuses": [{"id": f"wamid.bench{seed}x{i}", "status": "delivered", "timestamp": str(at),
                           "recipient_id": f"1202555{i % 10000:04d}",
                           "pricing": {"billable": True, "pricing_model": "CBP", "category": "utility"}}]}}]}]},
            separators=(",", ":")).encode()  # fmt: skip
        out.append(
            (body, {"X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()})
        )
    return out


async def _turn(http: aiohttp.ClientSession, url: str, pid: int, n: int, seed: int) -> tuple[float, float]:
    queue = list(reversed(_bodies(n, seed)))

    async def poster() -> None:
        while queue:
            body, headers = queue.pop()
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 200, resp.status

    cpu = cpu_seconds(pid)
    started = time.monotonic()
    await asyncio.gather(*(poster() for _ in range(64)))
    took = time.monotonic() - started
    return n / took, (cpu_seconds(pid) - cpu) * 1000 / n


def _db(redis_url: str, db: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


async def _drained(redis_url: str) -> None:
    """Until the processing receiver has processed what it stored (so that it is idle in the others' turns)."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        while await client.xlen("cgb:webhooks:inbox"):
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def _flush(*urls: str) -> None:
    """The answer-only receivers' inboxes, which nothing processes, emptied between turns."""
    import redis.asyncio

    for url in urls:
        client = redis.asyncio.Redis.from_url(url)
        try:
            await client.flushdb()
        finally:
            await client.aclose()


async def _up(http: aiohttp.ClientSession, url: str) -> None:
    for _ in range(300):
        try:
            async with http.get(url) as resp:
                if resp.status < 500:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} never answered")


async def answering_bench(redis_url: str, *, n: int = 3000, turns: int = 6) -> dict[str, Any]:
    """Answers per second and CPU ms per answer of the minimal app and of ours, median of ``turns`` each."""
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WABA_", "LOG_", "REDIS_", "WEBHOOK_"))
    }
    base_env.update(REDIS_URL=redis_url, WABA_APP_SECRET=SECRET, PHONE_HASH_KEY=PHONE_KEY,
                    LOG_LEVEL="WARNING")  # fmt: skip
    cli = str(Path(sys.executable).parent / "cgb-worker")
    kinds: dict[str, tuple[list[str], dict[str, str]]] = {}
    for db, kind in enumerate(("minimal", "ours", "ours_processing"), start=1):
        port, admin = free_port(), free_port()
        # a database each: the processing receiver's processor must not work on the others' posts during their turns
        env = dict(base_env, WEBHOOK_PORT=str(port), WEBHOOK_ADMIN_PORT=str(admin), REDIS_URL=_db(redis_url, db))
        if kind == "minimal":
            kinds[kind] = ([sys.executable, "-m", "benchmarks.minimal_receiver", str(port)], env)
        else:
            env["WEBHOOK_ROLE"] = "answer" if kind == "ours" else "all"
            kinds[kind] = ([cli, "webhooks", "--host", "127.0.0.1"], env)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[-1:]))
    try:
        for kind, (command, env) in kinds.items():
            procs[kind] = subprocess.Popen(command, env=env, cwd=ROOT,
                                           preexec_fn=_pin(0), stdout=subprocess.DEVNULL)  # fmt: skip
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as http:
            urls = {
                kind: f"http://127.0.0.1:{env['WEBHOOK_PORT']}/webhooks/whatsapp" for kind, (_, env) in kinds.items()
            }
            for kind, url in urls.items():
                await _up(http, url)
                await _turn(http, url, procs[kind].pid, 500, seed=-1)  # warm up
            for t in range(turns):
                for kind, url in urls.items():
                    results[kind].append(await _turn(http, url, procs[kind].pid, n, seed=t))
                    await _drained(_db(redis_url, 3))
                    await _flush(_db(redis_url, 1), _db(redis_url, 2))
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
    out: dict[str, Any] = {"n": n, "turns": turns}
    for kind, values in results.items():
        out[kind] = {"rate": statistics.median(v[0] for v in values), "cpu_ms": statistics.median(v[1] for v in values)}
    # each turn's ratio against the minimal app's turn just before it, then the median: a busy moment of the
    # machine weighs on both sides of one ratio
    base = results["minimal"]
    for kind, key in (("ours", "ratio"), ("ours_processing", "ratio_processing")):
        out[key] = statistics.median(o[0] / b[0] for o, b in zip(results[kind], base, strict=True))
        out[key + "_cpu"] = statistics.median(b[1] / o[1] for o, b in zip(results[kind], base, strict=True))
    return out


if __name__ == "__main__":  # python -m benchmarks.answering REDIS_URL
    print(json.dumps(asyncio.run(answering_bench(sys.argv[1])), indent=1))
