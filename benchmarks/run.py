"""``make bench``: cgb-worker at its operating point, each figure beside its baseline, written to BENCHMARKS.md.

Everything runs on this machine: a throwaway Redis, the CGB simulator in its own process (answering after a
set latency), and real worker processes started as ``arq cgb_worker.WorkerSettings``. The baseline is a
minimal arq job (``benchmarks/minimal.py``) that posts the same request with no guarantees, on the same stock
Worker with the same knobs, measured in the same run. Redis commands are the server's own counts (``INFO
commandstats``, reset once the jobs are queued; nothing polls Redis while a batch runs: the driver watches
the simulator). Rates come from the times requests reached the simulator.

``python -m benchmarks.run [--quick]``; ``--quick`` runs smaller batches (a smoke check, not a report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio

from cgb_worker import create_pool
from cgb_worker.contacts import ContactResolver, phone_key
from cgb_worker.keys import AWAITING, TRACKING
from cgb_worker.receipts import signature
from cgb_worker.sends import StepRecord
from cgb_worker.settings import load_settings
from cgb_worker.simulator import DEFAULT_TOKEN
from tests.attribution import Report, check, payloads

from .answering import answering_bench
from .console import RUNNING, SCAN_LIKE, WORKERS, commands_text, console_bench
from .processing import PHONE_KEY, processing_bench
from .system import cpu_seconds, free_port

ROOT = Path(__file__).resolve().parent.parent
OURS = [sys.executable, "-m", "arq", "cgb_worker.WorkerSettings"]
MINIMAL = [sys.executable, "-m", "arq", "benchmarks.minimal.Settings"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def busiest_second(times: list[float]) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Batch:
    messages: int
    seconds: float
    rate: float
    peak: int
    commands: int
    cpu: float

    @property
    def commands_per_message(self) -> float:
        return self.commands / self.messages

    @property
    def cpu_ms_per_message(self) -> float:
        return self.cpu * 1000 / self.messages


@dataclass
class Stack:
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis_url: str = ""
    sim_url: str = ""
    http: Any = None
    redis: Any = None
    pool: Any = None
    logs: int = 0

    async def start(self) -> None:
        port = free_port()
        redis_server = shutil.which("redis-server") or "redis-server"
        self.procs.append(
            subprocess.Popen(
                [
                    redis_server,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        sim_port = free_port()
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "cgb_worker.simulator", "--port", str(sim_port), "--token", DEFAULT_TOKEN],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        self.http = aiohttp.ClientSession()
        self.redis = redis.asyncio.Redis.from_url(self.redis_url)
        for _ in range(100):
            try:
                await self.redis.ping()
                await self.sim("GET", "/_sim/stats")
                break
            except Exception:
                await asyncio.sleep(0.1)
        self.pool = await create_pool(self.redis_url)

    async def stop(self) -> None:
        await self.pool.aclose()
        await self.redis.aclose()
        await self.http.close()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(20)

    async def sim(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, self.sim_url + path, json=body) as resp:
            return await resp.json()

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
        return {
            **base,
            "CGB_API_URL": self.sim_url + "/api",
            "CGB_API_KEY": DEFAULT_TOKEN,
            "PHONE_HASH_KEY": PHONE_KEY,
            "REDIS_URL": self.redis_url,
            **extra,
        }

    async def fresh(self, latency: float, *, record: bool = True) -> None:
        await self.sim("POST", "/_sim/reset")
        await self.sim("POST", "/_sim/config", {"latency": latency, "record_requests": record})
        await self.redis.flushdb()

    async def known(self, phones: list[str], *, cached: bool = True) -> None:
        headers = {"X-ACCESS-TOKEN": DEFAULT_TOKEN}
        for phone in phones:
            async with self.http.post(self.sim_url + "/api/contacts", json={"phone": phone}, headers=headers):
                pass
            if cached:
                await self.redis.set(f"cgb:contact:{phone_key(phone)}", phone.lstrip("+"), ex=3600)

    async def enqueue(self, payloads: list[dict[str, Any]]) -> None:
        for start in range(0, len(payloads), 500):
            await asyncio.gather(*(self.pool.enqueue_job("whatsapp_send", p) for p in payloads[start : start + 500]))

    async def start_worker(self, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.logs += 1
        log = self.workdir / f"worker{self.logs}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=ROOT)
        self.procs.append(proc)
        return proc

    async def stop_worker(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None:
            await asyncio.sleep(0.05)

    async def outbox_count(self) -> int:
        return int((await self.sim("GET", "/_sim/stats"))["outbox"])

    async def commands(self) -> int:
        stats = await self.redis.info("commandstats")
        return sum(int(v["calls"]) for v in stats.values())

    async def send_times(self) -> list[float]:
        return [r["at"] for r in await self.sim("GET", "/_sim/requests") if r["endpoint"] == "send_text"]


PHONES = [f"+12025550{i:03d}" for i in range(10)]


def texts(n: int, phones: list[str] = PHONES) -> list[dict[str, Any]]:
    return [{"to": phones[i % len(phones)], "message": f"m{i}"} for i in range(n)]


def knobs(rate: float) -> dict[str, str]:
    """The knobs cgb-worker resolves at this rate limit, which the minimal job is given too."""
    settings = load_settings({"CGB_API_KEY": "k", "PHONE_HASH_KEY": PHONE_KEY, "CGB_RATE_LIMIT": str(rate)})
    return {"WORKER_MAX_JOBS": str(settings.worker.max_jobs), "WORKER_POLL_DELAY": str(settings.worker.poll_delay)}


async def batch(
    stack: Stack,
    command: list[str],
    n: int,
    *,
    rate: float,
    latency: float,
    workers: int = 1,
    record: bool = True,
    tracked: bool = False,
    **extra_env: str,
) -> Batch:
    """``n`` texts to known, cached contacts, queued before the workers start; runs until all are sent.
    ``tracked``: as with a webhook receiver deployed (its lease set), so each send is recorded for matching and
    takes its person's turn; each text then goes to a person of its own, since no receiver here frees turns."""
    await stack.fresh(latency, record=record)
    phones = PHONES
    if tracked:
        await stack.redis.set(TRACKING, "1", ex=3600)
        phones = [f"+1202556{i:04d}" for i in range(n)]
    await stack.known(phones)
    await stack.sim("POST", "/_sim/config", {"record_requests": record})
    await stack.enqueue(texts(n, phones))
    await stack.redis.config_resetstat()
    env = stack.env(CGB_RATE_LIMIT=str(rate), **knobs(rate), **extra_env)
    procs = [await stack.start_worker(command, env) for _ in range(workers)]
    started = time.monotonic()
    cpu_from, counted_from = 0.0, -1  # CPU is counted from the first send on: start-up is not a message's
    while (count := await stack.outbox_count()) < n:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a worker exited: see {stack.workdir}")
        if counted_from < 0 and count > 0:
            cpu_from, counted_from = sum(cpu_seconds(p.pid) for p in procs), count
        await asyncio.sleep(0.05)
    seconds = time.monotonic() - started
    await asyncio.sleep(0.3)  # the last results are written
    commands = await stack.commands()
    cpu = (sum(cpu_seconds(p.pid) for p in procs) - cpu_from) * n / max(1, n - counted_from)
    for p in procs:
        await stack.stop_worker(p)
    if record:
        times = sorted(await stack.send_times())
        measured = (len(times) - 1) / (times[-1] - times[0])
        peak = busiest_second(times)
    else:
        measured, peak = n / seconds, 0
    return Batch(n, seconds, measured, peak, commands, cpu)


