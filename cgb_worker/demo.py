"""``make demo``: the whole product on one machine, against the CGB simulator.

Starts a throwaway Redis, the simulator, a real ``arq cgb_worker.WorkerSettings`` process and the webhook
receiver (``cgb-worker webhooks``, to which the simulator posts signed status webhooks), enqueues a handful of
representative jobs, waits for them, prints what happened (each job's outcome and tries, what the simulated
WhatsApp outbox received, how many CGB calls were made, and each message's delivery status), stops
everything it started, and exits 0 only when every job ended as expected and every sent message was read.

``make console-demo`` (``python -m cgb_worker.demo --console``) then keeps it all running and starts the
operations console (``cgb-worker console``, this machine only, no token) over the demo's data, printing its
address; Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .errors import CGBWorkerError
from .keys import TRACKING
from .phones import mask_phone
from .receipts.timeline import delivery
from .worker import create_pool

TOKEN = "sim-token"  # noqa: S105 - the simulator's documented token
APP_SECRET = "demo-app-secret"  # noqa: S105 - the demo's own, shared with its simulator
FAULTY = "+972500000005"
VISA_TEMPLATE = {"name": "visa_approved", "language": "en", "body": ["Dana"]}


@dataclass
class Case:
    title: str
    payload: dict[str, Any]
    expect: str
    """``sent`` or the name of the error class the job must fail with."""
    expect_tries: int = 1
    job: Any = None
    outcome: Any = None
    job_try: int | None = None


def cases() -> list[list[Case]]:
    """Batches run one after the other (the second text must find the contact the first one created)."""
    return [
        [
            Case(
                "text to a new contact", {"to": "+972 50-000-0001", "message": "Your application was received."}, "sent"
            ),
            Case(
                "template with variables",
                {
                    "to": "+972500000002",
                    "template": "visa_approved",
                    "variables": {"first_name": "Dana", "visa_type": "B-2"},
                },
                "sent",
            ),
            Case(
                "file (a document)",
                {
                    "to": "+12025550100",
                    "fileUrl": "https://files.example.test/visa.pdf",
                    "fileType": "document",
                    "message": "Your visa is attached.",
                },
                "sent",
            ),
            Case("invalid phone", {"to": "+972 12", "message": "never sent"}, "InvalidPhoneError"),
            Case("two CGB 503s, then success", {"to": FAULTY, "message": "Documents needed: passport."}, "sent", 3),
        ],
        [
            Case("text to the same contact (cached)", {"to": "+972500000001", "message": "Visa approved."}, "sent"),
            Case(
                "unknown template, falls back to text",
                {"to": "+972500000001", "template": "visa_rejected", "message": "Please call the consulate."},
                "sent",
            ),
            Case(
                "native template, document header",
                {
                    "to": "+972500000001",
                    "whatsappTemplate": {
                        "name": "visa_approval_file_phone",
                        "language": "he",
                        "body": ["Dana", "Israel"],
                        "header": {"document": {"url": "https://files.example.test/v.pdf", "filename": "visa.pdf"}},
                        "buttons": [{"index": 0, "url": "A1B2C3"}],
                    },
                },
                "sent",
            ),
            Case(
                "text or template: window open, so text",
                {"to": "+12025550100", "message": "Visa approved.", "whatsappTemplate": VISA_TEMPLATE},
                "sent",
            ),
        ],
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """Redis, the simulator and one worker, as child processes."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_url = ""
        self.sim_url = ""
        self.worker_log = workdir / "worker.log"
        self.receiver_log = workdir / "receiver.log"
        self.receiver_url = ""
        self.receiver_admin = ""
        self.phone_key = secrets.token_hex(32)
        """A fresh ``PHONE_HASH_KEY`` per run, shared by the worker and the receiver."""

    def start(self) -> None:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise SystemExit("demo: redis-server is not installed (make demo installs it)")
        redis_port, sim_port, receiver_port, admin_port = _free_port(), _free_port(), _free_port(), _free_port()
        self._spawn(
            [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir)]
        )
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self._spawn(
            [sys.executable, "-m", "cgb_worker.simulator", "--port", str(sim_port), "--token", TOKEN, "--seed", "1"]
        )
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "METRICS_"))},
            "CGB_API_URL": self.sim_url + "/api",
            "CGB_API_KEY": TOKEN,
            "PHONE_HASH_KEY": self.phone_key,
            "REDIS_URL": self.redis_url,
            "CGB_TEMPLATE_VISA_APPROVED": "1752250957765",
            "CGB_RETRY_BASE_DELAY": "0.2",
            "CGB_RETRY_MAX_DELAY": "1",
            "CGB_TIMEOUT": "5000",
        }
        log = self.worker_log.open("wb")
        self._spawn([sys.executable, "-m", "arq", "cgb_worker.WorkerSettings"], env=env, stdout=log, stderr=log)
        receiver_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "WABA_"))},
            "REDIS_URL": self.redis_url,
            "WABA_APP_SECRET": APP_SECRET,
            "PHONE_HASH_KEY": self.phone_key,
            "WEBHOOK_PORT": str(receiver_port),
            "WEBHOOK_ADMIN_PORT": str(admin_port),
        }
        log = self.receiver_log.open("wb")
        cli = str(Path(sys.executable).parent / "cgb-worker")
        self._spawn([cli, "webhooks", "--host", "127.0.0.1"], env=receiver_env, stdout=log, stderr=log)
        self.receiver_url = f"http://127.0.0.1:{receiver_port}"
        self.receiver_admin = f"http://127.0.0.1:{admin_port}"

    def start_console(self) -> str:
        """``cgb-worker console`` on a free loopback port over the demo's Redis; its address once it listens."""
        port = _free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "CONSOLE_", "LOG_"))},
            "REDIS_URL": self.redis_url,
            "PHONE_HASH_KEY": self.phone_key,
            "CONSOLE_PORT": str(port),
        }
        cli = str(Path(sys.executable).parent / "cgb-worker")
        log = self.workdir / "console.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([cli, "console"], env=env, stdout=out, stderr=out)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while "console on http://" not in log.read_text(errors="replace"):  # it says so once it listens
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: the console did not start:\n" + log.read_text(errors="replace"))
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}/"

    def _spawn(self, args: list[str], **kwargs: Any) -> None:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        self.procs.append(subprocess.Popen(args, **kwargs))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _wait_ready(stack: Stack, http: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with (
                http.get(stack.sim_url + "/_sim/stats") as resp,
                http.get(stack.receiver_admin + "/healthz") as rr,
            ):
                if resp.status == 200 and rr.status == 200 and b"ready" in stack.worker_log.read_bytes():
                    return
        except aiohttp.ClientError:
            pass
        if any(p.poll() is not None for p in stack.procs) or time.monotonic() > deadline:
            raise SystemExit("demo: the stack did not start:\n" + stack.worker_log.read_text(errors="replace"))
        await asyncio.sleep(0.1)


async def _run(stack: Stack) -> int:
    async with aiohttp.ClientSession() as http:
        await _wait_ready(stack, http)
        # The demo's contacts have just written to us, so their 24-hour window is open; the simulator posts
        # WhatsApp's statuses to the receiver.
        config = {
            "inbound_on_create": True,
            "webhook_url": stack.receiver_url + "/webhooks/whatsapp",
            "webhook_secret": APP_SECRET,
        }
        await http.post(stack.sim_url + "/_sim/config", json=config)
        await http.post(
            stack.sim_url + "/_sim/faults",
            json={"status": 503, "count": 2, "path": f"/contacts/{FAULTY[1:]}/send/text$"},
        )
        pool = await create_pool(stack.redis_url)
        batches = cases()
        started = time.monotonic()
        deliveries: dict[str, Any] = {}
        try:
            await _until(lambda: pool.exists(TRACKING))  # the receiver is on: the worker records sends for it
            for number, batch in enumerate(batches):
                if number == 1:
                    # the document's recipient writes back (WhatsApp posts it to the receiver): window open
                    await http.post(stack.sim_url + "/_sim/inbound", json={"phone": "+12025550100"})
                    await asyncio.sleep(1.0)
                for case in batch:
                    case.job = await pool.enqueue_job("whatsapp_send", case.payload)
                for case in batch:
                    try:
                        case.outcome = await case.job.result(timeout=60)
                    except CGBWorkerError as exc:
                        case.outcome = exc
            for batch in batches:
                for case in batch:
                    info = await case.job.info()
                    case.job_try = info.job_try if info is not None else None
            await _wait_webhooks(stack, http)
            for batch in batches:
                for case in batch:
                    deliveries[case.job.job_id] = await delivery(pool, case.job.job_id)
        finally:
            await pool.aclose()
        elapsed = time.monotonic() - started
        async with http.get(stack.sim_url + "/_sim/outbox") as resp:
            outbox = await resp.json()
        async with http.get(stack.sim_url + "/_sim/stats") as resp:
            stats = await resp.json()
    return _report([c for b in batches for c in b], outbox, stats, elapsed, deliveries)


async def _until(check: Any) -> None:
    deadline = time.monotonic() + 30
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit("demo: the webhook receiver did not start")
        await asyncio.sleep(0.05)


async def _wait_webhooks(stack: Stack, http: aiohttp.ClientSession) -> None:
    """Until the simulator has posted every status and the receiver has taken them in (a second or two)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with http.get(stack.sim_url + "/_sim/webhooks") as resp:
            state = await resp.json()
        if state["pending"] == 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # the receiver processes apart from the request


def _report(
    all_cases: list[Case],
    outbox: list[dict[str, Any]],
    stats: dict[str, Any],
    elapsed: float,
    deliveries: dict[str, Any],
) -> int:
    bad = 0
    print("\ncgb-worker demo: a real worker, a real Redis, the CGB simulator\n")
    print(f"{'job':<40} {'outcome':<34} {'tries':>5}  ok")
    for case in all_cases:
        tries = case.job_try
        if isinstance(case.outcome, dict):
            tries = case.outcome["attempts"]  # rate-limit deferrals are not attempts
            extra = " (fallback)" if case.outcome.get("fallback") else ""
            got = f"sent {case.outcome['kind']}{extra}"
            ok = case.expect == "sent" and tries == case.expect_tries
        else:
            got = f"failed: {type(case.outcome).__name__}"
            ok = type(case.outcome).__name__ == case.expect and tries == case.expect_tries
        bad += not ok
        print(f"{case.title:<40} {got:<34} {tries if tries is not None else '?':>5}  {'yes' if ok else 'NO'}")
    print(f"\nWhatsApp outbox (simulated), {len(outbox)} message(s):")
    for m in outbox:
        what = m.get("text") or m.get("url") or (m.get("template") or {}).get("name")
        print(f"  {mask_phone(m['phone']):<16} {m['kind']:<5} {m['status']:<10} {what}")
    counts = {k: v for k, v in stats["counts"].items() if k != "total"}
    print(
        f"\nCGB calls: {stats['counts'].get('total', 0)} in all: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    print(f"contacts created: {counts.get('create_contact', 0)} for {len({m['phone'] for m in outbox})} numbers")
    print("\nDelivery, from WhatsApp's status webhooks (cgb-worker webhooks):")
    for case in all_cases:
        found = deliveries.get(case.job.job_id)
        if found is None:
            print(f"  {case.title:<40} nothing sent")
            if case.expect == "sent":
                bad += 1
            continue
        steps = ", ".join(f"{s.step} {s.status}" for s in found.steps)
        print(f"  {case.title:<40} {found.status:<10} {steps}")
        bad += found.status != "read"
    print(f"\n{len(all_cases) - bad} of {len(all_cases)} jobs ended as expected, in {elapsed:.1f} s")
    return 0 if bad == 0 else 1


def main() -> None:
    console = "--console" in sys.argv[1:]
    workdir = Path(tempfile.mkdtemp(prefix="cgb-demo-"))
    stack = Stack(workdir)
    try:
        stack.start()
        code = asyncio.run(_run(stack))
        if console:
            _keep_serving(stack)
    finally:
        stack.stop()
    if code:
        print("\nworker log:\n" + stack.worker_log.read_text(errors="replace")[-4000:], file=sys.stderr)
        print("\nreceiver log:\n" + stack.receiver_log.read_text(errors="replace")[-2000:], file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    raise SystemExit(code)


def _keep_serving(stack: Stack) -> None:
    """The console over the demo's data, until Ctrl-C or SIGTERM (the worker and receiver keep running, so jobs
    enqueued meanwhile show up too)."""
    stopped = False

    def stop(_sig: int, _frame: Any) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    address = stack.start_console()
    print(f"\nconsole: {address} (the demo's Redis at {stack.redis_url}; Ctrl-C stops everything)", flush=True)
    while not stopped:
        signal.pause()
    print("demo stopped", flush=True)


if __name__ == "__main__":
    main()
