"""``cgb-worker forget``: after it, no record anywhere in Redis names the person, and everyone else's are intact."""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

from cgb_worker import keys
from cgb_worker.deadletters import DeadLetters
from cgb_worker.erasure import forget

from .conftest import Harness
from .test_cli import cli

A = "+12025550100"
"""Forgotten."""
B = "+972500000001"
"""Kept."""
VOLATILE = (b"arq:queue:health-check", b"cgb:ratelimit:", keys.FORMAT.encode())  # the format: the CLI's start-up
"""Rewritten or expiring on their own while the test runs, and naming no one."""


def named(data: bytes, phone: str) -> bool:
    """The number's digits (not inside a longer run of digits) or its hash."""
    digits = phone.lstrip("+").encode()
    return keys.who(phone).encode() in data or re.search(rb"(?<!\d)" + digits + rb"(?!\d)", data) is not None


async def everything(redis: Any) -> set[tuple[bytes, ...]]:
    """Every key of every type in Redis, and everything in each: one tuple per string, field, member, entry."""
    items: set[tuple[bytes, ...]] = set()
    async for key in redis.scan_iter(count=1000):
        if key.startswith(VOLATILE):
            continue
        kind = (await redis.type(key)).decode()
        if kind == "string":
            items.add((key, await redis.get(key)))
        elif kind == "hash":
            items |= {(key, f, v) for f, v in (await redis.hgetall(key)).items()}
        elif kind == "zset":
            items |= {(key, m) for m in await redis.zrange(key, 0, -1)}
        elif kind == "set":
            items |= {(key, m) for m in await redis.smembers(key)}
        elif kind == "list":
            items |= {(key, v) for v in await redis.lrange(key, 0, -1)}
        elif kind == "stream":
            for entry_id, fields in await redis.xrange(key):
                items.add((key, entry_id, *sorted(b"=".join(kv) for kv in fields.items())))
        else:
            raise AssertionError(f"a {kind} the test cannot read: {key!r}")
    return items


def wamid_of(phone: str, tail: bytes = b"9A3CA5B3D4CD6E67E7") -> str:
    """A wamid as Meta makes them, with the recipient's number inside its base64."""
    digits = phone.lstrip("+").encode()
    return (
        "wamid."
        + base64.b64encode(b"\x1c\x18" + bytes([len(digits)]) + digits + b"\x15\x02\x00\x11\x18\x12" + tail).decode()
    )


