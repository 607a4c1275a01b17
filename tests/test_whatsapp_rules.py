"""WhatsApp's rules end to end: the simulator fails sends with Meta's error codes, its signed webhooks reach the
real receiver (out of order, some twice), real arq workers send on the real Redis, and the tests read what was
sent (the simulator's outbox and request log) and what was stored (timelines, keys, metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cgb_worker import errors as E
from cgb_worker import keys
from cgb_worker.settings import ReactionSettings
from cgb_worker.whatsapp_errors import RULES, base_step, chain, next_step, resend_delay, resends, rule_for

from .conftest import Harness
from .test_optouts import inbound
from .test_webhooks import Receiver, eventually, settled, start_receiver, status_of, status_payload

B = "+12025550100"
B_DIGITS = B.lstrip("+")
FAST = ReactionSettings(resend_delay=0.2, resend_factor=1.5, resend_max=3, undeliverable_ttl=60)


@pytest.fixture
async def rules_receiver(redis_url: str, harness: Harness) -> AsyncIterator[Receiver]:
    rec, stop = await start_receiver(redis_url, reactions=FAST)
    # production's shape: statuses posted on their own, in any order, a third of them twice
    harness.sim.configure(
        webhook_url=rec.url,
        webhook_secret="test-app-secret-not-real",
        webhook_delay=0.01,
        webhook_jitter=0.1,
        webhook_duplicate_rate=0.3,
        inbound_on_create=True,
    )
    try:
        yield rec
    finally:
        await stop()


def sends_to_cgb(harness: Harness) -> list[str]:
    """The send requests the simulator answered, by endpoint, in order."""
    return [r["endpoint"] for r in harness.sim.state.requests if r["endpoint"].startswith("send")]


async def reacted(receiver: Receiver, code: int) -> None:
    """The receiver has counted (so carried out) its reaction to a failure with ``code``."""

    async def done() -> bool:
        return receiver.metric("cgb_whatsapp_errors_total", code=str(code)) >= 1

    await eventually(done)


# -- the table ------------------------------------------------------------------------------------------------


def test_the_table_covers_every_code_the_issue_names() -> None:
    named = {131047, 131026, 132000, 132001, 132018, 131049, 131050, 131056, 131042, 131008, 130472}
    named |= {130429, 131057, 131051, 131052, 131053}
    assert named <= set(RULES)
    assert {c: RULES[c].action for c in (131056, 130429, 131057, 131049, 131050, 131026, 131047)} == {
        131056: "resend",
        130429: "throttle",
        131057: "throttle",
        131049: "marketing_cap",
        131050: "suppress",
        131026: "undeliverable",
        131047: "fallback",
    }
    assert all(RULES[c].action == "fail" for c in (132000, 132001, 132018, 131042, 131008, 130472, 131051))
    unknown = rule_for(999_999)  # a code Meta adds later, and 0 (a failed status with none)
    assert (unknown.action, unknown.retriable) == ("fail", False)
    assert rule_for(0).action == "fail"


def test_resends_are_named_and_paced() -> None:
    assert [resends(s) for s in ("text", "text~1", "text~12", "text~x")] == [0, 1, 12, 0]
    assert [base_step(s) for s in ("text", "file~3", "whatsapp_template~1")] == ["text", "file", "whatsapp_template"]
    assert (chain("text"), chain("text~2")) == (["text"], ["text", "text~1", "text~2"])
    assert [next_step(s) for s in ("text", "text~1", "whatsapp_template~2")] == [
        "text~1",
        "text~2",
        "whatsapp_template~3",
    ]
    assert [resend_delay(n, first=6, factor=4) for n in (1, 2, 3)] == [6, 24, 96]


# -- 131056: sent again after a backoff -------------------------------------------------------------------------


async def test_a_131056_is_sent_exactly_once_more_and_ends_delivered(
    harness: Harness, rules_receiver: Receiver
) -> None:
    harness.sim.configure(webhook_fail={B_DIGITS: [131056]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "Documents needed"})
    await harness.run()
    assert (await job.result())["category"] == "service"
    await reacted(rules_receiver, 131056)
    pool = await harness.pool()
    [resend] = await pool.queued_jobs()
    assert (resend.job_id, resend.kwargs) == (
        f"{job.job_id}:resend:text~1",
        {"resend_of": job.job_id, "resend_step": "text", "resend_code": 131056},
    )
    assert list(resend.args) == []  # the payload (phone, text) stays sealed in the record, not in arq's job
    waiting = await status_of(harness, job.job_id)
    assert (waiting.status, waiting.resending, waiting.steps[0].resending) == ("failed", True, "text~1")
    await harness.run()
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert [(s.step, s.status, s.error.code if s.error else None, s.resend_of) for s in found.steps] == [
        ("text", "failed", 131056, None),
        ("text~1", "read", None, "text"),
    ]
    assert (found.status, found.category, found.resending) == ("read", "service", False)
    assert [s.resending for s in found.steps] == [None, None]
    assert [o["kind"] for o in harness.sim.state.outbox] == ["text", "text"]
    assert [o["text"] for o in harness.sim.state.outbox] == ["Documents needed"] * 2
    await harness.run()  # nothing is left to send: exactly one more
    assert sends_to_cgb(harness) == ["send_text", "send_text"]
    assert rules_receiver.metric("cgb_reactions_total", kind="resend") == 1


async def test_a_resend_is_not_sent_once_another_device_reported_delivered(
    harness: Harness, rules_receiver: Receiver
) -> None:
    """failed 131056 then delivered (several devices, either order): the message was delivered, so its queued
    resend sends nothing, and the job's status is the original's."""
    harness.sim.configure(webhook_fail={B_DIGITS: [131056]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "Hello once"})
    await harness.run()
    await reacted(rules_receiver, 131056)
    await settled(harness)
    [wamid] = (await status_of(harness, job.job_id)).steps[0].wamids
    assert (await rules_receiver.post(status_payload(wamid, "delivered", B)))[0] == 200
    await settled(harness)
    [resend] = await (await harness.pool()).queued_jobs()
    await harness.run()
    result = await harness.outcome(await _job(harness, resend.job_id))
    assert (result["success"], result["error"]) == (
        False,
        "not sent again: the text it would replace was delivered after all",
    )
    assert sends_to_cgb(harness) == ["send_text"]
    found = await status_of(harness, job.job_id)
    assert ([(s.step, s.status) for s in found.steps], found.status) == ([("text", "delivered")], "delivered")


async def _job(harness: Harness, job_id: str) -> Any:
    from arq.jobs import Job

    from cgb_worker.serialization import deserialize

    return Job(job_id, await harness.pool(), _deserializer=deserialize)


async def test_131056_gives_up_after_the_last_resend(harness: Harness, rules_receiver: Receiver) -> None:
    harness.sim.configure(webhook_fail={B_DIGITS: [131056] * 5})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "hello"})
    for _ in range(FAST.resend_max + 1):
        await harness.run()
        await settled(harness)
    await eventually(lambda: _given_up(rules_receiver))
    assert await (await harness.pool()).queued_jobs() == []
    found = await status_of(harness, job.job_id)
    assert [(s.step, s.status) for s in found.steps] == [
        ("text", "failed"),
        ("text~1", "failed"),
        ("text~2", "failed"),
        ("text~3", "failed"),
    ]
    assert found.status == "failed"
    assert len(sends_to_cgb(harness)) == 1 + FAST.resend_max


async def _given_up(receiver: Receiver) -> bool:
    return receiver.metric("cgb_reactions_total", kind="given_up") == 1


async def test_a_resend_keeps_the_text_of_a_job_that_had_a_template_too(
    harness: Harness, rules_receiver: Receiver, redis_client: Any
) -> None:
    """The text went out because the window was open; its resend is the text again, not the template."""
    import time

    from cgb_worker.window import window_key

    harness.sim.configure(webhook_fail={B_DIGITS: [131056, 131047]})
    await harness.known(B)
    await redis_client.set(window_key(B), f"o:{int(time.time() * 1000)}")
    template = {"name": "visa_approved", "language": "en", "body": ["Dana"]}
    [job] = await harness.enqueue({"to": B, "message": "Your visa is approved", "whatsappTemplate": template})
    await harness.run()
    await reacted(rules_receiver, 131056)
    await harness.run()  # the text again, which WhatsApp now fails as outside the window: the template follows
    await reacted(rules_receiver, 131047)
    await harness.run()
    await settled(harness)
    assert [o["kind"] for o in harness.sim.state.outbox] == ["text", "text", "whatsapp_template"]
    found = await status_of(harness, job.job_id)
    assert [(s.step, s.status, s.resend_of, s.fallback_for) for s in found.steps] == [
        ("text", "failed", None, None),
        ("text~1", "failed", "text", None),
        ("whatsapp_template", "read", None, "text"),
    ]
    assert found.status == "read"


# -- throughput: 130429 and 131057 ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [130429, 131057])
async def test_a_throughput_code_slows_every_worker_and_sends_again(
    harness: Harness, rules_receiver: Receiver, redis_client: Any, code: int
) -> None:
    harness.sim.configure(webhook_fail={B_DIGITS: [code]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "hello"})
    await harness.run()
    await reacted(rules_receiver, code)
    assert await redis_client.exists(keys.RATE_PENALTY)  # the fleet's limit runs at half rate for a while
    assert float(await redis_client.get(keys.RATE_NEXT)) > 0  # and no slot before the pause ends
    await harness.run()
    await settled(harness)
    assert (await status_of(harness, job.job_id)).status == "read"
    assert sends_to_cgb(harness) == ["send_text", "send_text"]


# -- 131049: the marketing cap --------------------------------------------------------------------------------


async def test_a_131049_is_never_sent_again_at_once(harness: Harness, rules_receiver: Receiver) -> None:
    harness.sim.configure(webhook_fail={B_DIGITS: [131049]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "Sale!", "category": "marketing"})
    await harness.run()
    await reacted(rules_receiver, 131049)
    await settled(harness)
    assert await (await harness.pool()).queued_jobs() == []
    found = await status_of(harness, job.job_id)
    assert (found.status, found.error.code if found.error else None, found.category) == (
        "failed",
        131049,
        "marketing",
    )
    assert sends_to_cgb(harness) == ["send_text"]


async def test_a_131049_is_sent_once_more_after_marketing_cap_retry_after(harness: Harness, redis_url: str) -> None:
    rec, stop = await start_receiver(redis_url, reactions=ReactionSettings(marketing_cap_retry_after=0.3))
    try:
        harness.sim.configure(
            webhook_url=rec.url,
            webhook_secret="test-app-secret-not-real",
            webhook_delay=0.01,
            webhook_jitter=0.05,
            inbound_on_create=True,
        )
        harness.sim.configure(webhook_fail={B_DIGITS: [131049, 131049]})
        await harness.known(B)
        [job] = await harness.enqueue({"to": B, "message": "Sale!", "category": "marketing"})
        await harness.run()
        await reacted(rec, 131049)
        [resend] = await (await harness.pool()).queued_jobs()
        assert resend.kwargs["resend_code"] == 131049
        await harness.run()  # the resend fails with 131049 again: not a third time
        await settled(harness)
        await eventually(lambda: _count(rec, "cgb_whatsapp_errors_total", code="131049", at_least=2))
        await asyncio.sleep(0.3)
        assert await (await harness.pool()).queued_jobs() == []
        found = await status_of(harness, job.job_id)
        assert [(s.step, s.status) for s in found.steps] == [("text", "failed"), ("text~1", "failed")]
        assert sends_to_cgb(harness) == ["send_text", "send_text"]
    finally:
        await stop()


async def _count(receiver: Receiver, name: str, *, at_least: float, **labels: str) -> bool:
    return receiver.metric(name, **labels) >= at_least


# -- 131026: undeliverable ------------------------------------------------------------------------------------


async def test_a_131026_refuses_the_next_jobs_without_a_request(
    harness: Harness, rules_receiver: Receiver, redis_client: Any
) -> None:
    harness.sim.configure(webhook_fail={B_DIGITS: [131026]})
    await harness.known(B)
    [first] = await harness.enqueue({"to": B, "message": "hello"})
    await harness.run()
    await reacted(rules_receiver, 131026)
    ttl = await redis_client.ttl(keys.undeliverable(keys.who(B)))
    assert 0 < ttl <= FAST.undeliverable_ttl
    [second] = await harness.enqueue({"to": B, "message": "hello again", "category": "authentication"})
    await harness.run()
    error = await harness.outcome(second)
    assert isinstance(error, E.UndeliverableError)
    assert "131026" in str(error)
    assert sends_to_cgb(harness) == ["send_text"]  # the first job's only
    assert (await status_of(harness, first.job_id)).status == "failed"
    # the person writes to us: they can receive after all, and the mark goes
    await inbound(harness, B, "hi, it's me")
    await eventually(lambda: _gone(redis_client, keys.undeliverable(keys.who(B))))
    [third] = await harness.enqueue({"to": B, "message": "welcome back"})
    await harness.run()
    assert (await harness.outcome(third))["kind"] == "text"
    assert sends_to_cgb(harness) == ["send_text", "send_text"]


async def _gone(redis_client: Any, key: str) -> bool:
    return not await redis_client.exists(key)


# -- every other code -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [131042, 999_999])
async def test_any_other_code_is_final_and_counted(
    harness: Harness, rules_receiver: Receiver, code: int, capfd: Any
) -> None:
    """Tried: a code of the table (payment problem) and one no table lists. The receiver logs one line for the
    failure, with its code and meaning, and no phone."""
    harness.sim.configure(webhook_fail={B_DIGITS: [code]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "hello"})
    await harness.run()
    await reacted(rules_receiver, code)
    err = capfd.readouterr().err
    said = [line for line in err.splitlines() if "WhatsApp failed the text:" in line]
    assert len(said) == 1
    assert said[0].endswith(f"[{job.job_id}] WhatsApp failed the text: {code} ({rule_for(code).meaning})")
    assert B_DIGITS[-7:] not in err
    await settled(harness)
    assert await (await harness.pool()).queued_jobs() == []
    found = await status_of(harness, job.job_id)
    assert found.error is not None
    assert (found.status, found.error.code, found.error.meaning) == ("failed", code, rule_for(code).meaning)
    assert rules_receiver.metric("cgb_reactions_total", kind="fail") == 1
    assert sends_to_cgb(harness) == ["send_text"]


async def test_a_resend_whose_sealed_payload_is_gone_fails_without_a_request(
    harness: Harness, redis_client: Any
) -> None:
    """A resend job names its original; when that record expired (or was sealed under a rotated key), nothing is
    sent and the job fails as invalid. Tried: no record, and a payload that is not ours."""
    pool = await harness.pool()
    gone = await pool.enqueue_job("whatsapp_send", resend_of="job-x", resend_step="text", resend_code=131056)
    await redis_client.hset(keys.sends("job-y"), "p:text", b"not sealed by us")
    forged = await pool.enqueue_job("whatsapp_send", resend_of="job-y", resend_step="text", resend_code=131056)
    bad_step = await pool.enqueue_job("whatsapp_send", resend_of="job-y", resend_step="fax", resend_code=131056)
    await harness.run()
    for job in (gone, forged, bad_step):
        assert isinstance(await harness.outcome(job), E.InvalidJobError)
    assert sends_to_cgb(harness) == []


async def test_a_failure_with_no_kept_payload_is_not_resent(redis_url: str, redis_client: Any) -> None:
    """A send made while no receiver tracked sends keeps no payload: its 131056 stays failed, nothing is queued.
    Tried also: no record at all (expired), and WA_RESEND_MAX=0 with a payload kept."""
    from cgb_worker import create_pool
    from cgb_worker.metrics import ReceiverMetrics
    from cgb_worker.receipts.reactions import Reactor

    pool = await create_pool(redis_url, ride_out_outages=False)
    try:
        metrics = ReceiverMetrics()
        reactor = Reactor(pool, metrics, "r-1", FAST)
        await redis_client.hset(keys.sends("job-1"), "d:text", b'{"status":"failed","at":1}')
        assert await reactor.failed("job-1", "text", 131056) == "given_up"
        assert await reactor.failed("job-gone", "text", 130429) == "given_up"
        await reactor.react({b"kind": b"failed", b"job": b"job-1", b"step": b"text", b"code": b"131056"})
        await redis_client.hset(keys.sends("job-2"), mapping={"d:text": b'{"status":"failed"}', "p:text": b"x"})
        never = Reactor(pool, metrics, "r-1", ReactionSettings(resend_max=0))
        assert await never.failed("job-2", "text", 131056) == "given_up"
        assert await pool.queued_jobs() == []
        assert metrics.registry.get_sample_value("cgb_whatsapp_errors_total", {"code": "131056"}) == 1
        assert metrics.registry.get_sample_value("cgb_reactions_total", {"kind": "given_up"}) == 1
    finally:
        await pool.aclose()


# -- 131050: the person stopped marketing messages ------------------------------------------------------------


async def test_a_131050_suppresses_marketing_only(
    harness: Harness, rules_receiver: Receiver, redis_client: Any
) -> None:
    import json

    harness.sim.configure(webhook_fail={B_DIGITS: [131050]})
    await harness.known(B)
    [first] = await harness.enqueue({"to": B, "message": "Spring sale", "category": "marketing"})
    await harness.run()
    await reacted(rules_receiver, 131050)
    stored = json.loads(await redis_client.get(keys.suppressed(keys.who(B))))
    assert list(stored) == ["marketing"]
    assert stored["marketing"]["reason"] == "131050"
    [sale, visa] = await harness.enqueue(
        {"to": B, "message": "Another sale", "category": "marketing"},
        {"to": B, "message": "Your visa is approved", "category": "utility"},
    )
    await harness.run()
    refused = await harness.outcome(sale)
    assert isinstance(refused, E.SuppressedError)
    assert "suppressed for marketing" in str(refused)
    assert "131050" in str(refused)
    assert (await harness.outcome(visa))["category"] == "utility"
    assert [o["text"] for o in harness.sim.state.outbox] == ["Spring sale", "Your visa is approved"]
    assert (await status_of(harness, first.job_id)).status == "failed"
    assert rules_receiver.metric("cgb_reactions_total", kind="suppress") == 1


async def test_the_simulator_switch_fails_every_send_with_one_code(harness: Harness, rules_receiver: Receiver) -> None:
    harness.sim.configure(webhook_fail_code=131026)
    await harness.known(B, "+972500000001")
    jobs = await harness.enqueue({"to": B, "message": "one"}, {"to": "+972500000001", "message": "two"})
    await harness.run()
    await eventually(lambda: _count(rules_receiver, "cgb_whatsapp_errors_total", code="131026", at_least=2))
    for job in jobs:
        found = await status_of(harness, job.job_id)
        assert (found.status, found.error.code if found.error else None) == ("failed", 131026)
    assert [o["status"] for o in harness.sim.state.outbox] == ["failed", "failed"]


async def test_the_marketing_cap_is_resent_once_per_message_whatever_came_between(
    redis_url: str, redis_client: Any
) -> None:
    """131049, a 131056 resend, then 131049 again: the cap's one resend was used, so nothing more. Pacing resends
    count against WA_RESEND_MAX; the cap's one resend does not."""
    import json

    from cgb_worker import create_pool
    from cgb_worker.metrics import ReceiverMetrics
    from cgb_worker.receipts.reactions import Reactor

    def state(code: int | None) -> str:
        return json.dumps({"status": "failed", "at": 1, **({"resendCode": code} if code else {})})

    pool = await create_pool(redis_url, ride_out_outages=False)
    try:
        reactor = Reactor(pool, ReceiverMetrics(), "r-1", ReactionSettings(resend_max=3, marketing_cap_retry_after=60))
        await redis_client.hset(
            keys.sends("job-1"),
            mapping={"d:text": state(None), "d:text~1": state(131049), "d:text~2": state(131056), "p:text~2": "x"},
        )
        assert await reactor.failed("job-1", "text~2", 131049) == "fail"
        assert await pool.queued_jobs() == []
        paced = {f"d:text~{k}": state(131056) for k in (1, 2, 3)}
        await redis_client.hset(keys.sends("job-2"), mapping={"d:text": state(None), **paced, "p:text~3": "x"})
        assert await reactor.failed("job-2", "text~3", 131056) == "given_up"  # the fourth pacing resend: no
        assert await reactor.failed("job-2", "text~3", 131049) == "marketing_cap"  # the cap's own one: yes
        [queued] = await pool.queued_jobs()
        assert queued.job_id == "job-2:resend:text~4"
    finally:
        await pool.aclose()


