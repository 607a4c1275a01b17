"""The production path with the rate limit on: the symptoms of issue 11 that live in one worker process.

Symptoms 1 (throttling left ``sending`` marks) and 9-10 are pinned in ``test_ratelimit.py``,
``test_settings.py`` and ``test_client.py``, 5 in ``test_sends.py`` as a table and here end to end, 7 in
``test_contacts.py`` (the lock's wait) and here (the creator takes the lock), 3 in ``test_faults.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from cgb_worker import errors as E
from cgb_worker.contacts import phone_key
from cgb_worker.deadletters import ENTRIES, INDEX, ORIGINS, PAYLOADS, TRIM_CHUNK, DeadLetters
from cgb_worker.sends import key as sends_key
from cgb_worker.simulator import FaultRule

from .conftest import Harness

A = "+972500000001"


async def test_rate_limited_backlog_waits_in_place_without_deferrals(harness: Harness, redis_client: Any) -> None:
    """Symptom 2: at CGB_RATE_LIMIT=20 with CGB at 300 ms, every message was deferred through arq several
    times and 166 of 200 came back flagged ``possibleDuplicate``."""
    phones = [f"+120255501{i:02d}" for i in range(5)]
    await harness.known(*phones)
    harness.set_env(CGB_RATE_LIMIT="20")
    harness.sim.configure(latency=0.3)
    jobs = await harness.enqueue(*({"to": phones[i % 5], "message": f"m{i}"} for i in range(40)))
    await harness.run()
    results = [await harness.outcome(j) for j in jobs]
    assert all(isinstance(r, dict) and r["success"] for r in results), results
    assert [r["attempts"] for r in results] == [1] * 40  # no try failed and none was deferred
    assert not any(r["possibleDuplicate"] for r in results)
    assert await redis_client.keys("cgb:throttled:*") == []
    texts = [r["body"]["text"] for r in harness.sim.requests("send_text")]
    assert sorted(texts) == sorted(f"m{i}" for i in range(40))
    arrivals = sorted(r["at"] for r in harness.sim.requests("send_text"))
    assert max(sum(1 for u in arrivals[i:] if u - t < 1.0) for i, t in enumerate(arrivals)) <= 20


async def test_a_gateway_error_after_sending_is_an_unknown_outcome(harness: Harness, redis_client: Any) -> None:
    """Symptom 5: a 502 cleared the ``sending`` mark as if nothing went out, so the retry sent again."""
    await harness.known(A)
    harness.set_env(CGB_UNKNOWN_OUTCOME="fail")
    harness.sim.state.faults.append(FaultRule(status=502, after=True, count=1, path="/send/text$"))
    [job] = await harness.enqueue({"to": A, "message": "through a flaky gateway"})
    await harness.run()
    outcome = await harness.outcome(job)
    assert type(outcome) is E.SendOutcomeUnknownError
    assert [m["text"] for m in harness.sim.state.outbox] == ["through a flaky gateway"]  # once
    assert len(harness.sim.requests("send_text")) == 1
    [dead] = await DeadLetters(redis_client).list()
    assert dead.error_type == "SendOutcomeUnknownError"


async def test_a_503_clears_the_mark_and_the_retry_is_no_duplicate(harness: Harness) -> None:
    await harness.known(A)
    harness.set_env(CGB_UNKNOWN_OUTCOME="fail")
    harness.sim.state.faults.append(FaultRule(status=503, count=1, path="/send/text$"))
    [job] = await harness.enqueue({"to": A, "message": "after one 503"})
    await harness.run()
    result = await harness.outcome(job)
    assert (result["attempts"], result["possibleDuplicate"]) == (2, False)
    assert [m["text"] for m in harness.sim.state.outbox] == ["after one 503"]


async def test_a_replay_continues_the_original_send_record(harness: Harness, redis_client: Any) -> None:
    """Symptom 4: a replayed file+text job whose text got a 400 sent the file a second time, and two replays
    of one entry at once could both send."""
    await harness.known(A)
    harness.sim.state.faults.append(FaultRule(status=400, count=1, path="/send/text$"))
    payload = {"to": A, "fileUrl": "https://files.example.test/visa.pdf", "fileType": "document", "message": "see"}
    [job] = await harness.enqueue(payload)
    await harness.run()
    assert type(await harness.outcome(job)) is E.CGBBadRequestError
    assert [m["kind"] for m in harness.sim.state.outbox] == ["file"]
    assert await redis_client.ttl(sends_key(job.job_id)) == -1  # kept as long as the dead letter

    store = DeadLetters(redis_client)
    pool = await harness.pool()
    replays = await asyncio.gather(*(store.replay(pool, job.job_id) for _ in range(5)))
    new_ids = [r for r in replays if r is not None]
    assert len(new_ids) == 1  # claimed once
    assert await store.count() == 0
    await harness.run()
    [new_id] = new_ids
    result = await pool.all_job_results()
    assert {r.job_id for r in result if r.success} == {new_id}
    assert [m["kind"] for m in harness.sim.state.outbox] == ["file", "text"]  # the file went out once
    assert len(harness.sim.requests("send_file")) == 1
    record = await redis_client.hgetall(sends_key(job.job_id))
    assert (record[b"file"], record[b"text"]) == (b"sent", b"sent")
    assert await redis_client.ttl(sends_key(job.job_id)) > 0


async def test_a_replay_that_fails_again_replays_the_same_record(harness: Harness, redis_client: Any) -> None:
    await harness.known(A)
    harness.sim.state.faults.append(FaultRule(status=400, count=2, path="/send/text$"))
    payload = {"to": A, "fileUrl": "https://files.example.test/visa.pdf", "fileType": "document", "message": "see"}
    [job] = await harness.enqueue(payload)
    await harness.run()
    store = DeadLetters(redis_client)
    second = await store.replay(await harness.pool(), job.job_id)
    await harness.run()
    assert second is not None
    assert await redis_client.hget(ORIGINS, second) == job.job_id.encode()
    assert await store.replay(await harness.pool(), second) is not None
    await harness.run()
    assert [m["kind"] for m in harness.sim.state.outbox] == ["file", "text"]


async def test_the_contacts_creator_holds_the_field_lock(harness: Harness, redis_client: Any) -> None:
    """Symptom 7: the job that created a contact skipped the field lock, so another job's variables could
    land between its creation and its flow."""
    lock = f"cgb:lock:fields:{phone_key(A)}"
    await redis_client.set(lock, "another job", px=600)  # another job is writing this phone's fields
    held_until = time.time() + 0.6
    [job] = await harness.enqueue({"to": A, "template": "visa_approved", "variables": {"first_name": "Dana"}})
    await harness.run()
    assert (await harness.outcome(job))["kind"] == "template"
    [create] = harness.sim.requests("create_contact")
    assert create["at"] >= held_until - 0.05  # the new contact waited for the lock before it was created
    assert create["body"]["actions"] == [{"action": "set_field_value", "field_name": "first_name", "value": "Dana"}]
    assert await redis_client.exists(lock) == 0


async def test_lowering_the_dead_letter_cap_by_thousands_orphans_nothing(redis_client: Any) -> None:
    """Symptom 8: lowering DEAD_LETTER_MAX by more than about 8,000 left orphaned entries (with phone
    numbers) that were never trimmed, and ``add`` raised after it had recorded."""
    old = 9000
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(old):
            job_id = f"old-{i}"
            pipe.hset(ENTRIES, job_id, b"x")
            pipe.hset(PAYLOADS, job_id, msgspec.msgpack.encode({"to": "+12025550100", "message": "m"}))
            pipe.hset(ORIGINS, job_id, job_id)
            pipe.zadd(INDEX, {job_id: i})
            pipe.hset(sends_key(job_id), "text", "sending")
        await pipe.execute()
    store = DeadLetters(redis_client, max_entries=100)
    await store.add(
        job_id="new",
        function="whatsapp_send",
        payload={"to": A},
        error=E.CGBAuthError("no"),
        attempts=1,
        enqueued_at=None,
    )
    assert old // TRIM_CHUNK > 1  # the trim took many chunks
    assert await redis_client.zcard(INDEX) == 100
    for name in (ENTRIES, PAYLOADS, ORIGINS):
        assert await redis_client.hlen(name) == 100
    assert await redis_client.hexists(ENTRIES, "new")
    assert len(await redis_client.keys("cgb:sends:*")) == 99  # the trimmed entries' send records went too
    assert (await store.list(limit=1))[0].job_id == "new"


CONTRACT_SIDES = [
    {"missing_contact": missing, "created_id": created, "stored_phone": stored, "upsert": upsert}
    for missing in ("404", "blank")
    for created in ("data_id", "top_id", "none")
    for stored in ("plus", "digits")
    for upsert in (True, False)
]


async def test_calls_for_a_new_and_an_expired_number_on_every_side_of_the_contract(harness: Harness) -> None:
    """At most 3 CGB calls for a new number and 2 for a known one whose cache expired, with one contact per
    number, whichever way the simulator plays what the contract leaves open."""
    for i, side in enumerate(CONTRACT_SIDES):
        harness.sim.configure(**side)
        phone = f"+1202555{i:04d}"
        harness.sim.state.requests.clear()
        [new] = await harness.enqueue({"to": phone, "message": "new"})
        await harness.run()
        assert (await harness.outcome(new))["contactId"] == phone[1:], side
        new_calls = [r["endpoint"] for r in harness.sim.state.requests]
        assert new_calls == ["get_contact", "create_contact", "send_text"], (side, new_calls)
        harness.sim.state.requests.clear()
        pool = await harness.pool()
        await pool.delete(f"cgb:contact:{phone_key(phone)}")  # the cache expired
        [known] = await harness.enqueue({"to": phone, "message": "known"})
        await harness.run()
        assert (await harness.outcome(known))["success"] is True
        assert [r["endpoint"] for r in harness.sim.state.requests] == ["get_contact", "send_text"], side
    assert len(harness.sim.state.contacts) == len(CONTRACT_SIDES)  # no duplicates
