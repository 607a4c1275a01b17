"""The operations console at scale: its pages served over real HTTP against a Redis seeded as a busy week leaves it.

The seed (pipelines, written the way arq, the workers and the receiver write; timed apart from the pages):
``jobs`` jobs in arq's queue (most due, a tenth deferred, a few running with their in-progress keys, some
retrying with their tries recorded, some waiting for the rate limit), ``jobs`` send logs spread over ``days``
days (a ``d:text`` record and its 2 to 4 status events each, some failed with WhatsApp's codes; arq's results of
the last day), the counter series the workers and the receiver write (minute buckets for 26 hours, hour
buckets for the whole span), 10,000 dead letters (the store's cap), the deliveries stream up to its cap, the
per-person job indexes, live worker heartbeats, a few thousand people on the suppression list and a little
of the receiver's own state. Every number is one of the fictional +1 202 555 0100..0199.

Each page is timed over HTTP from this process, one request at a time, after a warm-up; the overview's views
alternate with a minimal page on the same Redis (one pipeline of ``ZCARD`` and ``XLEN``, a trivial jinja2
template) so that a busy moment of the machine falls on both. Redis commands per view are the server's own
counts: ``CONFIG RESETSTAT`` before one view, ``INFO commandstats`` after (commands a script runs are counted
by name too). Everything is measured twice, with a tenth of the jobs and with all of them, so a command whose
count follows the number of jobs shows.

``python -m benchmarks.console [--quick]`` starts its own ``redis-server`` (``--quick``: 10,000 jobs);
:func:`console_bench` is what ``make bench`` calls, on its stack's Redis (flushed before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jinja2
import msgspec
import redis.asyncio
from aiohttp import web
from arq.connections import ArqRedis
from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.constants import retry_key_prefix as arq_retry_prefix

from cgb_worker import __version__, create_pool, keys, series
from cgb_worker.console.app import create_console
from cgb_worker.console.auth import ConsoleAuth
from cgb_worker.deadletters import ENTRIES, INDEX, ORIGINS, PAYLOADS, DeadLetter, mask_payload
from cgb_worker.heartbeat import LIFETIMES, Heartbeat
from cgb_worker.jobstate import LastRetry, record_retry
from cgb_worker.models import SendResult
from cgb_worker.phones import mask_phone
from cgb_worker.privacy import status_kept
from cgb_worker.receipts.timeline import iso
from cgb_worker.scripts import HeartbeatScript
from cgb_worker.sends import TTL as SEND_TTL
from cgb_worker.sends import StepRecord
from cgb_worker.serialization import serialize
from cgb_worker.settings import load_receiver_settings
from cgb_worker.suppression import Scope, suppress_who

from .processing import PHONE_KEY
from .system import free_port, redis_server

keys.use_phone_key(PHONE_KEY)  # (processing.py does it too: the same stand-in key)

PHONES = [f"+1202555{n:04d}" for n in range(100, 200)]
"""+1 202 555 0100 .. 0199: numbers set aside for fiction."""
DEAD_LETTERS = 10_000
"""The dead-letter store's default cap (``DEAD_LETTER_MAX``)."""
SUPPRESSED = 3_000
STREAM_MAX = load_receiver_settings({"WABA_APP_SECRET": "bench-secret", "PHONE_HASH_KEY": PHONE_KEY}).stream_max
"""The deliveries stream's cap (``DELIVERY_STREAM_MAX``'s default)."""
WORKERS = 4
RUNNING = 8
"""Jobs running at the head of the queue, with their in-progress keys."""
KEEP_RESULT_MS = 86_400_000
"""arq keeps a finished job's result a day (``WORKER_KEEP_RESULT``)."""
BACKLOG_S = 20 * 60
"""The due jobs were enqueued over the last 20 minutes: a backlog."""
CHUNK = 5_000
"""Commands per pipeline round trip while seeding."""
SCAN_LIKE = frozenset({"keys", "scan", "sscan", "hscan", "zscan"})
FAIL_CODES = [(131026, 40), (131047, 20), (131049, 15), (131050, 10), (131056, 10), (130472, 5)]
TITLES = {
    131026: "Message undeliverable",
    131047: "Re-engagement message",
    131049: "This message was not delivered to maintain healthy ecosystem engagement.",
    131050: "User has stopped marketing messages",
    131056: "(Business Account, Consumer Account) pair rate limit hit",
    130472: "User's number is part of an experiment",
}
DEAD_MIX: list[tuple[str, str, int | None, int]] = [
    ("UndeliverableError", "WhatsApp answered 131026 for this number: not sending again", 131026, 30),
    ("OutsideWindowError", "more than 24 hours since the person last wrote and no whatsappTemplate", 131047, 15),
    ("CGBTimeoutError", "CGB did not answer within 30.0 s (POST /contacts/send_text)", None, 15),
    ("CGBServerError", "CGB answered HTTP 502 on /contacts/send_text", 502, 10),
    ("InvalidPhoneError", "'to' is not a valid phone number", None, 10),
    ("SuppressedError", "not sending a marketing message: the number is suppressed for all", None, 10),
    ("CGBBadRequestError", "CGB answered HTTP 400 on /contacts/send_text: invalid parameter", 400, 10),
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _weighted(rng: random.Random, mix: list[Any]) -> Any:
    return rng.choices(mix, weights=[m[-1] for m in mix])[0]


class _Writer:
    """A pipeline sent every :data:`CHUNK` commands."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.pipe = client.pipeline(transaction=False)
        self.queued = 0

    async def sent(self, n: int = 1) -> None:
        self.queued += n
        if self.queued >= CHUNK:
            await self.flush()

    async def flush(self) -> None:
        if self.queued:
            await self.pipe.execute()
        self.queued = 0


@dataclass
class Seeder:
    """Writes the week; :meth:`base` once, then :meth:`add_jobs` for each slice of jobs and send logs."""

    client: redis.asyncio.Redis
    days: int
    rng: random.Random
    changes: list[tuple[int, str, str, str, str]] = field(default_factory=list)
    """Every status change applied (at ms, job, status, wamid, code): the deliveries stream keeps the newest."""
    buckets: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    people: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    failed_job: str = ""
    queued_job: str = ""
    sent: int = 0
    queued: int = 0

    def job_id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def count(self, at: float, counter: str, by: int = 1) -> None:
        """What ``series.count`` (and apply.lua's tally) adds, kept to be written per hash at the end."""
        now = time.time()
        hour = series.hour_of(at)
        if now - at < series.MINUTE_TTL:
            self.buckets[keys.series_minutes(hour)][series.minute_field(at, counter)] += by
        self.buckets[keys.series_hour(hour)][counter] += by

    async def base(self) -> None:
        """What does not grow with the jobs: dead letters (at the cap), suppressions, heartbeats, running jobs,
        the receiver's own keys."""
        now = time.time()
        w = _Writer(self.client)
        span = self.days * 86400
        for i in range(DEAD_LETTERS):
            job_id = self.job_id()
            error_type, error, code, _ = _weighted(self.rng, DEAD_MIX)
            failed_at = now - self.rng.uniform(60, span)
            payload = {"to": PHONES[i % len(PHONES)], "message": f"Your order {i} has shipped", "category": "utility"}
            entry = DeadLetter(
                job_id=job_id, function="whatsapp_send", payload=mask_payload(payload), error_type=error_type,
                error=error, attempts=self.rng.choice([1, 1, 3, 5]), enqueued_at=failed_at - 40, failed_at=failed_at,
                code=code,
            )  # fmt: skip
            w.pipe.hset(ENTRIES, mapping={job_id: msgspec.msgpack.encode(entry)})
            w.pipe.hset(PAYLOADS, mapping={job_id: msgspec.msgpack.encode(payload)})
            w.pipe.hset(ORIGINS, mapping={job_id: job_id})
            w.pipe.zadd(INDEX, {job_id: failed_at})
            self.count(failed_at, "dead")
            await w.sent(4)
        # the jobs being run: the head of the queue, each with arq's in-progress key and try count
        for _ in range(RUNNING):
            job_id = self.job_id()
            score = int((now - BACKLOG_S - 60) * 1000) + self.rng.randrange(60_000)
            self._enqueue(w.pipe, job_id, score, score)
            w.pipe.set(in_progress_key_prefix + job_id, b"1", px=3_600_000)
            w.pipe.set(arq_retry_prefix + job_id, b"1", ex=88_400)
            self.people[keys.who(PHONES[self.queued % len(PHONES)])][job_id] = score
            await w.sent(4)
        # the receiver's own: a few stored webhooks, held statuses, sends waiting for their first status
        w.pipe.set(keys.TRACKING, b"1", ex=3600)
        for i in range(12):
            w.pipe.xadd(keys.INBOX, {"body": b'{"object":"whatsapp_business_account","entry":[]}', "at": i})
        for i in range(5):
            w.pipe.zadd(keys.ORPHANS, {f"held{i}".encode(): (now + 30) * 1000})
        for i in range(30):
            rec = StepRecord(f"awaiting{i}", "text", PHONES[i], int(now * 1000) - 2000, True)
            w.pipe.zadd(keys.AWAITING, {str(rec.member): 0})
        await w.flush()
        await self.heartbeats()
        # the suppression list: a few of the fictional numbers, the rest people known by their hash only
        reasons: list[tuple[Scope, str]] = [
            ("all", "keyword"), ("marketing", "131050"), ("all", "cgb_unsubscribed"), ("all", "operator")
        ]  # fmt: skip
        whos = [keys.who(p) for p in PHONES[90:]] + [keys.who(f"bench-person-{i}") for i in range(SUPPRESSED - 10)]
        for start in range(0, len(whos), 100):
            calls = []
            for who in whos[start : start + 100]:
                scope, reason = self.rng.choice(reasons)
                at_ms = int((now - self.rng.uniform(0, 90 * 86400)) * 1000)
                calls.append(suppress_who(self.client, who, scope=scope, reason=reason, at_ms=at_ms))
            await asyncio.gather(*calls)

    async def heartbeats(self) -> None:
        """Live heartbeats for :data:`WORKERS` workers (written again before each measurement: they expire)."""
        script = HeartbeatScript(self.client)
        now = time.time()
        for k in range(WORKERS):
            beat = Heartbeat(
                id=f"bench-worker-{k}:{4100 + k}:a1b2c3", host=f"bench-worker-{k}", pid=4100 + k, version=__version__,
                queue=default_queue_name, max_jobs=20, started=now - 86400, interval=60.0, poll_limit=100.0,
                poll_age=0.05, running=2, jobs_complete=10_000 + k, jobs_failed=12, jobs_retried=40,
            )  # fmt: skip
            await script.write(
                beat.id, msgspec.json.encode(beat), ttl_ms=int(60 * LIFETIMES * 1000), now_ms=int(now * 1000)
            )

    def _enqueue(self, pipe: Any, job_id: str, enqueued_ms: int, score: int) -> None:
        """What ``ArqRedis.enqueue_job`` writes: the job (expiring a day after it falls due) and its queue entry."""
        payload = {"to": PHONES[self.queued % len(PHONES)], "message": f"Your order {self.queued} has shipped"}
        job = serialize({"t": None, "f": "whatsapp_send", "a": [payload], "k": {}, "et": enqueued_ms})
        pipe.psetex(job_key_prefix + job_id, score - enqueued_ms + KEEP_RESULT_MS, job)
        pipe.zadd(default_queue_name, {job_id: score})
        self.queued += 1

    async def add_jobs(self, n: int) -> None:
        """``n`` more jobs in the queue and ``n`` more send logs over the span; the series, the person indexes
        and the deliveries stream brought up to date."""
        now = time.time()
        now_ms = int(now * 1000)
        w = _Writer(self.client)
        retrying: list[str] = []
        for _ in range(n):
            job_id = self.job_id()
            if self.rng.random() < 0.9:  # due: the backlog
                score = now_ms - self.rng.randrange(BACKLOG_S * 1000)
                enqueued = score
            else:  # deferred: retries, the rate limit, scheduled sends
                enqueued = now_ms - self.rng.randrange(BACKLOG_S * 1000)
                score = now_ms + self.rng.randrange(1000, 3_600_000)
                kind = self.rng.random()
                if kind < 0.02:
                    w.pipe.zadd(keys.RATE_WAITING, {job_id: enqueued})
                elif kind < 0.3:
                    w.pipe.set(arq_retry_prefix + job_id, b"1", ex=88_400)
                    if len(retrying) < 200:
                        retrying.append(job_id)
            if not self.queued_job and score <= now_ms:
                self.queued_job = job_id
            self._enqueue(w.pipe, job_id, enqueued, score)
            await w.sent(3)
        await w.flush()
        for job_id in retrying:  # their tries, as the job records them
            await record_retry(self.client, job_id, self._retry(now - 30, counted=True))
        for _ in range(n):
            await self._send(w, now)
        await w.flush()
        await self._series(w, now)
        await self._people(w)
        await self._stream(w)
        if not self.failed_job:
            raise RuntimeError("no failed send was seeded")

    def _retry(self, at: float, *, counted: bool) -> LastRetry:
        return LastRetry(
            error_type="CGBTimeoutError", attempt=1, job_try=1, at=at, retry_in=12.5, counted=counted,
            status=None, code=None, endpoint="/contacts/send_text",
        )  # fmt: skip

    async def _send(self, w: _Writer, now: float) -> None:
        """One finished job's send log as the worker and the receiver leave it: the step marked sent, its
        delivery record with the statuses applied (apply.lua's shape), their event lines, the job's result."""
        i = self.sent
        self.sent += 1
        job_id = self.job_id()
        phone = PHONES[i % len(PHONES)]
        digits = phone.lstrip("+")
        request_ms = int((now - self.rng.uniform(5, self.days * 86400 - 600)) * 1000)
        rec = StepRecord(job_id, "text", phone, request_ms, True, category="utility")
        wamid = f"wamid.BENCH{i:012d}"
        roll = self.rng.random()
        code = 0
        if roll < 0.65:
            path = ["sent", "delivered", "read"]
        elif roll < 0.90:
            path = ["sent", "delivered"]
        elif roll < 0.97:
            path = ["sent", "failed"]
            code = _weighted(self.rng, FAIL_CODES)[0]
        else:  # failed on one device, delivered on another
            path = ["sent", "failed", "delivered", "read"]
            code = 131026
        offsets = {"sent": 1.5, "failed": 3.0, "delivered": 4.0, "read": self.rng.uniform(30, 6 * 3600)}
        state: dict[str, Any] = msgspec.json.decode(rec.fields()["d:text"])
        state.update(wamid=wamid, match="recipient", seen="|")
        ranks = {"sent": 2, "failed": 3, "delivered": 4, "read": 5}
        reached = ""
        lines: list[bytes] = []
        self.count(request_ms / 1000, "accepted")
        for status in path:
            at_ms = request_ms + int(offsets[status] * 1000)
            if at_ms > now * 1000:
                break
            raw: dict[str, Any] = {
                "id": wamid,
                "status": status,
                "timestamp": str(at_ms // 1000),
                "recipient_id": digits,
            }
            if status == "sent":
                raw["conversation"] = {"id": f"c{i}", "origin": {"type": "utility"}}
                raw["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "utility"}
            if status == "failed":
                raw["errors"] = [{"code": code, "title": TITLES[code], "message": TITLES[code],
                                  "error_data": {"details": TITLES[code]}}]  # fmt: skip
            received = at_ms + self.rng.randrange(50, 900)
            lines.append(
                msgspec.json.encode(
                    {"status": status, "at": iso(at_ms // 1000 * 1000), "received": iso(received), "wamid": wamid,
                     "meta": status_kept(raw)}
                )
            )  # fmt: skip
            state["seen"] += f"{status}/{wamid}|"
            if ranks[status] > ranks.get(state["status"], 0):
                state["status"] = status
                self.changes.append((received, job_id, status, wamid, str(code) if status == "failed" else ""))
                if status == "failed":
                    state["error"] = {"code": code, "title": TITLES[code], "details": TITLES[code]}
            if status == "failed":
                if "f" not in reached:
                    reached += "f"
                    self.count(received / 1000, "failed")
                    self.count(received / 1000, f"code:{code}")
            else:
                for stage, flag in (("sent", "s"), ("delivered", "d"), ("read", "r")):
                    if ranks[status] >= ranks[stage] and flag not in reached:
                        reached += flag
                        self.count(received / 1000, stage)
        state["n"] = reached
        if state["status"] == "failed" and not self.failed_job and len(lines) == 2:
            self.failed_job = job_id
        if self.rng.random() < 0.02:
            self.count(request_ms / 1000 - 30, "retried")
        result = SendResult(
            success=True, contact_id=f"9{i % 100:08d}", to=mask_phone(phone), timestamp=iso(request_ms + 900),
            kind="text", window="open",
        )  # fmt: skip
        log = keys.sends(job_id)
        w.pipe.hset(
            log,
            mapping={"text": b"sent", "d:text": msgspec.json.encode(state), "e:text": b"\n".join(lines) + b"\n",
                     "result": msgspec.msgpack.encode(result)},
        )  # fmt: skip
        age_s = int(now - request_ms / 1000)
        w.pipe.expire(log, max(60, SEND_TTL - age_s))
        commands = 2
        if age_s * 1000 < KEEP_RESULT_MS:  # arq still holds its result
            payload = {"to": phone, "message": f"Your order {i} has shipped"}
            stored = serialize(
                {"t": 1, "f": "whatsapp_send", "a": [payload], "k": {}, "et": request_ms - 800, "s": True,
                 "r": result, "st": request_ms - 100, "ft": request_ms + 900, "q": default_queue_name, "id": job_id}
            )  # fmt: skip
            w.pipe.psetex(result_key_prefix + job_id, KEEP_RESULT_MS - age_s * 1000, stored)
            commands += 1
        self.people[rec.who][job_id] = request_ms - 100
        await w.sent(commands)

    async def _series(self, w: _Writer, now: float) -> None:
        """The counters written so far, per bucket (``HINCRBY``, as ``series.count`` does), each bucket expiring
        when it would have; then forgotten, so that the next slice adds to them."""
        for key, counters in self.buckets.items():
            minute = key.startswith(keys.series_minutes(0)[:-1])
            start = int(key.rsplit(":", 1)[1]) * 3600
            left = int((series.MINUTE_TTL if minute else series.HOUR_TTL) - (now - start))
            if left <= 0:
                continue
            for counter, n in counters.items():
                w.pipe.hincrby(key, counter, n)
            w.pipe.expire(key, left)
            await w.sent(len(counters) + 1)
        await w.flush()
        self.buckets.clear()

    async def _people(self, w: _Writer) -> None:
        """Each job in the person index of the day it was tried, as the worker's recorder writes it."""
        for who, jobs in self.people.items():
            for job_id, at_ms in jobs.items():
                day = keys.jobs_on(int(at_ms // 86_400_000))
                w.pipe.zadd(day, {series.index_member(who, at_ms, job_id): 0})
                w.pipe.expire(day, series.INDEX_TTL, nx=True)
                await w.sent(2)
        await w.flush()
        self.people.clear()

    async def _stream(self, w: _Writer) -> None:
        """The deliveries stream rebuilt with the newest :data:`STREAM_MAX` status changes, ids by their time."""
        self.changes.sort()
        del self.changes[: max(0, len(self.changes) - STREAM_MAX)]
        await self.client.delete(keys.DELIVERIES)
        last, seq = -1, 0
        for at, job, status, wamid, code in self.changes:
            seq = seq + 1 if at <= last else 0
            last = max(last, at)
            w.pipe.xadd(
                keys.DELIVERIES,
                {"job": job, "step": "text", "status": status, "wamid": wamid, "error": code, "at": at},
                id=f"{last}-{seq}",
            )
            await w.sent()
        await w.flush()


# -- serving and measuring -------------------------------------------------------------------------------------

_MINIMAL = jinja2.Environment(autoescape=True).from_string(
    "<!doctype html><title>Queue</title><p>{{ queued }} queued, {{ inbox }} stored webhooks</p>"
)


def minimal_app(client: redis.asyncio.Redis) -> web.Application:
    """The baseline: one small pipeline and a trivial template."""

    async def page(request: web.Request) -> web.Response:
        async with client.pipeline(transaction=False) as pipe:
            pipe.zcard(default_queue_name)
            pipe.xlen(keys.INBOX)
            queued, inbox = await pipe.execute()
        return web.Response(text=_MINIMAL.render(queued=queued, inbox=inbox), content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    return app


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


View = Callable[[], Awaitable[float]]


def _views(http: aiohttp.ClientSession, console: str, base: str, seeder: Seeder) -> dict[str, View]:
    """Each page to time, as a call that loads it once and returns its seconds (the status checked)."""

    def get(url: str) -> View:
        async def view() -> float:
            started = time.perf_counter()
            async with http.get(url) as resp:
                await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url}: HTTP {resp.status}")
            return time.perf_counter() - started

        return view

    async def find() -> float:
        async with http.get(console + "/find") as resp:  # the form's CSRF token (its cookie kept by the jar)
            found = re.search(r'name="csrf" value="([0-9a-f]+)"', await resp.text())
        assert found is not None
        started = time.perf_counter()
        async with http.post(console + "/find", data={"csrf": found.group(1), "phone": PHONES[0]}) as resp:
            text = await resp.text()
        if resp.status != 200 or "person-jobs" not in text:
            raise RuntimeError(f"/find: HTTP {resp.status}, no jobs listed")
        return time.perf_counter() - started

    return {
        "overview": get(console + "/"),
        "baseline": get(base + "/"),
        "job, delivery failed, with tries": get(f"{console}/jobs/{seeder.failed_job}"),
        "job, queued": get(f"{console}/jobs/{seeder.queued_job}"),
        "failures": get(console + "/failures"),
        "failures ?code=131026": get(console + "/failures?code=131026"),
        "find by phone (POST)": find,
        "suppressions": get(console + "/suppressions"),
    }


async def commands_of(client: redis.asyncio.Redis, view: View) -> dict[str, dict[str, int]]:
    """The Redis commands one view costs, by name: {name: {calls, usec}} (the reset and the read left out)."""
    await client.config_resetstat()
    await view()
    stats = await client.info("commandstats")
    out: dict[str, dict[str, int]] = {}
    for name, v in stats.items():
        command = name.removeprefix("cmdstat_")
        if command in ("info", "config|resetstat"):
            continue
        out[command] = {"calls": int(v["calls"]), "usec": int(v["usec"])}
    return out


async def measure(client: redis.asyncio.Redis, views: dict[str, View], *, overview: int, others: int) -> dict[str, Any]:
    """Timings (ms) and command counts for each page. The views go in rounds (the baseline, the overview, then
    each other page while it has samples to take), so that a busy moment of the shared machine falls on all;
    the seed this process still holds is frozen out of the garbage collector's way meanwhile."""
    for view in views.values():  # warm-up: connections, scripts loaded, templates compiled
        for _ in range(3):
            await view()
    gc.collect()
    gc.freeze()
    try:
        times: dict[str, list[float]] = {name: [] for name in views}
        for turn in range(max(overview, others)):
            for name, view in views.items():
                if turn < (overview if name in ("overview", "baseline") else others):
                    times[name].append(await view() * 1000)
    finally:
        gc.unfreeze()
    pages: dict[str, Any] = {}
    for name, view in views.items():
        counted = await commands_of(client, view)
        pages[name] = {
            "p50": percentile(times[name], 0.5),
            "p95": percentile(times[name], 0.95),
            "samples": len(times[name]),
            "commands": counted,
            "calls": sum(c["calls"] for c in counted.values()),
            "redis_ms": sum(c["usec"] for c in counted.values()) / 1000,
            "scans": sorted(c for c in counted if c in SCAN_LIKE),
        }
    return pages


async def console_bench(redis_url: str, *, jobs: int = 100_000, days: int = 7, seed: int = 23) -> dict[str, Any]:
    """The console's pages at ``jobs // 10`` and at ``jobs`` jobs (and as many send logs over ``days`` days):
    times, Redis commands per view, what grows; the seeding's own time."""
    client = redis.asyncio.Redis.from_url(redis_url)
    pool: ArqRedis = await create_pool(redis_url, ride_out_outages=False)
    seeder = Seeder(client, days, random.Random(seed))  # noqa: S311 - a seeded mix, not a secret
    runners: list[web.AppRunner] = []
    small = max(1, jobs // 10)
    out: dict[str, Any] = {"jobs": jobs, "small": small, "days": days, "seed_s": {}, "phases": {}}
    try:
        await client.flushdb()
        began = time.perf_counter()
        await seeder.base()
        out["seed_s"]["base"] = time.perf_counter() - began
        began = time.perf_counter()
        await seeder.add_jobs(small)
        out["seed_s"]["small"] = time.perf_counter() - began
        console, url = await _serve(create_console(pool, ConsoleAuth(None, pool)))
        runners.append(console)
        base, base_url = await _serve(minimal_app(client))
        runners.append(base)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            views = _views(http, url, base_url, seeder)
            await seeder.heartbeats()
            out["phases"]["small"] = await measure(client, views, overview=30, others=10)
            began = time.perf_counter()
            await seeder.add_jobs(jobs - small)
            out["seed_s"]["rest"] = time.perf_counter() - began
            await seeder.heartbeats()
            memory = await client.info("memory")
            out["dbsize"] = int(await client.dbsize())
            out["used_mb"] = int(memory["used_memory"]) / 2**20
            out["queue"] = int(await client.zcard(default_queue_name))
            out["dead"] = int(await client.zcard(INDEX))
            out["stream"] = int(await client.xlen(keys.DELIVERIES))
            out["suppressed"] = int(await client.scard(keys.SUPPRESSED_INDEX))
            out["phases"]["full"] = await measure(client, views, overview=40, others=20)
        small_pages, full_pages = out["phases"]["small"], out["phases"]["full"]
        out["growth"] = {
            name: growth(small_pages[name]["commands"], full_pages[name]["commands"]) for name in full_pages
        }
        overview = full_pages["overview"]
        out["ratio_p95"] = overview["p95"] / full_pages["baseline"]["p95"]
        out["met"] = overview["p95"] < 300 and not out["growth"]["overview"]["grows"] and not overview["scans"]
    finally:
        for runner in runners:
            await runner.cleanup()
        await client.flushdb()
        await pool.aclose()
        await client.aclose()
    out["seed_s"]["total"] = sum(out["seed_s"].values())
    return out


def growth(small: dict[str, dict[str, int]], full: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Calls per view with a tenth of the jobs and with all of them: the totals, each command whose count changed,
    and whether the total grew."""
    names = sorted(set(small) | set(full))
    calls = {n: (small.get(n, {}).get("calls", 0), full.get(n, {}).get("calls", 0)) for n in names}
    total = (sum(a for a, _ in calls.values()), sum(b for _, b in calls.values()))
    return {"total": total, "changed": {n: c for n, c in calls.items() if c[0] != c[1]}, "grows": total[1] > total[0]}


def commands_text(commands: dict[str, dict[str, int]]) -> str:
    """``evalsha 3, hgetall 84, …``, the most called first, scan-like ones in capitals."""
    ordered = sorted(commands.items(), key=lambda c: (-c[1]["calls"], c[0]))
    return ", ".join(f"{name.upper() if name in SCAN_LIKE else name} {c['calls']}" for name, c in ordered)


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"{r['jobs']:,} jobs and as many send logs over {r['days']} days ({r['small']:,} first); "
        f"seeding {r['seed_s']['total']:.1f} s (base {r['seed_s']['base']:.1f}, first slice "
        f"{r['seed_s']['small']:.1f}, the rest {r['seed_s']['rest']:.1f}); {r['dbsize']:,} keys, "
        f"{r['used_mb']:.0f} MB; stream {r['stream']:,}, "
        f"{r['dead']:,} dead letters, {r['suppressed']:,} suppressed",
        "",
        f"{'page':36} {'p50 ms':>8} {'p95 ms':>8} {'at 1/10':>8} {'calls':>6} {'Redis ms':>9}  grows",
    ]
    for name, page in r["phases"]["full"].items():
        small = r["phases"]["small"][name]
        g = r["growth"][name]
        changed = ", ".join(f"{c} {a}→{b}" for c, (a, b) in g["changed"].items())
        grows = (
            f"{'GROWS' if g['grows'] else 'no'} ({g['total'][0]}→{g['total'][1]}{'; ' + changed if changed else ''})"
        )
        lines.append(
            f"{name:36} {page['p50']:8.1f} {page['p95']:8.1f} {small['p95']:8.1f} {page['calls']:6d} "
            f"{page['redis_ms']:9.2f}  {grows}"
        )
    lines.append("")
    for name, page in r["phases"]["full"].items():
        lines.append(f"{name}: {commands_text(page['commands'])}")
    lines.append("")
    lines.append(
        f"overview p95 {r['phases']['full']['overview']['p95']:.1f} ms against the baseline's "
        f"{r['phases']['full']['baseline']['p95']:.1f} ms: {r['ratio_p95']:.1f}×; target < 300 ms, no scan, no growth: "
        f"{'met' if r['met'] else 'NOT met'}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="10,000 jobs instead of 100,000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cgb-console-bench-") as tmp, redis_server(tmp) as url:
        started = time.perf_counter()
        r = asyncio.run(console_bench(url, jobs=10_000 if args.quick else 100_000))
    print(summary(r))
    print(f"\n{(time.perf_counter() - started) / 60:.1f} min in all ({Path(tmp).name})")


if __name__ == "__main__":
    main()