async def test_a_dead_lettered_resend_replayed_is_the_same_resend(harness: Harness, rules_receiver: Receiver) -> None:
    """The resend hit a permanent CGB error and landed in the dead-letter store; replayed, it goes out as the
    job's ``text~1`` again (its timeline keeps the failed first attempt), not as a second ``text``."""
    from cgb_worker.deadletters import DeadLetters
    from cgb_worker.simulator import FaultRule

    harness.sim.configure(webhook_fail={B_DIGITS: [131056]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "Documents needed"})
    await harness.run()
    await reacted(rules_receiver, 131056)
    harness.sim.state.faults.append(FaultRule(status=400, path="/send/text$", count=1))
    await harness.run()
    pool = await harness.pool()
    store = DeadLetters(pool)
    [dead] = await store.list()
    assert (dead.job_id, dead.error_type) == (f"{job.job_id}:resend:text~1", "CGBBadRequestError")
    assert await store.replay(pool, dead.job_id)
    await harness.run()
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert [(s.step, s.status, s.resend_of) for s in found.steps] == [
        ("text", "failed", None),
        ("text~1", "read", "text"),
    ]
    assert found.status == "read"
    assert [o["text"] for o in harness.sim.state.outbox] == ["Documents needed"] * 2


@pytest.mark.parametrize("code", [10**15, 2**63 - 1, -5])
async def test_an_absurd_code_leaves_the_timeline_readable(
    harness: Harness, rules_receiver: Receiver, code: int
) -> None:
    """Tried: codes Lua's JSON would write as a float, and a negative one: kept as no code (0), final, counted."""
    harness.sim.configure(webhook_fail={B_DIGITS: [code]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "hello"})
    await harness.run()
    await reacted(rules_receiver, 0)
    found = await status_of(harness, job.job_id)
    assert found.error is not None
    assert (found.status, found.error.code, found.error.meaning) == ("failed", 0, rule_for(0).meaning)


