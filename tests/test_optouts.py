"""Opt-outs end to end: the simulator posts inbound STOP and START through the real receiver (signed, over HTTP, on
real Redis), real arq workers then refuse or send, and the simulator's own request log says what reached CGB."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
from loguru import logger

from cgb_worker import errors as E
from cgb_worker import keys
from cgb_worker.window import window_key

from .conftest import Harness
from .test_webhooks import TEMPLATE, Receiver, envelope, settled
from .test_webhooks import receiver as receiver

A = "+972500000001"
B = "+12025550100"
SENDS = ("send_text", "send_content", "send_file", "send_flow")


async def inbound(harness: Harness, phone: str, text: str) -> None:
    """The person writes ``text`` (the simulator posts Meta's webhook to the receiver); waits until it is processed."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(harness.sim.root + "/_sim/inbound", json={"phone": phone, "text": text}) as resp,
    ):
        assert resp.status == 200
    await settled(harness)


async def stored(redis: Any, phone: str) -> Any:
    """The entry, less ``seen`` (the keyed hashes of the last keyword messages, which dedupe redeliveries)."""
    raw = await redis.get(keys.suppressed(keys.who(phone)))
    if raw is None:
        return None
    entry = json.loads(raw)
    seen = entry.pop("seen", [])
    assert all(len(ref) == 16 and A.lstrip("+") not in ref for ref in seen)  # hashes, never the message id
    return entry


def sends(harness: Harness) -> list[dict[str, Any]]:
    return [r for r in harness.sim.requests() if r["endpoint"] in SENDS]


def suppressed_count(workers: list[Any], reason: str) -> float:
    return sum(
        w.ctx["metrics"].registry.get_sample_value("cgb_suppressed_total", {"reason": reason}) or 0 for w in workers
    )


