"""The processor on its own, on real Redis: hostile bodies stored as signed (the POST handler no longer parses),
batches equal to one-by-one processing, what is kept of personal data, claims only from dead receivers, health
from sampled state, the held set's cap."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from cgb_worker import create_pool, keys
from cgb_worker.metrics import ReceiverMetrics
from cgb_worker.privacy import mask_digits, redact
from cgb_worker.receipts import Processor
from cgb_worker.sends import StepRecord
from cgb_worker.settings import ReceiverSettings, Secret
from cgb_worker.tasks import cancel_and_wait

from .conftest import PHONE_KEY, free_port

PHONE = "12025550100"
OTHER = "972500000001"


def body(*statuses: Any, messages: Any = (), contacts: Any = ()) -> bytes:
    value = {"messaging_product": "whatsapp", "statuses": list(statuses), "messages": list(messages)}
    value["contacts"] = list(contacts)
    change = {"field": "messages", "value": value}
    return json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [change]}]}).encode()


def status(wamid: str, state: str, to: str | None = PHONE, ts: int | str | None = None, **more: Any) -> dict[str, Any]:
    out = {"id": wamid, "status": state, "timestamp": str(ts if ts is not None else int(time.time()))} | more
    return out | ({"recipient_id": to} if to else {})


@pytest.fixture
async def pool(redis_url: str, redis_client: Any) -> AsyncIterator[Any]:
    p = await create_pool(redis_url, ride_out_outages=False)
    try:
        yield p
    finally:
        await p.aclose()


def make(pool: Any, consumer: str = "p1", **changes: Any) -> Processor:
    settings = ReceiverSettings(app_secret=Secret("x"), phone_hash_key=Secret(PHONE_KEY), **changes)
    return Processor(pool, settings, ReceiverMetrics(), consumer=consumer)


async def store(pool: Any, *bodies: bytes) -> None:
    for b in bodies:
        await pool.xadd(keys.INBOX, {"body": b, "at": 1})


async def drain(proc: Processor) -> None:
    await proc.ensure_group()
    while await proc.redis.xlen(keys.INBOX):
        await proc.turn(block_ms=1)


async def send(pool: Any, job: str, phone: str, at_ms: int) -> StepRecord:
    rec = StepRecord(job, "text", f"+{phone}", at_ms, True)
    await pool.hset(keys.sends(job), mapping={**rec.fields(), "text": "sent"})
    await pool.zadd(keys.AWAITING, {str(rec.member): 0})
    return rec


async def everything(client: Any) -> bytes:
    """Every key and value the processor left, as one blob: what must hold no phone number."""
    out = []
    for key in await client.keys("*"):
        kind = (await client.type(key)).decode()
        if kind == "string":
            out.append(key + b"=" + await client.get(key))
        elif kind == "hash":
            out.append(key + b"=" + repr(await client.hgetall(key)).encode())
        elif kind == "zset":
            out.append(key + b"=" + repr(await client.zrange(key, 0, -1)).encode())
        elif kind == "stream":
            out.append(key + b"=" + repr(await client.xrange(key)).encode())
    return b"\n".join(out)


# -- hostile bodies, each by name --------------------------------------------------------------------------------

GOOD = json.dumps(status("wamid.OK", "sent")).encode()
HOSTILE: dict[str, tuple[bytes, str]] = {
    # name: (body, "body" when the whole body is kept, "item" when one item is set aside)
    "not JSON": (b"{nope " + PHONE.encode(), "body"),
    # a key that is not one the receiver reads is skipped unread, like any other unknown key: nothing to keep
    "invalid UTF-8 in a key": (body().replace(b'"statuses"', b'"stat\xffuses"'), "none"),
    "invalid UTF-8 in a string value": (body(status("wamid.\xff", "sent")).replace(b"\\u00ff", b"\xff"), "item"),
    "invalid UTF-8 in a timestamp": (body(status("wamid.T", "sent", ts="17\xff")).replace(b"\\u00ff", b"\xff"), "item"),
    "nesting 2,000 deep inside an object": (
        b'{"object":"whatsapp_business_account","entry":[{"changes":[{"field":"messages","value":'
        + b'{"a":' * 2000
        + b"1"
        + b"}" * 2000
        + b"}]}]}",
        "body",
    ),
    "nesting 2,000 deep inside an array": (
        b'{"object":"whatsapp_business_account","entry":' + b"[" * 2000 + b"]" * 2000 + b"}",
        "body",
    ),
    "another object": (json.dumps({"object": "page", "entry": [], "phone": PHONE}).encode(), "body"),
    "entry not a list": (json.dumps({"object": "whatsapp_business_account", "entry": {"id": PHONE}}).encode(), "body"),
    "a timestamp ²": (body(status("wamid.SQ", "sent", ts="²")), "item"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_a_hostile_body_is_kept_redacted_and_counted_never_raised(
    pool: Any, redis_client: Any, name: str
) -> None:
    hostile, kept_as = HOSTILE[name]
    proc = make(pool)
    await store(pool, hostile, body(status("wamid.OK", "sent")))  # its neighbour in the same batch
    await drain(proc)
    kept = await redis_client.xrange(keys.MALFORMED)
    if kept_as == "none":
        assert kept == []
        assert PHONE.encode() not in await everything(redis_client)
        return
    assert len(kept) == 1, kept
    fields = kept[0][1]
    assert kept_as.encode() in fields
    assert fields[b"reason"]
    assert PHONE.encode() not in await everything(redis_client)
    counted = proc.metrics.registry.get_sample_value
    if kept_as == "body":
        assert counted("cgb_webhook_requests_total", {"outcome": "malformed"}) == 1
    else:
        assert counted("cgb_webhook_items_malformed_total") == 1
    assert counted("cgb_webhook_requests_total", {"outcome": "ok"}) == (1 if kept_as == "body" else 2)
    assert await redis_client.zcard(keys.ORPHANS) == 1  # the neighbour's status was read and held (no send)
    assert await redis_client.xlen(keys.INBOX) == 0


async def test_a_thousand_statuses_in_one_change_are_all_placed(pool: Any, redis_client: Any) -> None:
    at = int(time.time())
    for i in range(1000):
        await redis_client.hset(
            keys.sends(f"j{i}"), mapping=StepRecord(f"j{i}", "text", f"+1202{i:07d}", 0, True).fields()
        )
        await redis_client.set(keys.wamid(f"wamid.{i}"), f"j{i}|text")
    await store(pool, body(*(status(f"wamid.{i}", "delivered", f"1202{i:07d}", at) for i in range(1000))))
    await drain(make(pool))
    assert await redis_client.xlen(keys.DELIVERIES) == 1000
    assert await redis_client.xlen(keys.MALFORMED) == 0


# -- batches equal one by one ------------------------------------------------------------------------------------


async def _state(client: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(await client.keys("cgb:sends:*")):
        raw = await client.hgetall(key)
        out[key] = {k: v for k, v in raw.items() if not k.startswith(b"e:")}
        out[key + b" events"] = [
            {k: v for k, v in json.loads(line).items() if k != "received"}
            for k, v in raw.items() if k.startswith(b"e:") for line in v.splitlines()
        ]  # fmt: skip
    out["stream"] = [dict(f) for _i, f in await client.xrange(keys.DELIVERIES)]
    for key in (keys.AWAITING, keys.ORPHANS):
        out[key] = await client.zrange(key, 0, -1)
    for key in await client.keys("cgb:wamid:*") + await client.keys("cgb:turn:*"):
        out[key] = await client.get(key)
    return out


async def test_a_batch_leaves_what_one_by_one_processing_leaves(redis_url: str, redis_client: Any) -> None:
    """Seeded: sends to a few people (turns lapsed, so several are open at once), their statuses shuffled and
    duplicated, sent by recipient, some later ones by wamid, a few nobody's; once as one batch, once entry by
    entry, from the same start."""
    rng = random.Random(3)
    now = int(time.time())
    people = [f"1202555{i:04d}" for i in range(6)]
    sends = [(f"job{i}", rng.choice(people), (now - 60 + 7 * i) * 1000) for i in range(20)]
    statuses = []
    for i, (_job, phone, at) in enumerate(sends):
        for state, delay in (("sent", 0), ("delivered", 1), ("read", 2)):
            statuses.append(status(f"wamid.{i}", state, phone, at // 1000 + delay))
    statuses += [status("wamid.X", "delivered", "12025559999"), *rng.sample(statuses, 15)]
    rng.shuffle(statuses)
    bodies = [body(*statuses[i : i + rng.randint(1, 4)]) for i in range(0, len(statuses), 4)]
    states = []
    for one_by_one in (False, True):
        await redis_client.flushdb()
        p = await create_pool(redis_url, ride_out_outages=False)
        try:
            for job, phone, at in sends:
                await send(p, job, phone, at)
            proc = make(p)
            if one_by_one:
                for b in bodies:
                    await proc.process(b)
            else:
                await proc.process_entries([(None, b) for b in bodies])
            states.append(await _state(redis_client))
        finally:
            await p.aclose()
    assert states[0]["stream"]  # something was placed, else the comparison proves nothing
    assert states[0] == states[1]


# -- personal data ----------------------------------------------------------------------------------------------


def test_mask_digits_and_redact() -> None:
    masked = mask_digits(f"+{PHONE} and 123456 and {OTHER}")
    assert masked == "+*********00 and 123456 and **********01"
    error = {"code": 131047, "title": "Re-engagement", "href": "x"}
    kept = redact({"id": f"wamid.{PHONE}", "timestamp": "1", "text": {"body": "hi"}, "recipient_id": PHONE,
                   "errors": [error], "wa_id": 12025550100})  # fmt: skip
    assert kept == {"id": "wamid.+1********00", "timestamp": "1", "text": {"body": "<redacted 2 chars>"},
                    "recipient_id": "<redacted 11 chars>", "wa_id": "*********00",
                    "errors": [{"code": 131047, "title": "Re-engagement", "href": "<redacted 1 chars>"}]}  # fmt: skip


async def test_no_phone_is_kept_by_the_processor(pool: Any, redis_client: Any) -> None:
    """The BSUID map holds the hash; a held status, its timeline event's meta and the send record no phone."""
    now = int(time.time())
    await send(pool, "job-a", OTHER, now * 1000 - 500)
    contact = {"wa_id": OTHER, "user_id": "US.A1"}
    inbound = {"id": "m1", "timestamp": str(now), "from": OTHER, "type": "text", "text": {"body": f"call {PHONE}"}}
    await store(
        pool,
        body(status("wamid.A", "sent", OTHER, now), messages=[inbound], contacts=[contact]),
        body(status("wamid.NOBODY", "delivered", PHONE, now)),
    )
    proc = make(pool)
    proc.orphan_grace = 0.0
    await drain(proc)
    assert await redis_client.get(keys.bsuid("US.A1")) == keys.who(OTHER).encode()
    assert await redis_client.zcard(keys.ORPHANS) == 1
    record = await redis_client.hgetall(keys.sends("job-a"))
    assert b"*********01" in record[b"e:text"]  # the meta's recipient_id, masked
    blob = await everything(redis_client)
    assert OTHER.encode() not in blob
    assert PHONE.encode() not in blob
    await redis_client.zadd(keys.ORPHANS, {(await redis_client.zrange(keys.ORPHANS, 0, 0))[0]: 0})
    await proc.matcher.retry_held()  # given up: kept as unmatched, redacted
    [(_id, kept)] = await redis_client.xrange(keys.UNMATCHED)
    assert json.loads(kept[b"status"])[0]["id"] == "wamid.NOBODY"
    assert PHONE.encode() not in await everything(redis_client)