async def idle_latency(stack: Stack, samples: int) -> list[float]:
    """Enqueue → request at CGB, one job at a time on an idle queue, at the default rate limit."""
    await stack.fresh(0.3)
    await stack.known(PHONES)
    proc = await stack.start_worker(OURS, stack.env())
    await asyncio.sleep(2)
    seen = len(await stack.sim("GET", "/_sim/requests"))
    out: list[float] = []
    for i in range(samples):
        enqueued = time.time()
        await stack.pool.enqueue_job("whatsapp_send", {"to": PHONES[i % 10], "message": f"idle {i}"})
        while True:
            new = await stack.sim("GET", f"/_sim/requests?since={seen}")
            if new:
                seen += len(new)
                out.append((new[0]["at"] - enqueued) * 1000)
                break
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.25)
    await stack.stop_worker(proc)
    return out


async def calls_per_message(stack: Stack) -> dict[str, int]:
    await stack.fresh(0.0)
    proc = await stack.start_worker(OURS, stack.env())
    await asyncio.sleep(2)
    out: dict[str, int] = {}

    async def one(label: str, phone: str) -> None:
        before = len(await stack.sim("GET", "/_sim/requests"))
        sent = await stack.outbox_count()
        await stack.pool.enqueue_job("whatsapp_send", {"to": phone, "message": label})
        while await stack.outbox_count() == sent:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        out[label] = len(await stack.sim("GET", "/_sim/requests")) - before

    await one("new", "+12025550900")
    await one("known", "+12025550900")
    # Expired everywhere: in Redis, and in the worker's own minute-long memory of ids (a new worker).
    await stack.stop_worker(proc)
    await stack.redis.delete(f"cgb:contact:{phone_key('+12025550900')}")
    proc = await stack.start_worker(OURS, stack.env())
    await asyncio.sleep(2)
    await one("known, cache expired", "+12025550900")
    await stack.stop_worker(proc)
    return out


async def cached_lookup_ms(stack: Stack, n: int) -> float:
    class _Client:
        timeout = 5.0

    resolver = ContactResolver(_Client(), stack.redis, cache_ttl=3600)  # type: ignore[arg-type]
    await stack.known(PHONES)
    times = []
    for i in range(n):
        started = time.perf_counter()
        await resolver.resolve(PHONES[i % 10])
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 0.99)