async def test_a_flow_is_not_sent_again_automatically(harness: Harness, rules_receiver: Receiver) -> None:
    """A flow may send several messages; sending it again would send them all again. Its 131056 stays failed."""
    # the first message only reaches sent (a phone that is off), the second fails: the step turns failed
    harness.sim.configure(flow_messages=2, webhook_fail={B_DIGITS: [0, 131056]}, webhook_drop=["delivered", "read"])
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "template": "visa_approved"})
    await harness.run()
    await reacted(rules_receiver, 131056)
    await settled(harness)
    assert await (await harness.pool()).queued_jobs() == []
    assert rules_receiver.metric("cgb_reactions_total", kind="given_up") == 1
    assert len(harness.sim.state.outbox) == 2  # the flow's two messages, once
    found = await status_of(harness, job.job_id)
    assert ([s.step for s in found.steps], found.resending) == (["flow"], False)


async def test_reactions_that_cannot_act_say_so(redis_url: str, redis_client: Any) -> None:
    """Tried: a 131047 on a text with no template to fall back to, a 131050 and a 131026 on a send whose record
    does not say who it went to; a stale 131050 (stamped before the person's START); a long cap wait."""
    import json
    import time

    from cgb_worker import create_pool
    from cgb_worker.metrics import ReceiverMetrics
    from cgb_worker.receipts.reactions import Reactor
    from cgb_worker.suppression import suppress_who, unsuppress

    pool = await create_pool(redis_url, ride_out_outages=False)
    try:
        week = 8 * 86400
        reactor = Reactor(pool, ReceiverMetrics(), "r-1", ReactionSettings(marketing_cap_retry_after=week))
        await redis_client.hset(keys.sends("job-1"), "d:text", json.dumps({"status": "failed", "at": 1}))
        for code in (131047, 131050, 131026):
            assert await reactor.failed("job-1", "text", code) == "fail", code
        assert await redis_client.keys("cgb:suppressed:*") == []
        assert await redis_client.keys("cgb:undeliverable:*") == []

        who = keys.who(B)
        now = int(time.time() * 1000)
        state = json.dumps({"status": "failed", "at": 1, "who": who})
        await redis_client.hset(keys.sends("job-2"), mapping={"d:text": state, "p:text": "x"})
        await redis_client.expire(keys.sends("job-2"), 7 * 86400)
        await suppress_who(pool, who, scope="marketing", reason="keyword", at_ms=now - 60_000)
        assert await unsuppress(pool, B)  # the person wrote START a minute ago
        assert await reactor.failed("job-2", "text", 131050, at_ms=now - 120_000) == "suppress"
        assert "marketing" not in json.loads(await redis_client.get(keys.suppressed(who)))  # stale: changed nothing
        assert await reactor.failed("job-2", "text", 131050, at_ms=now + 5000) == "suppress"  # after the START
        assert "marketing" in json.loads(await redis_client.get(keys.suppressed(who)))

        assert await reactor.failed("job-2", "text", 131049) == "marketing_cap"
        assert await redis_client.ttl(keys.sends("job-2")) > week  # the payload outlives the wait for its resend
    finally:
        await pool.aclose()