def in_a_wamid(data: bytes, phone: str) -> bool:
    for match in re.finditer(rb"wamid\.([A-Za-z0-9+/]+)", data):
        body = match.group(1)
        if phone.lstrip("+").encode() in base64.b64decode(body[: len(body) // 4 * 4]):
            return True
    return False


async def receiver_records(redis: Any, phone: str, job_id: str) -> str:
    """What a receiver keeps of a person, written by hand: a held status, an unmatched and a malformed one, an
    inbox entry taken but not acknowledged, a BSUID, the window, a wamid and the delivery stream's entry."""
    digits = phone.lstrip("+")
    wamid = wamid_of(phone)
    status = json.dumps({"id": wamid, "status": "delivered", "timestamp": "1764650000", "recipient_id": digits})
    now = int(time.time() * 1000)
    await redis.zadd(keys.ORPHANS, {status: time.time() + 60})
    await redis.hset(keys.ORPHANS_SINCE, status, now)
    await redis.xadd(keys.UNMATCHED, {"status": status, "reason": "none", "at": now})
    body = json.dumps({"entry": [{"changes": [{"value": {"contacts": [{"wa_id": digits}], "statuses": "?"}}]}]})
    await redis.xadd(keys.MALFORMED, {"body": body, "reason": "statuses is not a list", "at": now})
    await redis.xadd(keys.INBOX, {"body": json.dumps({"entry": [{"statuses": [json.loads(status)]}]}), "at": now})
    await redis.set(keys.bsuid(f"US.{digits[-4:]}1"), digits)
    await redis.set(keys.window(keys.who(phone)), f"o:{now}")
    await redis.set(keys.wamid(wamid), f"{job_id}|text")
    await redis.set(keys.wamid(wamid) + ":at", now)
    # its sent, not placed: a key named by the wamid's keyed hash, holding a time (nothing of the person, and
    # nothing that leads to them: it is left to expire)
    await redis.set(keys.wamid(wamid_of(phone, tail=b"0B1C2D3E4F5061728394")) + ":at", now)
    await redis.xadd(keys.DELIVERIES, {"job": job_id, "step": "text", "status": "delivered", "wamid": wamid, "at": now})
    return wamid


async def test_forget_removes_every_record_of_one_person_and_nothing_of_anyone_else(
    harness: Harness, redis_client: Any
) -> None:
    await harness.known(A, B)
    harness.set_env(STATUS_TURN_WAIT="120")  # the turns and awaiting sends outlive the test
    await redis_client.set(keys.TRACKING, "1", ex=600)  # a receiver is deployed: turns and awaiting sends
    sent = await harness.enqueue(
        {"to": A, "message": "Your visa is approved."},
        {"to": B, "message": "Your visa is approved."},
        {"to": A, "template": "visa_rejected"},  # no such flow and no text: dead-lettered
        {"to": B, "template": "visa_rejected"},
    )
    await harness.run()
    assert [isinstance(await harness.outcome(j), dict) for j in sent] == [True, True, False, False]
    assert await DeadLetters(redis_client).count() == 2
    queued = await harness.enqueue({"to": "+1 202-555-0100", "message": "later"}, {"to": B, "message": "later"})
    await redis_client.set(f"arq:in-progress:{queued[0].job_id}", "1", ex=60)  # as if a worker had taken it
    a_jobs = {sent[0].job_id, sent[2].job_id, queued[0].job_id}
    a_wamid_key = keys.wamid(await receiver_records(redis_client, A, sent[0].job_id)).encode()
    await receiver_records(redis_client, B, sent[1].job_id)
    await redis_client.xgroup_create(keys.INBOX, keys.INBOX_GROUP, id="0")
    await redis_client.xreadgroup(keys.INBOX_GROUP, "receiver-1", {keys.INBOX: ">"})  # both taken, neither done

    before = await everything(redis_client)
    for phone in (A, B):  # what is asserted gone or kept below was there
        assert sum(1 for item in before if any(named(part, phone) for part in item)) >= 12
    assert any(item[0] == keys.AWAITING.encode() and item[1].startswith(keys.who(A).encode()) for item in before)

    code, out, err = await cli(harness, "forget", "+1 (202) 555-0100", "--yes")

    assert code == 1, err  # one of A's jobs was running: its records may come back
    assert "1 of its jobs were running: run forget again once they have ended" in err
    assert "3 job(s) of this person found" in out
    for line in (
        "contact cache        1",
        "24-hour window       1",
        "turn                 1",
        "awaiting sends       1",
        "BSUID map            1",
        "send records         1",
        "held statuses        1",
        "unmatched statuses   1",
        "malformed webhooks   1",
        "webhook inbox        1",
        "delivery stream      1",
        "wamid map            1",
        "dead letters         1",
        "queued jobs          1",
        "job results          2",
        "running-job markers  1",
    ):
        assert line in out, (line, out)
    for text in (out, err):
        assert "2025550100" not in text
        assert keys.who(A) not in text

    after = await everything(redis_client)
    assert [item for item in after if any(named(part, A) or in_a_wamid(part, A) for part in item)] == []
    assert [item for item in before if any(in_a_wamid(part, B) for part in item)] != []
    assert not [item for item in after if any(job.encode() in part for job in a_jobs for part in item)]

    def of_a(item: tuple[bytes, ...]) -> bool:
        # a wamid key is named by the wamid's keyed hash (no phone in it): A's is known by the wamid placed
        return any(
            named(p, A) or in_a_wamid(p, A) or p.startswith(a_wamid_key) or any(j.encode() in p for j in a_jobs)
            for p in item
        )

    assert after == {item for item in before if not of_a(item)}  # B's records, and everyone's, intact
    assert [p["message_id"] for p in await redis_client.xpending_range(keys.INBOX, keys.INBOX_GROUP, "-", "+", 10)] == [
        item[1] for item in after if item[0] == keys.INBOX.encode()
    ]  # the receiver is not handed A's entry again; B's is still its to finish
    assert len(await DeadLetters(redis_client).list()) == 1

    again = await forget(redis_client, A)  # nothing is left to find
    assert (again.removed, again.jobs, again.running) == ({}, 0, 0)


async def test_forget_keeps_an_opt_out_and_says_so(harness: Harness, redis_client: Any) -> None:
    from cgb_worker.suppression import suppress, unsuppress

    await suppress(redis_client, A, scope="marketing")
    await suppress(redis_client, B)
    await redis_client.set(keys.window(keys.who(A)), "o:1764650000000")
    before = json.loads(await redis_client.get(keys.suppressed(keys.who(A))))
    code, out, _ = await cli(harness, "forget", A, "--yes")
    assert code == 0
    assert "24-hour window" in out
    assert "kept: its suppression (opt-out) entry, which holds only the number's keyed hash" in out
    assert not await redis_client.exists(keys.window(keys.who(A)))
    assert json.loads(await redis_client.get(keys.suppressed(keys.who(A)))) == before
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == {keys.who(A).encode(), keys.who(B).encode()}
    # once lifted, what is left (the time of the lift) is removed like any record
    await unsuppress(redis_client, A)
    done = await forget(redis_client, A)
    assert (done.kept_suppression, done.removed) == (False, {"suppression list": 1})
    assert not await redis_client.exists(keys.suppressed(keys.who(A)))
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == {keys.who(B).encode()}


async def test_forget_needs_the_phone_hash_key_and_a_number(harness: Harness) -> None:
    code, _, err = await cli(harness, "forget", A, "--yes", env={"PHONE_HASH_KEY": None})
    assert code == 2
    assert "PHONE_HASH_KEY: required" in err
    code, _, err = await cli(harness, "forget", A, "--yes", env={"PHONE_HASH_KEY": "short"})
    assert (code, err.count("\n")) == (2, 2)  # "invalid configuration:" and its one line
    assert "PHONE_HASH_KEY: must have at least 16 characters." in err
    code, _, err = await cli(harness, "forget", "050-000-0001", "--yes")
    assert code == 2
    assert "no country code" in err
    code, out, _ = await cli(harness, "forget", "050-000-0001", "--yes", "--region", "IL")
    assert code == 0
    assert "nothing: no record names this number" in out
