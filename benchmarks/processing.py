"""The receiver's processing throughput: stored webhooks of a realistic mix drained by one :class:`Processor`.

Each status is a webhook of its own (as Meta mostly posts them), pre-stored in the inbox with the sends it
belongs to: 45 % ``delivered`` and 35 % ``read`` of wamids already placed, 15 % ``sent`` matched by recipient
(one waiting send each), 5 % of nobody's (held). The figure is this process's CPU (``time.process_time``) and
the wall clock while the processor drains them, beside a minimal consumer of the same entries (read, decode,
one ``HSET`` per status, acknowledge: no matching, no guarantees). ``python -m benchmarks.processing [N]``
starts its own ``redis-server``; :func:`processing_bench` is what ``make bench`` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from typing import Any

import redis.asyncio

from cgb_worker import create_pool, keys
from cgb_worker.metrics import ReceiverMetrics
from cgb_worker.receipts import Processor
from cgb_worker.sends import StepRecord
from cgb_worker.settings import ReceiverSettings, Secret

from .system import redis_server

PHONE_KEY = "bench-phone-hash-key-not-a-secret"
"""PHONE_HASH_KEY for every worker and receiver the bench starts, and for this process's own hashing."""
keys.use_phone_key(PHONE_KEY)


def _body(statuses: list[dict[str, Any]]) -> bytes:
    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1"}, "statuses": statuses}
    change = {"field": "messages", "value": value}
    return json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [change]}]}).encode()


async def prepare(client: Any, n: int, *, per_body: int = 1) -> None:
    """``n`` statuses of the mix in the inbox, and the sends and placed wamids they find."""
    await client.flushdb()
    at = int(time.time())
    bodies: list[bytes] = []
    batch: list[dict[str, Any]] = []
    async with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            phone = f"1202{i:07d}"
            rec = StepRecord(f"job{i}", "text", f"+{phone}", at * 1000 - 500, True)
            pipe.hset(keys.sends(rec.delivery_id), mapping={**rec.fields(), "text": "sent"})
            kind = i % 20
            wamid = f"wamid.B{i:07d}"
            if kind < 16:  # delivered / read of a wamid already placed
                pipe.set(keys.wamid(wamid), rec.ref, ex=3600)
                status = "delivered" if kind < 9 else "read"
            elif kind < 19:  # the message's first status: matched by its recipient
                pipe.zadd(keys.AWAITING, {str(rec.member): 0})
                status = "sent"
            else:  # nobody's: held
                status = "delivered"
                phone = f"1303{i:07d}"
            item: dict[str, Any] = {"id": wamid, "status": status, "timestamp": str(at), "recipient_id": phone}
            if status != "sent":
                item["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "utility"}
            else:
                item["conversation"] = {"id": f"c{i}", "origin": {"type": "utility"}}
            batch.append(item)
            if len(batch) == per_body:
                bodies.append(_body(batch))
                batch = []
        if batch:
            bodies.append(_body(batch))
        for body in bodies:
            pipe.xadd(keys.INBOX, {"body": body, "at": at * 1000})
        await pipe.execute()
    with contextlib.suppress(redis.exceptions.ResponseError):
        await client.xgroup_create(keys.INBOX, keys.INBOX_GROUP, id="0", mkstream=True)


async def drain_ours(redis_url: str) -> tuple[float, float]:
    """CPU and wall seconds for one Processor to empty the inbox."""
    pool = await create_pool(redis_url, ride_out_outages=False)
    settings = ReceiverSettings(app_secret=Secret("bench"), phone_hash_key=Secret(PHONE_KEY))
    processor = Processor(pool, settings, ReceiverMetrics(), consumer="bench")
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        while await pool.xlen(keys.INBOX):
            await processor.turn(block_ms=1)
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await pool.aclose()


async def drain_minimal(redis_url: str, *, count: int = 200) -> tuple[float, float]:
    """The baseline: read, decode, one HSET per status, acknowledge and delete; nothing else."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        while read := await client.xreadgroup(keys.INBOX_GROUP, "minimal", {keys.INBOX: ">"}, count=count):
            [(_stream, entries)] = read
            async with client.pipeline(transaction=False) as pipe:
                for entry_id, fields in entries:
                    for entry in json.loads(fields[b"body"])["entry"]:
                        for change in entry["changes"]:
                            for status in change["value"].get("statuses", []):
                                pipe.hset("minimal:" + status["id"], "status", status["status"])
                    pipe.xack(keys.INBOX, keys.INBOX_GROUP, entry_id)
                    pipe.xdel(keys.INBOX, entry_id)
                await pipe.execute()
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await client.aclose()


async def processing_bench(redis_url: str, n: int = 20000) -> dict[str, float]:
    """Statuses per second of CPU and of wall clock, ours and the minimal consumer's, on ``n`` stored statuses
    (the drain time of that backlog is ``ours_wall``)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await prepare(client, n)
        ours_cpu, ours_wall = await drain_ours(redis_url)
        await prepare(client, n)
        base_cpu, base_wall = await drain_minimal(redis_url)
        await client.flushdb()
    finally:
        await client.aclose()
    return {
        "n": n,
        "ours_cpu_ms": ours_cpu * 1000 / n,
        "ours_wall": ours_wall,
        "ours_rate": n / ours_wall,
        "base_cpu_ms": base_cpu * 1000 / n,
        "base_wall": base_wall,
        "base_rate": n / base_wall,
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    with tempfile.TemporaryDirectory() as tmp, redis_server(tmp) as url:
        r = asyncio.run(processing_bench(url, n))
    print(
        f"{r['n']:,} statuses: ours {r['ours_cpu_ms']:.3f} ms CPU per status, drained in {r['ours_wall']:.2f} s "
        f"({r['ours_rate']:.0f}/s); minimal {r['base_cpu_ms']:.3f} ms, {r['base_wall']:.2f} s ({r['base_rate']:.0f}/s);"
        f" ratio {r['ours_rate'] / r['base_rate']:.2f}"
    )


if __name__ == "__main__":
    main()
