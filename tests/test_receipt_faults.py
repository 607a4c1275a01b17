"""Reactions through faults: a receiver SIGKILLed again and again while 131047 failures are processed, and Redis
refusing writes for a moment, end with each fallback template sent exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cgb_worker import keys
from cgb_worker.window import window_key

from .conftest import PHONE_KEY, Harness, free_port
from .test_webhooks import TEMPLATE, envelope

CLI = str(Path(sys.executable).parent / "cgb-worker")
SECRET = "fault-test-secret-not-real"
PHONES = [f"+1202555{i:04d}" for i in range(200, 230)]


class Receiver:
    """``cgb-worker webhooks`` as a process of its own, under one consumer name across restarts."""

    def __init__(self, redis_url: str) -> None:
        self.port, self.admin = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
        self.env.update(
            REDIS_URL=redis_url,
            WABA_APP_SECRET=SECRET,
            PHONE_HASH_KEY=PHONE_KEY,
            WEBHOOK_PORT=str(self.port),
            WEBHOOK_ADMIN_PORT=str(self.admin),
            WEBHOOK_CONSUMER="receiver-a",
            STATUS_HOLD="30",
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.kills = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            CLI, "webhooks", "--host", "127.0.0.1", env=self.env, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    async def up(self) -> None:
        """Wait until it answers (its processor running), as a restarted pod would be before it takes traffic."""
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{self.admin}/healthz") as resp:
                        if resp.status in (200, 503):
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.kills += 1

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def _post_until_stored(http: aiohttp.ClientSession, url: str, body: bytes) -> int:
    """Post as Meta does: again and again until the receiver answers 200."""
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    tries = 0
    while True:
        tries += 1
        try:
            async with http.post(url, data=body, headers={"X-Hub-Signature-256": sig}) as resp:
                if resp.status == 200:
                    return tries
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)


async def _drained(redis: Any) -> bool:
    for stream in (keys.INBOX, keys.REACTIONS):
        if await redis.xlen(stream):
            return False
        if any(g["pending"] for g in await redis.xinfo_groups(stream)):
            return False
    return True


@pytest.mark.slow
async def test_each_fallback_is_sent_exactly_once_through_sigkills_and_refused_writes(
    harness: Harness, redis_client: Any
) -> None:
    harness.sim.configure(webhook_url=None)
    await harness.known(*PHONES)
    await redis_client.set(keys.TRACKING, "1", ex=3600)  # a receiver is deployed: sends are tracked
    for phone in PHONES:
        harness.sim.state.contacts[int(phone.lstrip("+"))]["last_inbound"] = None  # WhatsApp's window: shut
        await redis_client.set(window_key(phone), f"o:{int(time.time() * 1000)}")  # what we believed: open
    jobs = await harness.enqueue(*({"to": p, "message": "visa approved", "whatsappTemplate": TEMPLATE} for p in PHONES))
    await harness.run()
    outbox = list(harness.sim.state.outbox)
    assert [o["kind"] for o in outbox] == ["text"] * len(PHONES)
    bodies = []
    for entry in outbox:
        status = {
            "id": f"wamid.SIM{entry['seq']:08d}",
            "status": "failed",
            "timestamp": str(entry["at"] // 1000),
            "recipient_id": entry["phone"].lstrip("+"),
            "errors": [{"code": 131047, "title": "Re-engagement message"}],
        }
        bodies.append(json.dumps(envelope({"statuses": [status]})).encode())
    bodies = bodies + bodies  # Meta redelivers
    random.Random(5).shuffle(bodies)

    receiver = Receiver(harness.redis_url)
    await receiver.start()
    url = f"http://127.0.0.1:{receiver.port}/webhooks/whatsapp"
    rng = random.Random(9)
    posting_done = asyncio.Event()
    tries: list[int] = []

    async def post_all() -> None:
        async with aiohttp.ClientSession() as http:
            for body in bodies:
                tries.append(await _post_until_stored(http, url, body))
                await asyncio.sleep(0.05)
        posting_done.set()

    async def chaos() -> None:
        while not posting_done.is_set() or receiver.kills < 6:
            await receiver.up()
            await asyncio.sleep(rng.uniform(0.1, 0.4))  # serving, and processing what it took
            if receiver.kills == 3:
                # Redis refuses every write for a moment (as a primary that lost its replicas does)
                await redis_client.config_set("min-replicas-to-write", 1)
                await asyncio.sleep(1.0)
                await redis_client.config_set("min-replicas-to-write", 0)
            await receiver.kill()
            await receiver.start()

    try:
        await asyncio.wait_for(asyncio.gather(post_all(), chaos()), 120)
        deadline = time.monotonic() + 60
        while not await _drained(redis_client):
            assert time.monotonic() < deadline, "the inbox and the reactions did not drain"
            await asyncio.sleep(0.1)
    finally:
        await redis_client.config_set("min-replicas-to-write", 0)
        await receiver.stop()
    assert receiver.kills >= 6
    assert max(tries) > 1  # some posts found the receiver dead or Redis refusing, and were posted again
    pool = await harness.pool()
    queued = sorted(j.job_id for j in await pool.queued_jobs())
    assert queued == sorted(f"{j.job_id}:fallback" for j in jobs)
    await harness.run()
    templates = [o for o in harness.sim.state.outbox if o["kind"] == "whatsapp_template"]
    assert sorted(o["phone"] for o in templates) == sorted(PHONES)