async def rss_growth(stack: Stack, n: int) -> tuple[float, float]:
    await stack.fresh(0.0, record=False)
    await stack.known(PHONES)
    await stack.sim("POST", "/_sim/config", {"record_requests": False})
    await stack.enqueue(texts(n))
    proc = await stack.start_worker(OURS, stack.env(CGB_RATE_LIMIT="0"))
    first = 0.0
    while (count := await stack.outbox_count()) < n:
        if not first and count >= n // 10:
            first = rss_mb(proc.pid)
        await asyncio.sleep(0.2)
    last = rss_mb(proc.pid)
    await stack.stop_worker(proc)
    return first, last


SECRET = "bench-app-secret"  # noqa: S105 - the benchmark's own


def status_body(i: int, status: str, at: int) -> bytes:
    digits = f"1202{i:07d}"
    value = {"statuses": [{"id": f"wamid.B{i:07d}", "status": status, "timestamp": str(at), "recipient_id": digits}]}
    payload = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages",
               "value": value}]}]}  # fmt: skip
    return json.dumps(payload).encode()


def signed(body: bytes) -> dict[str, str]:
    return {"X-Hub-Signature-256": signature(SECRET, body)}


async def receiver_bench(stack: Stack, n: int, rate: int, seconds: float) -> dict[str, float]:
    """The webhook receiver as a process of its own: CPU per webhook (its request and its processing, with a
    send waiting to be matched for each), and the time to the 200 when Meta posts at ``rate`` a second."""
    await stack.fresh(0.0)
    at = int(time.time())
    total = n + int(rate * seconds)
    async with stack.redis.pipeline(transaction=False) as pipe:
        for i in range(total):
            rec = StepRecord(f"job{i}", "text", f"+1202{i:07d}", at * 1000 - 500, True)
            pipe.hset(f"cgb:sends:job{i}", mapping={**rec.fields(), "text": "sent"})
            pipe.zadd(AWAITING, {str(rec.member): 0})
        await pipe.execute()
    port, admin = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WABA_", "LOG_", "REDIS_"))},
        "REDIS_URL": stack.redis_url,
        "WABA_APP_SECRET": SECRET,
        "PHONE_HASH_KEY": PHONE_KEY,
        "WEBHOOK_PORT": str(port),
        "WEBHOOK_ADMIN_PORT": str(admin),
    }
    proc = await stack.start_worker(
        [str(Path(sys.executable).parent / "cgb-worker"), "webhooks", "--host", "127.0.0.1"], env
    )
    url = f"http://127.0.0.1:{port}/webhooks/whatsapp"
    for _ in range(200):
        try:
            async with stack.http.get(f"http://127.0.0.1:{admin}/healthz") as r:
                if r.status == 200:
                    break
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)

    async def drained() -> None:
        while await stack.redis.xlen("cgb:webhooks:inbox"):
            await asyncio.sleep(0.05)

    # 1. As fast as it goes: 64 posts in flight, signed beforehand.
    bodies = [(b, signed(b)) for b in (status_body(i, "sent", at) for i in range(n))]
    queue = list(reversed(bodies))
    cpu_from = cpu_seconds(proc.pid)
    started = time.monotonic()

    async def poster() -> None:
        while queue:
            body, headers = queue.pop()
            async with stack.http.post(url, data=body, headers=headers) as r:
                assert r.status == 200, r.status

    await asyncio.gather(*(poster() for _ in range(64)))
    answered = time.monotonic() - started
    await drained()
    processed = time.monotonic() - started
    cpu = cpu_seconds(proc.pid) - cpu_from
    # 2. Meta's pace: one post every 1/rate s, each timed from its send to its 200.
    paced = [(b, signed(b)) for b in (status_body(n + i, "sent", at) for i in range(int(rate * seconds)))]
    latencies: list[float] = []

    async def one(body: bytes, headers: dict[str, str]) -> None:
        sent = time.perf_counter()
        async with stack.http.post(url, data=body, headers=headers) as r:
            assert r.status == 200, r.status
        latencies.append((time.perf_counter() - sent) * 1000)

    tasks = []
    t0 = time.monotonic()
    for i, (body, headers) in enumerate(paced):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body, headers)))
    await asyncio.gather(*tasks)
    offered = len(paced) / (time.monotonic() - t0)
    await drained()
    matched = sum(
        [1 for i in range(0, total, max(1, total // 200))
         if b'"status":"sent"' in (await stack.redis.hget(f"cgb:sends:job{i}", "d:text") or b"")]
    )  # fmt: skip
    await stack.stop_worker(proc)
    return {
        "n": n,
        "cpu_ms": cpu * 1000 / n,
        "answered_rate": n / answered,
        "processed_rate": n / processed,
        "paced": len(paced),
        "offered": offered,
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "matched_sampled": matched,
        "sampled": len(range(0, total, max(1, total // 200))),
    }


async def attribution_bench(stack: Stack, people: int, per_person: int, seed: int = 7) -> Report:
    """The randomised attribution run at a larger size: real worker processes, the receiver as a process, the
    simulator posting every status shuffled, delayed (0.5 s, then up to 1.5 s more), a fifth of them twice,
    a quarter of messages without ``sent``; flows sending two messages. Reports wrong / unresolved / total,
    and the wait between two sends to one person."""
    await stack.fresh(0.2)
    phones = [f"+1202557{i:04d}" for i in range(people)]
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WABA_", "LOG_", "REDIS_"))},
        "REDIS_URL": stack.redis_url,
        "WABA_APP_SECRET": SECRET,
        "PHONE_HASH_KEY": PHONE_KEY,
        "WEBHOOK_PORT": str(port),
        "WEBHOOK_ADMIN_PORT": str(free_port()),
        "STATUS_HOLD": "30",  # a status no send can be told from is given up on after 30 s, not 5 min
    }
    receiver = await stack.start_worker(
        [str(Path(sys.executable).parent / "cgb-worker"), "webhooks", "--host", "127.0.0.1"], env
    )
    while not await stack.redis.exists(TRACKING):
        await asyncio.sleep(0.05)
    await stack.known(phones)
    config = {"webhook_url": f"http://127.0.0.1:{port}/webhooks/whatsapp", "webhook_secret": SECRET,
              "webhook_delay": 0.5, "webhook_jitter": 1.5, "webhook_duplicate_rate": 0.2,
              "webhook_drop_sent_rate": 0.25, "flow_messages": 2, "inbound_on_create": True}  # fmt: skip
    await stack.sim("POST", "/_sim/config", config)
    jobs = payloads(random.Random(seed), phones, per_person)  # noqa: S311 - a seeded mix of jobs
    started = time.monotonic()
    for job in jobs:
        await stack.pool.enqueue_job("whatsapp_send", job["body"], _job_id=job["jid"])
    env = stack.env(CGB_RATE_LIMIT="20", CGB_TEMPLATE_VISA_APPROVED="1752250957765", **knobs(20))
    workers = [await stack.start_worker(OURS, env) for _ in range(2)]
    while len(await stack.sim("GET", "/_sim/outbox")) < len(jobs) or await stack.redis.zcard("arq:queue"):
        await asyncio.sleep(0.2)
    report = Report()
    while True:  # every status posted and placed (or given up on)
        stats = await stack.sim("GET", "/_sim/webhooks")
        busy = stats["pending"] or await stack.redis.xlen("cgb:webhooks:inbox")
        if not busy and not await stack.redis.zcard("cgb:webhooks:orphans"):
            break
        await asyncio.sleep(0.2)
    report.seconds = time.monotonic() - started
    for proc in [*workers, receiver]:
        await stack.stop_worker(proc)
    await check(stack.pool, await stack.sim("GET", "/_sim/outbox"), report)
    return report


async def main(quick: bool) -> None:
    scale = 0.25 if quick else 1.0
    with tempfile.TemporaryDirectory(prefix="cgb-bench-") as tmp:
        stack = Stack(Path(tmp))
        await stack.start()
        began = time.monotonic()
        try:
            report: dict[str, Any] = {}
            # 1. Redis commands per message at the operating point.
            n = int(200 * scale) if quick else 200
            report["ours_20"] = await batch(stack, OURS, n, rate=20, latency=0.3)
            report["ours_20_tracked"] = await batch(stack, OURS, n, rate=20, latency=0.3, tracked=True)
            report["minimal_20"] = await batch(stack, MINIMAL, n, rate=20, latency=0.3)
            report["minimal_20_override"] = await batch(
                stack, MINIMAL, n, rate=20, latency=0.3, MINIMAL_WITH_OVERRIDE="1"
            )
            # 2. Rate reached with a backlog.
            report["rates"] = {}
            for rate in (10, 20, 80):
                for workers in (1, 3):
                    count = max(40, int(rate * 8 * scale))
                    report["rates"][(rate, workers)] = await batch(
                        stack, OURS, count, rate=rate, latency=0.3, workers=workers
                    )
            # 3. Idle latency.
            report["idle_ms"] = await idle_latency(stack, int(60 * scale) or 10)
            # 5. No rate limit, zero-latency CGB, against the minimal job.
            n = int(3000 * scale)
            report["ours_fast"] = await batch(stack, OURS, n, rate=0, latency=0.0)
            report["minimal_fast"] = await batch(stack, MINIMAL, n, rate=0, latency=0.0)
            report["minimal_fast_override"] = await batch(
                stack, MINIMAL, n, rate=0, latency=0.0, MINIMAL_WITH_OVERRIDE="1"
            )
            # 6. Latency-bound, 200 ms, default max_jobs.
            report["bound"] = await batch(stack, OURS, int(2000 * scale), rate=0, latency=0.2)
            # 7. Calls, lookups, memory.
            report["calls"] = await calls_per_message(stack)
            report["lookup_p99_ms"] = await cached_lookup_ms(stack, 2000)
            report["rss"] = await rss_growth(stack, int(100_000 * (0.1 if quick else 1)))
            # 8. The webhook receiver.
            report["receiver"] = await receiver_bench(stack, int(5000 * scale), 500, 10 * scale)
            report["processing"] = await processing_bench(stack.redis_url, int(20000 * scale))
            report["answering"] = await answering_bench(stack.redis_url, n=int(3000 * scale) or 500)
            # 9. Attribution under shuffled, delayed, duplicated statuses.
            report["attribution_people"] = int(40 * scale) or 10
            report["attribution"] = await attribution_bench(stack, report["attribution_people"], 5)
            # 10. The operations console over 100,000 jobs and a week of timelines (the stack's Redis, flushed
            # before and after: the seed disturbs no other part).
            report["console"] = await console_bench(stack.redis_url, jobs=10_000 if quick else 100_000)
        finally:
            await stack.stop()
        report["minutes"] = (time.monotonic() - began) / 60
    write(report, quick)


def console_section(c: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's part on the console (:mod:`benchmarks.console`)."""
    full, small = c["phases"]["full"], c["phases"]["small"]
    ov, base, og = full["overview"], full["baseline"], c["growth"]["overview"]
    ov_ok = ov["p95"] < 300
    clean = not og["grows"] and not ov["scans"]
    scanning = [name for name, page in full.items() if page["scans"]]
    growing = [name for name, g in c["growth"].items() if g["grows"]]
    rows = []
    for name, page in full.items():
        if name == "baseline":
            continue
        g = c["growth"][name]
        changed = "; ".join(f"{cmd} {a}→{b}" for cmd, (a, b) in g["changed"].items())
        scans = ", ".join(f"**{cmd.upper()} {page['commands'][cmd]['calls']}**" for cmd in page["scans"]) or "none"
        rows.append(
            f"| {name} | {page['p50']:.1f} | {page['p95']:.1f} | {small[name]['p95']:.1f} | "
            f"{g['total'][0]} → **{g['total'][1]}**{' (' + changed + ')' if changed else ''} | "
            f"{page['redis_ms']:.2f} | {scans} | {'**yes**' if g['grows'] else 'no'} | "
            f"{commands_text(page['commands'])} |"
        )
    seed = c["seed_s"]
    return [
        "## The operations console",
        "",
        "| figure | target | measured | met? |",
        "| --- | --- | --- | --- |",
        f"| the overview (`/`) with {c['jobs']:,} jobs in arq's queue and {c['days']} days of timelines "
        f"({c['jobs']:,} send logs, {c['stream']:,} status changes in the deliveries stream, {c['dead']:,} dead "
        f"letters), over HTTP | p95 < 300 ms | p50 {ov['p50']:.1f} ms, **p95 {ov['p95']:.1f} ms** ({ov['samples']} "
        f"views; with {c['small']:,} jobs: p95 {small['overview']['p95']:.1f} ms) | {'yes' if ov_ok else 'no'} |",
        f"| the overview ÷ a minimal page on the same Redis (one pipeline of `ZCARD` and `XLEN`, a trivial jinja2 "
        f"template), views alternating | report | p95 {ov['p95']:.1f} ms against {base['p95']:.1f} ms: "
        f"**{c['ratio_p95']:.1f}×** (p50 {ov['p50']:.1f} against {base['p50']:.1f} ms) | — |",
        f"| Redis commands per view of the overview, with {c['small']:,} and with {c['jobs']:,} jobs | no `KEYS`, no "
        f"scan, no count that grows with the jobs | **{og['total'][0]} → {og['total'][1]}** "
        f"({commands_text(ov['commands'])}), {ov['redis_ms']:.2f} ms of Redis time; scan-like: "
        f"{', '.join(ov['scans']) or 'none'} | {'yes' if clean else 'no'} |",
        f"| pages that issue a scan-like command ({', '.join(sorted(SCAN_LIKE)).upper()}) | report | "
        f"{'; '.join(f'{n}: ' + ', '.join(full[n]['scans']).upper() for n in scanning) or 'none'} | — |",
        f"| pages whose commands per view grow from {c['small']:,} to {c['jobs']:,} jobs | none | "
        f"{', '.join(growing) or 'none'} | {'yes' if not growing else 'no'} |",
        f"| seeding {c['jobs']:,} jobs, send logs and the rest (pipelines; not in any figure above) | report | "
        f"{seed['total']:.1f} s ({seed['base']:.1f} s the parts that do not grow, {seed['small']:.1f} s the first "
        f"{c['small']:,} jobs, {seed['rest']:.1f} s the rest); {c['dbsize']:,} keys, {c['used_mb']:.0f} MB | — |",
        "",
        f"Every page at {c['jobs']:,} jobs (ms over HTTP; the commands of one view, with {c['small']:,} jobs → with "
        f"{c['jobs']:,}; Redis time is the server's own for that view):",
        "",
        "| page | p50 | p95 | p95 with a tenth of the jobs | commands per view | Redis ms | scan-like | grows? | "
        "commands |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "How it was measured (`benchmarks/console.py`, `python -m benchmarks.console [--quick]` on its own):",
        "",
        f"- The seed is written with pipelines the way arq, the workers and the receiver write it: {c['queue']:,} "
        "jobs in `arq:queue` (`arq:job:*` encoded as `enqueue_job` encodes them; nine in ten due, over the last 20 "
        "minutes; a tenth deferred up to an hour, some with arq's try count and their tries recorded, some waiting "
        f"for the rate limit; {RUNNING} running at the head with their in-progress keys), as many send logs spread "
        "over the days (`text` sent, a `d:text` record and 2 to 4 event lines as `apply.lua` leaves them, 7 % "
        "failed with WhatsApp's codes, 3 % failed on one device and delivered on another; arq's results for the "
        "last day), the counter series for every one of them (minute buckets for 26 h, hour buckets for the span), the "
        f"deliveries stream with the newest {c['stream']:,} status changes, {c['dead']:,} dead letters (the cap), "
        f"{c['suppressed']:,} people on the suppression list (`suppress_who`), the person indexes, {WORKERS} live "
        "heartbeats and a little of the receiver's state. Numbers: +1 202 555 0100 to 0199 only.",
        "- The console is the real app (`create_console`, no token) on a TCP port of this process; each page is "
        "fetched over HTTP, one at a time, after three warm-up views, in rounds (the minimal page, the overview, "
        "then every other page) so that a busy moment of the shared machine falls on all; find-by-phone is a POST "
        "with the form's CSRF token and its cookie, timed alone.",
        "- Commands: `CONFIG RESETSTAT`, one view, `INFO commandstats` (the two left out); commands a Lua script "
        "runs count by name, so `exists`, `zrange` and the like in the overview's list are `queue_stats.lua`'s and "
        "`workers.lua`'s. Everything is measured with a tenth of the jobs first, then with all: a count that "
        "follows the number of jobs would show as a growth.",
        "- Find by phone lists a person's 50 newest jobs (`PERSON_PAGE`), each found with `locate` (five or six "
        "round trips, one after the other): its count follows the person's jobs up to those 50, not the queue; a "
        "job whose result arq still holds (a day) costs a `zscore` where an older one costs a second `get`. The "
        "suppressions page reads the whole index with `SSCAN` (redis-py's `sscan_iter`"
        ", about ten members a call) and every entry with `MGET`, whatever it shows: its count follows the "
        "suppression list, not the jobs.",
    ]


def write(r: dict[str, Any], quick: bool) -> None:
    ours, base, base_o = r["ours_20"], r["minimal_20"], r["minimal_20_override"]
    cmd_ratio = ours.commands_per_message / base.commands_per_message
    cmd_ratio_o = ours.commands_per_message / base_o.commands_per_message
    fast_ratio = r["ours_fast"].rate / r["minimal_fast"].rate
    fast_ratio_o = r["ours_fast"].rate / r["minimal_fast_override"].rate
    max_jobs = int(knobs(0)["WORKER_MAX_JOBS"])
    bound = r["bound"].rate / (max_jobs / 0.2)
    idle_p99 = percentile(r["idle_ms"], 0.99)
    first, last = r["rss"]
    growth = (last - first) / first
    rate_rows = []
    worst = 1.0
    for (rate, workers), b in r["rates"].items():
        share = b.rate / rate
        worst = min(worst, share)
        rate_rows.append(
            f"| {rate}/s | {workers} | {b.messages} | {b.rate:.2f}/s | **{share:.3f}** | {b.peak} | "
            f"{b.commands_per_message:.1f} |"
        )
    peak_ok = all(b.peak <= rate for (rate, _), b in r["rates"].items())
    calls = r["calls"]
    rec = r["receiver"]
    proc = r["processing"]
    ans = r["answering"]
    tracked = r["ours_20_tracked"]
    extra = tracked.commands_per_message - ours.commands_per_message
    tracked_ratio = tracked.commands_per_message / base.commands_per_message
    att = r["attribution"]
    att_people = r["attribution_people"]
    calls_ok = calls["known"] == 1 and calls["new"] <= 3 and calls["known, cache expired"] <= 2
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({r['minutes']:.1f} min"
        f"{', --quick: small batches, not a report' if quick else ''}), {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores, on a shared machine. Every ratio compares two "
        "figures measured in this one run.",
        "",
        "| figure | target | measured | met? |",
        "| --- | --- | --- | --- |",
        f"| Redis commands per message: `CGB_RATE_LIMIT=20`, {ours.messages} texts queued, CGB at 300 ms | "
        f"≤ 1.5× the minimal arq job's | {ours.commands_per_message:.1f} against {base.commands_per_message:.1f}: "
        f"**{cmd_ratio:.2f}×**; against the minimal job on arq with cgb-worker's one override, "
        f"{base_o.commands_per_message:.1f}: {cmd_ratio_o:.2f}× | {'yes' if cmd_ratio <= 1.5 else 'no'} |",
        f"| delivered per second ÷ `CGB_RATE_LIMIT`, backlog, 10/20/80 per s, 1 and 3 workers | ≥ 0.95; peak in "
        f"any 1 s ≤ the limit | lowest **{worst:.3f}**; peaks {'all within' if peak_ok else 'NOT all within'} "
        f"the limit (table below) | {'yes' if worst >= 0.95 and peak_ok else 'no'} |",
        f"| enqueue → request at CGB, idle queue | p99 ≤ 50 ms | p50 {statistics.median(r['idle_ms']):.1f} ms, "
        f"**p99 {idle_p99:.1f} ms** ({len(r['idle_ms'])} jobs) | {'yes' if idle_p99 <= 50 else 'no'} |",
        f"| worker CPU per message at the operating point (the first row's run, from its first send) | report | "
        f"**{ours.cpu_ms_per_message:.2f} ms** (the minimal job: {base.cpu_ms_per_message:.2f} ms) | — |",
        f"| no rate limit, zero-latency CGB: sends per second ÷ the minimal arq job's | ≥ 0.7 | "
        f"{r['ours_fast'].rate:.0f}/s against {r['minimal_fast'].rate:.0f}/s: **{fast_ratio:.2f}**; against the "
        f"minimal job with the override, {r['minimal_fast_override'].rate:.0f}/s: {fast_ratio_o:.2f} | "
        f"{'yes' if fast_ratio >= 0.7 else 'no'} |",
        f"| latency-bound, CGB at 200 ms, default `max_jobs` ({max_jobs}) | ≥ 0.85 of `max_jobs / latency` "
        f"({max_jobs / 0.2:.0f}/s) | {r['bound'].rate:.0f}/s: **{bound:.2f}** | {'yes' if bound >= 0.85 else 'no'} |",
        f"| CGB calls per message: known (cached), new, known with an expired cache | 1 / ≤ 3 / ≤ 2 | "
        f"**{calls['known']} / {calls['new']} / {calls['known, cache expired']}** | "
        f"{'yes' if calls_ok else 'no'} |",
        f"| cached contact lookup p99 | < 1 ms | **{r['lookup_p99_ms']:.2f} ms** | "
        f"{'yes' if r['lookup_p99_ms'] < 1 else 'no'} |",
        f"| RSS over {100_000 if not quick else 10_000:,} jobs (from a tenth of the way to the end) | < 10% growth | "
        f"{first:.1f} → {last:.1f} MB: **{growth * 100:+.1f}%** | {'yes' if growth < 0.10 else 'no'} |",
        "",
        "## Delivery receipts",
        "",
        "| figure | target | measured | met? |",
        "| --- | --- | --- | --- |",
        f"| Redis commands per message with a webhook receiver deployed (each send recorded for matching and "
        f"taking its person's turn), the first row's settings, a person per text | ≤ 1.5× the minimal arq job's | "
        f"{tracked.commands_per_message:.1f} against {base.commands_per_message:.1f}: "
        f"**{tracked_ratio:.2f}×** ({extra:+.1f} against the untracked run: the turn's `SET NX` and the "
        f"awaiting set's `ZADD`, in the round trip of the `sending` mark) | "
        f"{'yes' if tracked_ratio <= 1.5 else 'no'} |",
        f"| attribution: {att.messages} WhatsApp messages ({att_people} people, 5 jobs each: texts, file + text, "
        f"native templates, flows sending 2), statuses shuffled, delayed 0.5–2 s, a fifth twice, a quarter "
        f"without `sent` | no wrong attribution | wrong **{len(att.wrong)}**, unresolved {att.unresolved}, "
        f"placed {att.placed} of {att.messages} | {'yes' if not att.wrong else 'no'} |",
        f"| the wait between two sends to one person in that run (a second message waits for the first's first "
        f"status, a flow's for its turn to run out) | report | p50 {percentile(att.second_waits, 0.5):.1f} s, "
        f"p95 {percentile(att.second_waits, 0.95):.1f} s, max {max(att.second_waits):.1f} s | — |",
        f"| the receiver's webhooks per second on one core ({rec['n']:,} signed status posts, each matched to a "
        f"waiting send and applied) | report | **{1000 / rec['cpu_ms']:.0f}/s** ({rec['cpu_ms']:.2f} ms of its "
        f"CPU per webhook, request and processing); wall clock with 64 posts in flight: answered at "
        f"{rec['answered_rate']:.0f}/s, processed at {rec['processed_rate']:.0f}/s | — |",
        f"| time to the 200, at {rec['offered']:.0f} posts/s for {rec['paced']:,} posts | report | p50 "
        f"{rec['p50']:.1f} ms, **p99 {rec['p99']:.1f} ms** | — |",
        f"| the processor's throughput on one process: {proc['n']:,} stored statuses of a realistic mix (80 % "
        f"`delivered`/`read` of known wamids, 15 % `sent` matched by recipient, 5 % nobody's) | ≥ 2,000/s | "
        f"**{proc['ours_rate']:.0f}/s** ({proc['ours_cpu_ms']:.3f} ms of CPU per status); a minimal consumer "
        f"(decode, one HSET, acknowledge): {proc['base_rate']:.0f}/s, ratio {proc['ours_rate'] / proc['base_rate']:.2f}"
        f" | {'yes' if proc['ours_rate'] >= 2000 else 'no'} |",
        f"| the drain time of that backlog of {proc['n']:,} statuses | report | **{proc['ours_wall']:.1f} s** | — |",
        f"| signed POSTs answered per second by one process on one core, against a minimal aiohttp app (HMAC "
        f"check, `XADD` of the raw body), {ans['n']:,} posts, 64 in flight, {ans['turns']} turns each, the median "
        f"of each turn's ratio to the minimal app's | ≥ 0.9× | answering only (`WEBHOOK_ROLE=answer`): "
        f"{ans['ours']['rate']:.0f}/s against {ans['minimal']['rate']:.0f}/s: **{ans['ratio']:.2f}×**; in CPU per "
        f"post, {ans['ours']['cpu_ms']:.3f} against {ans['minimal']['cpu_ms']:.3f} ms: {ans['ratio_cpu']:.2f}×. "
        f"Answering and processing in one process (the default): {ans['ours_processing']['rate']:.0f}/s, "
        f"{ans['ratio_processing']:.2f}× | {'yes' if ans['ratio'] >= 0.9 else 'no'} |",
        f"| statuses matched (a sample of {rec['sampled']} sends) | all | {rec['matched_sampled']} of "
        f"{rec['sampled']} | {'yes' if rec['matched_sampled'] == rec['sampled'] else 'no'} |",
        "",
        "## Rate reached with a backlog (CGB at 300 ms, known contacts)",
        "",
        "| `CGB_RATE_LIMIT` | workers | texts | reached | ÷ limit | busiest 1 s at CGB | Redis commands per message |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rate_rows,
        "",
        *console_section(r["console"]),
        "",
        "## How it was measured",
        "",
        "- Workers are real processes started as `arq cgb_worker.WorkerSettings`, with the knobs cgb-worker "
        "resolves from `CGB_RATE_LIMIT` (`WORKER_MAX_JOBS` is twice the limit, from 10 to 100; `WORKER_POLL_DELAY` "
        "0.02 s); the minimal job (`benchmarks/minimal.py`) runs on the same stock arq Worker with the same "
        "knobs and serializer, posting the request a cached text posts, with no send log, contact lookup, "
        "rate limit or retries. It runs twice: on arq as it is (the target's baseline) and on arq with "
        "cgb-worker's one override of `Worker.start_jobs` installed (`survive_lost_claims`: a poll skips the "
        "jobs its own worker runs instead of asking Redis about each), so that what the override saves is "
        "shown apart from what the job costs.",
        "- Both log as they do by default: cgb-worker one line per job at INFO, the minimal job arq's own two.",
        "- A batch is queued before its workers start; Redis's command counts are reset then, and read once "
        "the simulator has every message, so they hold the workers' commands only (start-up included). The "
        "driver watches the simulator, not Redis.",
        "- Rates are (messages − 1) / (last request − first) at the simulator; the busiest second is the most "
        "requests in any window of one second there.",
        "- Idle latency: one job at a time, 250 ms apart, at the default limit (10/s), from just before "
        "`enqueue_job` to the request's arrival at the simulator.",
        "- Where the Redis commands of a rate-limited message go: arq's own claim, read and finish (about "
        "17), cgb-worker's send log and cache read (one round trip, two commands), the rate-limit slot (one "
        "script: four commands in Redis's count), the `sending` and `sent` marks (three). On arq as it is, "
        "every poll that finds a free slot also checks each running job in Redis (four commands each), "
        "which came to 216 commands per message here before the override; other workers' running jobs are "
        "still checked, which is what the 3-worker rows pay, and why `WORKER_MAX_JOBS` follows the rate "
        "limit (twice it): slots beyond what the limit can use would only wait, and be checked. Each message "
        "also reads its contact's 24-hour window with the cache (one `MGET`, or the cache read itself when the "
        "id is not in the worker's memory).",
        "- The receiver runs as `cgb-worker webhooks`, a process of its own (one event loop: one core), against "
        "the same Redis; each post is one `sent` status for a send recorded as the worker records it, so the "
        "figure covers the signature, the shape check, the inbox write and, in the same process, matching and "
        "applying the status. The driver shares the machine's two cores with it and with Redis, so the wall "
        "clock rates are lower bounds; the CPU figure is the receiver's own (`/proc`).",
        "- Answering (`benchmarks/answering.py`): the minimal app (`benchmarks/minimal_receiver.py`) and the "
        "receiver run side by side, each pinned to one core, the client to the other, and are measured in "
        "turns (minimal, ours, ours processing, again) so that a busy moment of the machine falls on all; "
        "the same signed `delivered` bodies each turn.",
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