async def test_the_held_set_is_capped(pool: Any, redis_client: Any) -> None:
    proc = make(pool)
    proc.matcher.held_max = 2
    await store(pool, *(body(status(f"wamid.N{i}", "delivered", PHONE)) for i in range(3)))
    await drain(proc)
    assert await redis_client.zcard(keys.ORPHANS) == 2
    assert await redis_client.hlen(keys.ORPHANS_SINCE) == 2
    [(_id, kept)] = await redis_client.xrange(keys.UNMATCHED)
    assert kept[b"reason"] == b"overflow"
    assert proc.metrics.registry.get_sample_value("cgb_webhook_statuses_unmatched_total", {"reason": "overflow"}) == 1


# -- claims only from dead receivers ---------------------------------------------------------------------------


async def test_a_busy_receivers_entries_are_never_taken_a_dead_ones_are(
    pool: Any, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cgb_worker.receipts import inbox

    monkeypatch.setattr(inbox, "CLAIM_EVERY", 0.5)  # looks for dead receivers' entries four times as often
    now = int(time.time())
    for i in range(6):
        await pool.hset(keys.sends(f"j{i}"), mapping=StepRecord(f"j{i}", "text", f"+{PHONE}", 0, True).fields())
        await pool.set(keys.wamid(f"wamid.{i}"), f"j{i}|text")
    await store(pool, *(body(status(f"wamid.{i}", "delivered", PHONE, now)) for i in range(6)))
    slow, quick = make(pool, "slow"), make(pool, "quick")
    slow.heartbeat_ttl = quick.heartbeat_ttl = 1
    seen: list[bytes] = []
    release = asyncio.Event()

    def counting(proc: Processor, wait: bool) -> Any:
        real = proc.process_entries

        async def process_entries(entries: list[Any]) -> list[str]:
            seen.extend(e for e, _b in entries)
            if wait:
                await release.wait()  # a long batch: longer than the heartbeat's TTL
            return await real(entries)

        return process_entries

    slow.process_entries = counting(slow, True)  # type: ignore[method-assign]
    quick.process_entries = counting(quick, False)  # type: ignore[method-assign]
    stop_slow, stop_quick = asyncio.Event(), asyncio.Event()
    slow_task = asyncio.create_task(slow.run(stop_slow))
    await _until(lambda: len(seen) == 6)  # the slow one took every entry
    quick_task = asyncio.create_task(quick.run(stop_quick))
    for _ in range(3):  # the quick one looks for dead receivers' entries again and again, past the TTL
        await asyncio.sleep(quick.heartbeat_ttl + inbox.CLAIM_EVERY)
        assert len(seen) == 6
    release.set()
    await _until(lambda: redis_client.xlen(keys.DELIVERIES), want=6)
    stop_quick.set()
    await quick_task
    assert await _consumers(redis_client, {"slow"})  # a clean stop leaves the group
    # now the slow one is killed holding an entry: no clean stop, its heartbeat left to expire
    release.clear()
    await store(pool, body(status("wamid.0", "read", PHONE, now)))
    await _until(lambda: len(seen) == 7)

    async def killed() -> None:
        pass

    slow.leave = killed  # type: ignore[method-assign]
    await cancel_and_wait(slow_task)
    survivor = make(pool, "survivor")
    survivor.process_entries = counting(survivor, False)  # type: ignore[method-assign]
    stop = asyncio.Event()
    survivor_task = asyncio.create_task(survivor.run(stop))
    try:
        await _until(lambda: len(seen) == 8)  # taken over once the heartbeat expired
        await _until(lambda: redis_client.xlen(keys.DELIVERIES), want=7)
        assert await _consumers(redis_client, {"survivor"})  # the dead one's name removed with its last entry
    finally:  # a failed check must not leave a processor running into the next test
        stop.set()
        await survivor_task
    assert await _consumers(redis_client, set())


async def _consumers(client: Any, want: set[str]) -> bool:
    return {c["name"].decode() for c in await client.xinfo_consumers(keys.INBOX, keys.INBOX_GROUP)} == want


async def _until(check: Callable[[], Any], want: Any = True, within: float = 15.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value == want or (want is True and value):
            return value
        assert time.monotonic() < deadline, f"not within {within} s: {value!r}"
        await asyncio.sleep(0.05)


# -- health from sampled state ---------------------------------------------------------------------------------


async def test_health_dead_task_lag_and_a_long_batch(pool: Any, redis_client: Any) -> None:
    proc = make(pool, max_lag=6.0)
    assert proc.health()[0] is False  # not started
    release = asyncio.Event()
    real = proc.process_entries

    async def long_batch(entries: list[Any]) -> list[str]:
        await release.wait()
        return await real(entries)

    proc.process_entries = long_batch  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(proc.run(stop))
    await store(pool, body(status("wamid.L", "delivered")))
    await _until(lambda: proc.backlog.pending == 1)
    await asyncio.sleep(proc.settings.redis_timeout + 1.5)
    assert proc.health() == (True, "ok")  # a long batch is not a stall
    assert proc.inbox_length == 1
    _ok, why = await _until(lambda: proc.health() if not proc.health()[0] else None)  # waiting past WEBHOOK_MAX_LAG
    assert "waited" in why
    release.set()
    await _until(lambda: proc.health()[0])
    await cancel_and_wait(task)
    assert proc.health() == (False, "the processor has stopped")


async def test_health_reports_a_frozen_redis() -> None:
    workdir = tempfile.mkdtemp(prefix="cgb-frozen-")
    port = free_port()
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before the loop has work
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    pool = None
    try:
        while True:
            try:
                pool = await create_pool(f"redis://127.0.0.1:{port}/0", ride_out_outages=False)
                break
            except Exception:
                await asyncio.sleep(0.05)
        proc = make(pool, redis_timeout=0.5)
        stop = asyncio.Event()
        task = asyncio.create_task(proc.run(stop))
        await _until(lambda: proc.health()[0])
        os.kill(server.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        _ok, why = await _until(lambda: proc.health() if not proc.health()[0] else None)
        assert "no answer from Redis" in why
        assert (
            time.monotonic() - frozen < 10
        )  # reported while still frozen (the bound is the setting, measured by bench)
        os.kill(server.pid, signal.SIGCONT)
        await _until(lambda: proc.health()[0])
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        if pool is not None:
            await pool.aclose()
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


# -- what the attack on issue 20 found ----------------------------------------------------------------------------


async def test_one_undecodable_status_is_set_aside_alone_and_its_neighbour_is_used(
    pool: Any, redis_client: Any
) -> None:
    """Invalid UTF-8 inside one status used to set aside the whole change, its good neighbour with it."""
    at = int(time.time())
    await send(pool, "job-ok", OTHER, at * 1000 - 500)
    good = status("wamid.OK1", "sent", to=OTHER, ts=at)
    hostile = body(status("wamid.BAD", "sent", ts=at), good).replace(b'"wamid.BAD"', b'"wamid.B\xffD"')
    proc = make(pool)
    await store(pool, hostile)
    await drain(proc)
    kept = await redis_client.xrange(keys.MALFORMED)
    assert [f[b"reason"] for _, f in kept] == [b"a status: invalid UTF-8"]
    assert b"wamid.OK1" in (await redis_client.hget(keys.sends("job-ok"), "d:text") or b"")


async def test_a_lone_surrogate_in_a_text_does_not_spoil_the_body(pool: Any, redis_client: Any) -> None:
    """A truncated emoji (``\\ud83d`` alone) in an inbound text made every decoder refuse the whole body."""
    at = int(time.time())
    await send(pool, "job-s", OTHER, at * 1000 - 500)
    message = {"from": PHONE, "id": "wamid.IN", "timestamp": str(at), "type": "text", "text": {"body": "hi SURR"}}
    raw = body(status("wamid.S1", "sent", to=OTHER, ts=at), messages=[message]).replace(b"SURR", b"\\ud83d")
    assert b"\\ud83d" in raw
    proc = make(pool)
    await store(pool, raw)
    await drain(proc)
    assert await redis_client.xlen(keys.MALFORMED) == 0
    assert b"wamid.S1" in (await redis_client.hget(keys.sends("job-s"), "d:text") or b"")
    assert await redis_client.exists(keys.window(keys.who("+" + PHONE)))  # the message opened the window


async def test_what_is_kept_of_an_unreadable_body_holds_no_name_text_or_number(pool: Any, redis_client: Any) -> None:
    junk = b'{"contacts": [{"profile": {"name": "Jane SECRETNAME Roe"}}], "text": "call +1 (202) 555-0101" \xff'
    proc = make(pool)
    await store(pool, junk)
    await drain(proc)
    [(_, fields)] = await redis_client.xrange(keys.MALFORMED)
    kept = b" ".join(fields.values())
    for secret in (b"SECRETNAME", b"Jane", b"555", b"0101", b"call"):
        assert secret not in kept, (secret, kept)
    assert b'{"xxxxxxxx": [{"xxxxxxx"' in kept  # the shape is still there to look at


async def test_a_held_status_keeps_no_callback_data_or_phone_in_an_error(pool: Any, redis_client: Any) -> None:
    """CGB fills biz_opaque_callback_data with the phone's digits; an error's message can name a number."""
    error = {"code": 131026, "title": "Undeliverable", "message": "to +1 202-555-0100 failed",
             "error_data": {"details": f"number {PHONE}"}}  # fmt: skip
    held = status("wamid.H", "failed", ts=int(time.time()), errors=[error],
                  biz_opaque_callback_data=json.dumps({"c": PHONE}))  # fmt: skip
    proc = make(pool)
    await store(pool, body(held))
    await drain(proc)
    assert await redis_client.zcard(keys.ORPHANS) == 1
    stored = await everything(redis_client)
    assert PHONE.encode() not in stored
    assert b"555-0100" not in stored
    assert b"biz_opaque" not in stored
    assert b"131026" in stored  # what the status is stays


async def test_the_diagnostic_streams_keep_nothing_older_than_their_ttl(pool: Any, redis_client: Any) -> None:
    """An approximate MINID trims whole nodes only: a small stream kept its old entries for good."""
    for i in range(1, 51):
        await redis_client.xadd(keys.MALFORMED, {"reason": "old"}, id=f"{i}-0")
    proc = make(pool, diagnostics_ttl=1.0)
    await store(pool, b"{nope")
    await drain(proc)
    kept = await redis_client.xrange(keys.MALFORMED)
    assert [f[b"reason"] for _, f in kept] != []
    assert b"old" not in [f[b"reason"] for _, f in kept]


async def test_a_big_body_is_parsed_off_the_event_loop(pool: Any) -> None:
    import threading

    proc = make(pool)
    where: list[bool] = []
    real = proc.read

    def read(body: bytes) -> Any:
        where.append(threading.current_thread() is threading.main_thread())
        return real(body)

    proc.read = read  # type: ignore[method-assign]
    big = body(*(status(f"wamid.{i}", "delivered", ts=1) for i in range(4000)))
    assert len(big) > 256 * 1024
    await store(pool, body(status("wamid.small", "delivered")), big)
    await drain(proc)
    assert where == [True, False]  # the small one on the loop, the big one in a thread