async def test_a_resend_is_not_sent_once_any_earlier_copy_was_delivered(
    harness: Harness, rules_receiver: Receiver
) -> None:
    """text and text~1 failed 131056, text~2 is queued; then another device says the first copy was delivered:
    text~2 sends nothing, and the job no longer says a resend is on its way."""
    harness.sim.configure(webhook_fail={B_DIGITS: [131056, 131056]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "Hello once"})
    await harness.run()
    await reacted(rules_receiver, 131056)
    await harness.run()
    await eventually(lambda: _count(rules_receiver, "cgb_whatsapp_errors_total", code="131056", at_least=2))
    await settled(harness)
    first = (await status_of(harness, job.job_id)).steps[0]
    assert (await rules_receiver.post(status_payload(first.wamids[0], "delivered", B)))[0] == 200
    await settled(harness)
    [resend] = await (await harness.pool()).queued_jobs()
    assert resend.job_id.endswith(":resend:text~2")
    await harness.run()
    result = await harness.outcome(await _job(harness, resend.job_id))
    assert (result["success"], result["error"]) == (
        False,
        "not sent again: the text it would replace was delivered after all",
    )
    assert sends_to_cgb(harness) == ["send_text", "send_text"]
    found = await status_of(harness, job.job_id)
    assert (found.status, found.resending) == ("delivered", False)


