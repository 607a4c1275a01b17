"""What the delivery layer must never do twice, or lose: reactions to a status, a job id enqueued again, late
statuses behind foreign ones. Each test here failed on the code before the attribution issue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from cgb_worker import keys
from cgb_worker.window import window_key

from .conftest import Harness
from .test_webhooks import TEMPLATE, Receiver, _status_is, envelope, eventually, settled, status_of, status_payload
from .test_webhooks import receiver as receiver

B = "+12025550100"
A = "+972500000001"


async def test_a_fallback_is_sent_once_after_its_enqueue_failed(
    harness: Harness, receiver: Receiver, redis_client: Any, monkeypatch: Any
) -> None:
    """Symptom 2: the status was recorded as seen before the fallback was enqueued; an enqueue that failed was
    never tried again. Now the reaction sits in the outbox until it is done."""
    await harness.known(B)
    harness.sim.state.contacts[int(B.lstrip("+"))]["last_inbound"] = None  # WhatsApp's window: shut
    await redis_client.set(window_key(B), f"o:{int(time.time() * 1000)}")  # what we believed: open
    reactor = receiver.processor.reactor
    real = reactor.redis.enqueue_job
    failures = 0

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RedisConnectionError("Redis went away for a moment")
        return await real(*args, **kwargs)

    monkeypatch.setattr(reactor.redis, "enqueue_job", flaky)
    [job] = await harness.enqueue({"to": B, "message": "Your visa is approved", "whatsappTemplate": TEMPLATE})
    await harness.run()
    await settled(harness)
    pool = await harness.pool()
    await eventually(lambda: pool.queued_jobs())
    assert failures == 2
    assert [j.job_id for j in await pool.queued_jobs()] == [f"{job.job_id}:fallback"]
    assert await redis_client.xlen(keys.REACTIONS) == 0
    await harness.run()
    await settled(harness)
    assert [o["kind"] for o in harness.sim.state.outbox] == ["text", "whatsapp_template"]
    assert receiver.metric("cgb_reactions_total", kind="fallback") == 1


async def test_a_job_id_enqueued_again_after_arqs_result_expired_is_not_sent_again(
    harness: Harness, redis_client: Any
) -> None:
    """Symptom 3: a first try skipped the send log, so the same job id enqueued after ``WORKER_KEEP_RESULT``
    (but within the send log's seven days) sent a second WhatsApp message."""
    await harness.known(A)
    pool = await harness.pool()
    await pool.enqueue_job("whatsapp_send", {"to": A, "message": "visa approved"}, _job_id="visa-42")
    await harness.run()
    assert len(harness.sim.requests("send_text")) == 1
    await redis_client.delete("arq:result:visa-42")  # arq's result expired: it no longer knows the id
    job = await pool.enqueue_job("whatsapp_send", {"to": A, "message": "visa approved"}, _job_id="visa-42")
    assert job is not None  # arq takes it: only the send log can tell it was sent
    await harness.run()
    assert len(harness.sim.requests("send_text")) == 1
    result = await job.result(timeout=5)
    assert (result["kind"], result["success"]) == ("text", True)


async def test_a_late_status_is_not_starved_by_foreign_ones(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    """Symptom 5: only the first 100 held statuses were tried each turn; statuses of messages the worker did not
    send filled those places, and a real status expired unplaced."""
    harness.sim.configure(webhook_url=None)
    receiver.processor.orphan_grace = 6.0
    now = int(time.time())
    for i in range(150):  # a CGB bot's replies to people this worker never wrote to
        assert (await receiver.post(status_payload(f"wamid.BOT{i}", "sent", f"+1202555{i + 1000:04d}", ts=now)))[
            0
        ] == 200
    await eventually(lambda: _held_at_least(redis_client, 150), within=30)  # 150 posts: slow on a busy machine
    # a status for our coming send, stamped a little ahead (it overtook the worker's record)
    assert (await receiver.post(status_payload("wamid.OURS", "sent", A, ts=now + 2)))[0] == 200
    await eventually(
        lambda: _held_at_least(redis_client, 151), within=30
    )  # held behind the 150, before its send exists
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    found = await eventually(lambda: _status_is(harness, job.job_id, "sent"), within=5)
    assert found.wamid == "wamid.OURS"


async def _held_at_least(redis_client: Any, n: int) -> bool:
    return int(await redis_client.zcard(keys.ORPHANS)) >= n


async def test_a_second_job_to_one_person_with_its_own_file_waits_and_keeps_order(
    harness: Harness, receiver: Receiver
) -> None:
    """A job's file and then its text go out in that order, each after the previous one's first status."""
    harness.sim.configure(webhook_delay=0.2)
    await harness.known(A)
    [job] = await harness.enqueue(
        {"to": A, "fileUrl": "https://files.example/visa.pdf", "fileType": "document", "message": "your visa"}
    )
    await harness.run()
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert [(s.step, s.status, s.matched_by) for s in found.steps] == [
        ("file", "read", "recipient"),
        ("text", "read", "recipient"),
    ]
    assert [o["kind"] for o in harness.sim.state.outbox] == ["file", "text"]
    assert (await job.result(timeout=5))["attempts"] == 1


async def test_a_text_sent_twice_after_an_unknown_outcome_keeps_both_messages_and_the_next_job_its_own(
    harness: Harness, redis_url: str, redis_client: Any
) -> None:
    """Found by the attack on the first version: CGB sent the text, then answered 504; the retry sent it again.
    Placing the second copy's wamid closed the step altogether, so the first copy's late status went to the
    next job to that person. Now each copy is its own open message."""
    from cgb_worker.simulator import FaultRule

    from .test_webhooks import start_receiver

    rec, stop = await start_receiver(redis_url, clock_skew=1.0)
    harness.sim.configure(webhook_url=None)
    harness.set_env(STATUS_TURN_WAIT="0", CGB_TIMEOUT="300")
    harness.sim.state.faults.append(FaultRule(path="/send/text$", status=504, after=True, count=1))
    try:
        await harness.known(A)
        [m] = await harness.enqueue({"to": A, "message": "text of M"})
        await harness.run()
        assert (await m.result(timeout=5))["possibleDuplicate"] is True
        first, second = harness.sim.state.outbox
        assert (await rec.post(status_payload("wamid.SIM00000002", "sent", A, ts=second["at"] // 1000)))[0] == 200
        await eventually(lambda: _status_is(harness, m.job_id, "sent"))
        await asyncio.sleep(2.5)  # the turn lapsed long ago; the next job's request leaves past the skew
        [n] = await harness.enqueue({"to": A, "message": "text of N"})
        await harness.run()
        late = status_payload("wamid.SIM00000001", "delivered", A, ts=first["at"] // 1000)
        assert (await rec.post(late))[0] == 200
        own = status_payload("wamid.SIM00000003", "sent", A)
        assert (await rec.post(own))[0] == 200
        await eventually(lambda: _status_is(harness, n.job_id, "sent"))
        found_m, found_n = await status_of(harness, m.job_id), await status_of(harness, n.job_id)
        assert found_m.steps[0].wamids == ["wamid.SIM00000002", "wamid.SIM00000001"]
        assert found_n.steps[0].wamids == ["wamid.SIM00000003"]
    finally:
        await stop()


async def test_a_status_that_cannot_be_applied_spoils_neither_its_neighbours_nor_the_held_ones(
    harness: Harness, receiver: Receiver, redis_client: Any, monkeypatch: Any
) -> None:
    """Found by the attack on the first version: a timestamp of year 33658 passed the check and raised while
    applying, which dropped its whole POST; held, it raised on every retry and stopped all held statuses."""
    harness.sim.configure(webhook_url=None)
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    items = [
        {"id": "wamid.FAR", "status": "read", "timestamp": "999999999999", "recipient_id": A.lstrip("+")},
        {"id": "wamid.GOOD", "status": "sent", "timestamp": str(int(time.time())), "recipient_id": A.lstrip("+")},
    ]
    assert (await receiver.post(envelope({"statuses": items})))[0] == 200
    await eventually(lambda: _status_is(harness, job.job_id, "sent"))
    # whatever raises while one status is applied is set aside alone
    real = receiver.processor.matcher.queue

    def flaky(pipe: Any, pending: Any) -> None:
        if pending.status.id == "wamid.BOOM":
            raise ValueError("a bug")
        real(pipe, pending)

    monkeypatch.setattr(receiver.processor.matcher, "queue", flaky)
    ts = str(int(time.time()))
    items = [
        {"id": "wamid.BOOM", "status": "read", "timestamp": ts, "recipient_id": A.lstrip("+")},
        {"id": "wamid.GOOD", "status": "delivered", "timestamp": ts, "recipient_id": A.lstrip("+")},
    ]
    assert (await receiver.post(envelope({"statuses": items})))[0] == 200
    await eventually(lambda: _status_is(harness, job.job_id, "delivered"))
    reasons = [f[b"reason"] for _i, f in await redis_client.xrange(keys.MALFORMED)]
    assert reasons == [b"a status without a wamid or a Unix timestamp", b"applying it failed: ValueError"]
    # a held status that raises is given up alone; the others are still tried
    monkeypatch.setattr(receiver.processor.matcher, "queue", real)
    await redis_client.zadd(keys.ORPHANS, {b'[{"id": 1}, null]': 0})
    assert (await receiver.post(status_payload("wamid.NOBODY", "sent", B)))[0] == 200
    await eventually(lambda: redis_client.xlen(keys.UNMATCHED))
    assert receiver.metric("cgb_webhook_statuses_unmatched_total", reason="error") == 1
    receiver.processor.orphan_grace = 0.1
    await eventually(lambda: _unmatched_is(redis_client, 2))
    assert await redis_client.zcard(keys.ORPHANS) == 0


async def _unmatched_is(redis_client: Any, n: int) -> bool:
    return int(await redis_client.xlen(keys.UNMATCHED)) == n


async def test_a_job_that_waits_for_its_turn_past_arqs_tries_is_dead_lettered_not_dropped(
    harness: Harness, redis_client: Any, monkeypatch: Any
) -> None:
    """Found by the second attack: each deferral for a turn is one of arq's tries, and arq drops a job past its
    tries without a dead letter. Now the last try fails the job into the dead-letter store, with its own error."""
    import cgb_worker.jobs
    import cgb_worker.worker

    monkeypatch.setattr(cgb_worker.jobs, "ARQ_MAX_TRIES", 3)
    monkeypatch.setattr(cgb_worker.worker, "ARQ_MAX_TRIES", 3)
    monkeypatch.setattr(cgb_worker.jobs, "TURN_WAIT_MAX", 0.05)
    await harness.known(A)
    await redis_client.set(keys.TRACKING, "1", ex=60)
    await redis_client.set(keys.turn(keys.who(A)), "another-job|text", ex=60)  # never freed
    [job] = await harness.enqueue({"to": A, "message": "waits"})
    await harness.run()
    error = await harness.outcome(job)
    assert type(error).__name__ == "TurnBusyError"
    assert harness.sim.requests("send_text") == []
    from cgb_worker.deadletters import DeadLetters

    [entry] = await DeadLetters(redis_client).list()
    assert (entry.job_id, entry.error_type) == (job.job_id, "TurnBusyError")


async def test_a_replayed_fallback_template_joins_the_original_jobs_timeline(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    """Found by the second attack: a dead-lettered fallback template, replayed, wrote a timeline of its own under
    ``<id>:fallback``; the job's timeline missed the message that was sent."""
    from cgb_worker.deadletters import DeadLetters
    from cgb_worker.simulator import FaultRule

    await harness.known(B)
    harness.sim.state.contacts[int(B.lstrip("+"))]["last_inbound"] = None  # WhatsApp's window: shut
    await redis_client.set(window_key(B), f"o:{int(time.time() * 1000)}")  # what we believed: open
    harness.set_env(CGB_UNKNOWN_OUTCOME="fail")
    [job] = await harness.enqueue({"to": B, "message": "Your visa is approved", "whatsappTemplate": TEMPLATE})
    await harness.run()
    await settled(harness)
    # the template's first try: CGB sends it, then answers 500 (unknown outcome); its retry refuses to resend
    harness.sim.state.faults.append(FaultRule(path="send_content", status=500, after=True, count=1))
    await harness.run()
    dead = DeadLetters(redis_client)
    [entry] = await dead.list()
    assert entry.job_id == f"{job.job_id}:fallback"
    assert await dead.replay(await harness.pool(), entry.job_id)
    await harness.run()
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert [(s.step, s.fallback_for) for s in found.steps] == [("text", None), ("whatsapp_template", "text")]
    [template] = [s for s in found.steps if s.step == "whatsapp_template"]
    assert len(template.wamids) == 2  # the first copy and the replay's, both on the job's own timeline
    assert await status_of_or_none(harness, f"{job.job_id}:fallback") is None


async def status_of_or_none(harness: Harness, job_id: str) -> Any:
    from cgb_worker.receipts import delivery

    return await delivery(await harness.pool(), job_id)


async def test_a_resend_that_provably_sent_nothing_leaves_no_open_copy(harness: Harness, redis_client: Any) -> None:
    """The fourth attack's case: try 1 sent and timed out (unknown), try 2's resend was refused with a 429 (nothing
    went out), try 3 sent. Try 2's copy stayed in the awaiting set, so the step could never close and kept the
    person's next messages ambiguous. Now only the two copies that may have gone out stay."""
    from cgb_worker.simulator import FaultRule

    await harness.known(A)
    await redis_client.set(keys.TRACKING, "1", ex=60)
    harness.set_env(STATUS_TURN_WAIT="0")
    harness.sim.state.faults.extend(
        [
            FaultRule(path="/send/text$", status=504, after=True, count=1),
            FaultRule(path="/send/text$", status=429, count=1),
        ]
    )
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    result = await job.result(timeout=5)
    assert (result["attempts"], result["possibleDuplicate"]) == (3, True)
    assert len(harness.sim.state.outbox) == 2
    members = [m.decode() for m in await redis_client.zrange(keys.AWAITING, 0, -1)]
    assert len(members) == 2
    assert all(m.endswith(f"|{job.job_id}|text") for m in members)