async def test_stop_refuses_marketing_and_utility_sends_authentication_and_start_lifts_it(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    await harness.known(A)
    await inbound(harness, A, " Stop ")
    entry = await stored(redis_client, A)
    assert list(entry) == ["all"]
    assert entry["all"]["reason"] == "keyword"
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == {keys.who(A).encode()}
    assert await redis_client.exists(window_key(A))  # the STOP opened the window all the same
    harness.sim.state.requests.clear()

    marketing, utility, authentication = await harness.enqueue(
        {"to": A, "message": "50% off today", "category": "marketing"},
        {"to": A, "whatsappTemplate": TEMPLATE, "category": "utility"},
        {"to": A, "message": "Your code is 123456", "category": "authentication"},
    )
    workers = await harness.run()
    for job in (marketing, utility):
        error = await harness.outcome(job)
        assert isinstance(error, E.SuppressedError), error
        assert "suppressed for all since" in str(error)
        assert "the person sent an opt-out keyword (such as STOP)" in str(error)
    result = await authentication.result()
    assert (result["success"], result["kind"], result["category"]) == (True, "text", "authentication")
    [sent] = sends(harness)
    assert (sent["endpoint"], sent["body"]["text"]) == ("send_text", "Your code is 123456")
    assert [m["text"] for m in harness.sim.state.outbox if m.get("text")] == ["Your code is 123456"]
    assert suppressed_count(workers, "keyword") == 2

    await inbound(harness, A, "START")
    entry = await stored(redis_client, A)
    assert list(entry) == ["lifted"]
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == set()
    harness.sim.state.requests.clear()
    [again] = await harness.enqueue({"to": A, "message": "50% off today", "category": "marketing"})
    await harness.run()
    assert (await again.result())["success"] is True
    [sent] = sends(harness)
    assert (sent["endpoint"], sent["body"]["text"]) == ("send_text", "50% off today")


async def test_a_stop_then_a_start_in_one_batch_ends_unsuppressed(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    now = int(time.time())
    digits = A.lstrip("+")

    def message(n: int, body: str) -> dict[str, Any]:
        return {"from": digits, "id": f"wamid.IN{n}", "timestamp": str(now), "type": "text", "text": {"body": body}}

    value = {"contacts": [{"wa_id": digits}], "messages": [message(1, "STOP"), message(2, "start")]}
    assert (await receiver.post(envelope(value)))[0] == 200
    await settled(harness)
    assert await stored(redis_client, A) == {"lifted": now * 1000}
    # and the other way round: the person's last word stands
    value = {"contacts": [{"wa_id": digits}], "messages": [message(3, "START"), message(4, "unsubscribe")]}
    assert (await receiver.post(envelope(value)))[0] == 200
    await settled(harness)
    assert await stored(redis_client, A) == {"all": {"reason": "keyword", "at": now * 1000}, "lifted": now * 1000}
    # Meta redelivers the START of that body (the same message, the same second): the last word still stands
    redelivered = {"contacts": [{"wa_id": digits}], "messages": [message(3, "START")]}
    assert (await receiver.post(envelope(redelivered)))[0] == 200
    await settled(harness)
    assert (await stored(redis_client, A))["all"]["reason"] == "keyword"
    # and the first body's STOP, redelivered after all this, is not a new opt-out either
    start = {"contacts": [{"wa_id": digits}], "messages": [message(5, "START")]}  # a START of its own lifts it
    assert (await receiver.post(envelope(start)))[0] == 200
    redelivered = {"contacts": [{"wa_id": digits}], "messages": [message(1, "STOP")]}
    assert (await receiver.post(envelope(redelivered)))[0] == 200
    await settled(harness)
    assert "all" not in await stored(redis_client, A)


async def test_a_stop_from_a_sender_known_only_by_bsuid_suppresses_their_hash(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    now = str(int(time.time()))
    digits = A.lstrip("+")
    taught = {"contacts": [{"wa_id": digits, "user_id": "US.OPTOUT1"}], "messages": []}
    assert (await receiver.post(envelope(taught)))[0] == 200
    message = {"from_user_id": "US.OPTOUT1", "id": "wamid.IN9", "timestamp": now, "type": "text",
               "text": {"body": "STOP"}}  # fmt: skip
    assert (await receiver.post(envelope({"messages": [message]})))[0] == 200
    await settled(harness)
    assert (await stored(redis_client, A))["all"]["reason"] == "keyword"
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == {keys.who(A).encode()}


async def test_what_is_not_a_keyword_suppresses_no_one_and_is_not_set_aside(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    now = str(int(time.time()))
    senders = ["972500000001", "12025550100", "12025550101", "12025550102", "12025550103"]
    messages = [
        {"from": senders[0], "id": "wamid.N1", "timestamp": now, "type": "text", "text": {"body": "stop please"}},
        {"from": senders[1], "id": "wamid.N2", "timestamp": now, "type": "text", "text": {"body": "S T O P"}},
        {"from": senders[2], "id": "wamid.N3", "timestamp": now, "type": "button", "button": "STOP"},  # bad shape
        {"from": senders[3], "id": "wamid.N4", "timestamp": now, "type": "text", "text": "STOP"},  # not Meta's shape
        {"from": senders[4], "id": "wamid.N5", "timestamp": now, "type": "text", "text": {"body": 7}},
    ]
    logs: list[str] = []
    sink = logger.add(lambda m: logs.append(str(m)), level="DEBUG")
    try:
        assert (await receiver.post(envelope({"messages": messages})))[0] == 200
        await settled(harness)
    finally:
        logger.remove(sink)
    assert await redis_client.keys("cgb:suppressed*") == []
    assert await redis_client.xlen("cgb:webhooks:malformed") == 0
    for digits in senders:  # every message still opened its sender's window
        assert await redis_client.exists(window_key("+" + digits))
    assert receiver.metric("cgb_webhook_items_malformed_total") == 0
    assert not any("stop" in line.lower() or "97250" in line for line in logs)


async def test_a_cgb_contact_with_subscribed_2_is_suppressed_when_the_worker_reads_it(
    harness: Harness, redis_client: Any
) -> None:
    harness.sim.configure(unsubscribed=[A.lstrip("+")])
    await harness.known(A, cached=False)  # CGB has the contact; the worker has not read it yet
    [job] = await harness.enqueue({"to": A, "message": "Your visa is ready", "category": "utility"})
    workers = await harness.run()
    error = await harness.outcome(job)
    assert isinstance(error, E.SuppressedError), error
    assert "CGB's contact is unsubscribed (subscribed = 2)" in str(error)
    assert [r["endpoint"] for r in harness.sim.requests()] == ["get_contact"]  # read, never sent
    entry = await stored(redis_client, A)
    assert list(entry) == ["all"]
    assert entry["all"]["reason"] == "cgb_unsubscribed"
    assert suppressed_count(workers, "cgb_unsubscribed") == 1

    # now cached: the next jobs read the suppression with the contact, in the same round trip
    harness.sim.state.requests.clear()
    service, authentication = await harness.enqueue(
        {"to": A, "message": "hello"}, {"to": A, "message": "Your code is 654321", "category": "authentication"}
    )
    await harness.run()
    error = await harness.outcome(service)
    assert isinstance(error, E.SuppressedError), error
    assert "not sending a service message" in str(error)
    assert (await authentication.result())["success"] is True
    assert [(r["endpoint"], r["body"]["text"]) for r in harness.sim.requests()] == [
        ("send_text", "Your code is 654321")
    ]


async def test_a_subscribed_contact_is_not_suppressed(harness: Harness, redis_client: Any) -> None:
    harness.sim.configure(unsubscribed=[B.lstrip("+")])  # someone else
    await harness.known(A, cached=False)
    [job] = await harness.enqueue({"to": A, "message": "hello", "category": "marketing"})
    await harness.run()
    assert (await job.result())["success"] is True
    assert [r["endpoint"] for r in harness.sim.requests()] == ["get_contact", "send_text"]
    assert await redis_client.keys("cgb:suppressed*") == []


async def test_an_operators_marketing_suppression_refuses_marketing_only(harness: Harness, redis_client: Any) -> None:
    from cgb_worker import suppress

    await harness.known(A)
    assert await suppress(redis_client, A, scope="marketing") is True
    marketing, utility = await harness.enqueue(
        {"to": A, "message": "50% off", "category": "marketing"},
        {"to": A, "message": "Your visa", "category": "utility"},
    )
    workers = await harness.run()
    error = await harness.outcome(marketing)
    assert isinstance(error, E.SuppressedError), error
    assert "an operator suppressed this number" in str(error)
    assert (await utility.result())["success"] is True
    assert [r["body"]["text"] for r in sends(harness)] == ["Your visa"]
    assert suppressed_count(workers, "operator") == 1


async def test_a_stop_button_tapped_or_an_interactive_reply_opts_out(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    """A marketing template's quick-reply "STOP" button arrives as ``type: button``; a reply button as
    ``interactive``. Both are what the person said."""
    now = str(int(time.time()))
    tapped = {"from": "972500000001", "id": "wamid.B1", "timestamp": now, "type": "button",
              "button": {"text": "Stop", "payload": "opt-out"}}  # fmt: skip
    reply = {"type": "button_reply", "button_reply": {"id": "b1", "title": "UNSUBSCRIBE"}}
    replied = {"from": "12025550100", "id": "wamid.B2", "timestamp": now, "type": "interactive", "interactive": reply}
    assert (await receiver.post(envelope({"messages": [tapped, replied]})))[0] == 200
    await settled(harness)
    for phone in (A, "+12025550100"):
        entry = await stored(redis_client, phone)
        assert entry["all"]["reason"] == "keyword", phone