async def test_a_resend_refused_for_good_leaves_no_resending_flag(harness: Harness, rules_receiver: Receiver) -> None:
    harness.sim.configure(webhook_fail={B_DIGITS: [131056]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "Documents needed"})
    await harness.run()
    await reacted(rules_receiver, 131056)
    assert (await status_of(harness, job.job_id)).resending
    await inbound(harness, B, "STOP")  # before the resend is due
    await settled(harness)
    await harness.run()
    [resend_id] = [f"{job.job_id}:resend:text~1"]
    assert isinstance(await harness.outcome(await _job(harness, resend_id)), E.SuppressedError)
    found = await status_of(harness, job.job_id)
    assert (found.status, found.resending, found.steps[0].resending) == ("failed", False, None)
    assert sends_to_cgb(harness) == ["send_text"]


async def test_a_resend_the_receiver_did_not_ask_for_sends_nothing(harness: Harness, rules_receiver: Receiver) -> None:
    """Tried: a resend enqueued by hand under another id after the real one was sent, and one under the right
    shape of id for a resend nobody queued (text~5)."""
    harness.sim.configure(webhook_fail={B_DIGITS: [131056]})
    await harness.known(B)
    [job] = await harness.enqueue({"to": B, "message": "Documents needed"})
    await harness.run()
    await reacted(rules_receiver, 131056)
    await harness.run()
    await settled(harness)
    pool = await harness.pool()
    forged = [
        await pool.enqueue_job(
            "whatsapp_send", resend_of=job.job_id, resend_step="text", resend_code=131056, _job_id="by-hand-1"
        ),
        await pool.enqueue_job(
            "whatsapp_send",
            resend_of=job.job_id,
            resend_step="text~4",
            resend_code=131056,
            _job_id=f"{job.job_id}:resend:text~5",
        ),
    ]
    await harness.run()
    for f in forged:
        assert isinstance(await harness.outcome(f), E.InvalidJobError)
    assert sends_to_cgb(harness) == ["send_text", "send_text"]
    assert [(s.step, s.status) for s in (await status_of(harness, job.job_id)).steps] == [
        ("text", "failed"),
        ("text~1", "read"),
    ]


