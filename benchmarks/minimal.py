"""The baseline: a minimal arq job that posts the same request to CGB as a cached text, with no guarantees.

No send log, no contact lookup, no rate limit, no retries: one aiohttp POST per job, on arq's own Worker with
the knobs the benchmark gives it (``WORKER_MAX_JOBS``, ``WORKER_POLL_DELAY``, as cgb-worker resolved them)
and cgb-worker's serializer, so that both read the same queue. ``arq benchmarks.minimal.Settings``; with
``MINIMAL_WITH_OVERRIDE=1`` it runs on arq with cgb-worker's one override installed, as cgb-worker does.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
from arq.connections import RedisSettings

from cgb_worker.client import USER_AGENT
from cgb_worker.serialization import deserialize, serialize


async def startup(ctx: dict[str, Any]) -> None:
    if os.environ.get("MINIMAL_WITH_OVERRIDE") == "1":  # the second baseline: arq with cgb-worker's override
        from cgb_worker.worker import survive_lost_claims

        survive_lost_claims()
    ctx["session"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    ctx["url"] = os.environ["CGB_API_URL"]
    ctx["headers"] = {
        "X-ACCESS-TOKEN": os.environ["CGB_API_KEY"],
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
        "Content-Type": "application/json",
    }


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["session"].close()


async def whatsapp_send(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    digits = payload["to"].lstrip("+")
    async with ctx["session"].post(
        f"{ctx['url']}/contacts/{digits}/send/text",
        json={"text": payload["message"], "channel": "whatsapp"},
        headers=ctx["headers"],
    ) as response:
        await response.read()
        return {"success": response.status == 200, "to": payload["to"]}


class Settings:
    functions = [whatsapp_send]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings.from_dsn(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    job_serializer = serialize
    job_deserializer = deserialize
    max_jobs = int(os.environ.get("WORKER_MAX_JOBS", "100"))
    poll_delay = float(os.environ.get("WORKER_POLL_DELAY", "0.02"))
    keep_result = 86400