async def test_a_throughput_code_on_a_flow_slows_the_fleet_without_a_resend(
    harness: Harness, rules_receiver: Receiver, redis_client: Any
) -> None:
    harness.sim.configure(webhook_fail={B_DIGITS: [130429]})
    await harness.known(B)
    await harness.enqueue({"to": B, "template": "visa_approved"})
    await harness.run()
    await reacted(rules_receiver, 130429)
    assert await redis_client.exists(keys.RATE_PENALTY)
    assert await (await harness.pool()).queued_jobs() == []


async def test_the_resent_text_of_a_file_job_says_it_is_a_text(harness: Harness, rules_receiver: Receiver) -> None:
    harness.sim.configure(webhook_fail={B_DIGITS: [0, 131056]})  # the file goes through, its text does not
    await harness.known(B)
    [job] = await harness.enqueue(
        {"to": B, "fileUrl": "https://files.example.test/v.pdf", "fileType": "document", "message": "Your visa"}
    )
    await harness.run()
    await reacted(rules_receiver, 131056)
    await harness.run()
    await settled(harness)
    result = await harness.outcome(await _job(harness, f"{job.job_id}:resend:text~1"))
    assert (result["kind"], result["success"]) == ("text", True)
    assert [o["kind"] for o in harness.sim.state.outbox] == ["file", "text", "text"]
    found = await status_of(harness, job.job_id)
    assert [(s.step, s.status) for s in found.steps] == [("file", "read"), ("text", "failed"), ("text~1", "read")]
