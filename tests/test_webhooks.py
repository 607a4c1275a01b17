"""Delivery receipts, end to end: the simulator posts signed webhooks over HTTP to the real receiver, on real
Redis, for messages real arq workers sent; the tests read what was stored (timelines, the stream, the window)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from loguru import logger

from cgb_worker import errors as E
from cgb_worker.connection import RedisConfig
from cgb_worker.keys import AWAITING as ACCEPTED
from cgb_worker.keys import DELIVERIES as STREAM
from cgb_worker.keys import INBOX, MALFORMED, ORPHANS, SINCE, TRACKING, UNMATCHED
from cgb_worker.receipts import Delivery, Processor, create_app, delivery
from cgb_worker.receipts.app import METRICS, PROCESSOR, Endpoints
from cgb_worker.settings import ReceiverSettings, Secret
from cgb_worker.window import window_key

from .conftest import PHONE_KEY, Harness, free_port

SECRET = "test-app-secret-not-real"
VERIFY = "test-verify-token"
A = "+972500000001"
B = "+12025550100"
TEMPLATE = {"name": "visa_approved", "language": "en", "body": ["Dana"]}


class Receiver:
    def __init__(self, url: str, app: web.Application, redis: Any, admin: str = "") -> None:
        self.url = url
        self.app = app
        self.redis = redis
        self.admin = admin
        """The admin port's base URL (``/healthz``, ``/metrics``)."""

    @property
    def processor(self) -> Processor:
        return self.app[PROCESSOR]

    def metric(self, name: str, **labels: str) -> float:
        value = self.processor.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    async def post(self, payload: Any, *, secret: str = SECRET, raw: bytes | None = None) -> tuple[int, str]:
        body = raw if raw is not None else json.dumps(payload).encode()
        sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.url, data=io.BytesIO(body), headers={"X-Hub-Signature-256": sig}) as resp,
        ):
            return resp.status, await resp.text()


def settings(**changes: Any) -> ReceiverSettings:
    base: dict[str, Any] = {
        "app_secret": Secret(SECRET),
        "phone_hash_key": Secret(PHONE_KEY),
        "verify_token": Secret(VERIFY),
    }
    return ReceiverSettings(**{**base, **changes})


async def start_receiver(redis_url: str, **changes: Any) -> tuple[Receiver, Callable[[], Awaitable[None]]]:
    from cgb_worker import create_pool

    config = settings(redis=RedisConfig(redis_url), **changes)
    pool = await create_pool(redis_url, ride_out_outages=False)
    app = create_app(pool, config)
    endpoints = Endpoints(app, config)
    await endpoints.start("127.0.0.1", 0, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{endpoints.port}/webhooks/whatsapp"
    receiver = Receiver(url, app, pool, f"http://127.0.0.1:{endpoints.admin_port}")
    await eventually(lambda: pool.exists(TRACKING))

    async def stop() -> None:
        await endpoints.stop()
        await pool.aclose()

    return receiver, stop


@pytest.fixture
async def receiver(redis_url: str, redis_client: Any, harness: Harness) -> AsyncIterator[Receiver]:
    rec, stop = await start_receiver(redis_url)
    rec.processor.orphan_grace = 2.0
    # contacts the tests create have written to us, as far as the simulator's WhatsApp knows, unless a test says not
    harness.sim.configure(webhook_url=rec.url, webhook_secret=SECRET, webhook_delay=0.01, inbound_on_create=True)
    try:
        yield rec
    finally:
        await stop()


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 6.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: last {value!r}")
        await asyncio.sleep(0.02)


async def settled(harness: Harness) -> None:
    """Every webhook the simulator meant to post has been posted, and the receiver has processed it."""
    state = harness.sim.state

    async def done() -> bool:
        return not state.webhook_tasks

    await eventually(done)
    client = await harness.pool()
    await eventually(lambda: _inbox_empty(client))


async def _inbox_empty(client: Any) -> bool:
    if await client.xlen(INBOX):
        return False
    groups = await client.xinfo_groups(INBOX)
    return all(g["pending"] == 0 for g in groups)


async def status_of(harness: Harness, job_id: str, **kwargs: Any) -> Delivery:
    found = await delivery(await harness.pool(), job_id, **kwargs)
    assert found is not None
    return found


def envelope(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "200000000000001", "changes": [{"field": "messages", "value": value}]}],
    }


def status_payload(wamid: str, status: str, phone: str, *, ts: int | None = None, **extra: Any) -> dict[str, Any]:
    item = {"id": wamid, "status": status, "timestamp": str(ts or int(time.time())), "recipient_id": phone.lstrip("+")}
    return envelope({"statuses": [{**item, **extra}]})


def inbound_payload(phone: str, *, ts: int | None = None, user_id: str | None = None) -> dict[str, Any]:
    digits = phone.lstrip("+")
    contact: dict[str, Any] = {"profile": {"name": "Test"}, "wa_id": digits}
    if user_id:
        contact["user_id"] = user_id
    message = {"from": digits, "id": "wamid.IN1", "timestamp": str(ts or int(time.time())), "type": "text"}
    return envelope({"contacts": [contact], "messages": [{**message, "text": {"body": "hi"}}]})


async def stream(harness: Harness) -> list[dict[str, str]]:
    client = await harness.pool()
    return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in await client.xrange(STREAM)]


# -- the handshake, the signature, the size limit ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"}, (200, "1158201444")),
        ({"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"}, (403, "forbidden")),
        ({"hub.mode": "unsubscribe", "hub.verify_token": VERIFY, "hub.challenge": "1"}, (403, "forbidden")),
        ({"hub.verify_token": VERIFY, "hub.challenge": "1"}, (403, "forbidden")),
        ({}, (403, "forbidden")),
    ],
    ids=["right token", "wrong token", "not subscribe", "no mode", "nothing"],
)
async def test_handshake(receiver: Receiver, query: dict[str, str], expected: tuple[int, str]) -> None:
    async with aiohttp.ClientSession() as http, http.get(receiver.url, params=query) as resp:
        assert (resp.status, await resp.text()) == expected


async def test_handshake_refused_without_a_verify_token(redis_url: str, redis_client: Any) -> None:
    rec, stop = await start_receiver(redis_url, verify_token=None)
    try:
        query = {"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "5"}
        async with aiohttp.ClientSession() as http, http.get(rec.url, params=query) as resp:
            assert resp.status == 403
    finally:
        await stop()


@pytest.mark.parametrize(
    "case", ["no header", "wrong secret", "re-serialised body", "no sha256= prefix", "empty header"]
)
async def test_a_bad_signature_is_401_and_stores_nothing(receiver: Receiver, redis_client: Any, case: str) -> None:
    payload = status_payload("wamid.X", "sent", A)
    body = json.dumps(payload).encode()
    good = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "no header": {},
        "wrong secret": {"X-Hub-Signature-256": "sha256=" + hmac.new(b"other", body, hashlib.sha256).hexdigest()},
        "re-serialised body": {
            "X-Hub-Signature-256": "sha256="
            + hmac.new(SECRET.encode(), json.dumps(payload, indent=1).encode(), hashlib.sha256).hexdigest()
        },
        "no sha256= prefix": {"X-Hub-Signature-256": good},
        "empty header": {"X-Hub-Signature-256": ""},
    }[case]
    async with aiohttp.ClientSession() as http, http.post(receiver.url, data=body, headers=headers) as resp:
        assert resp.status == 401
    assert await redis_client.xlen(INBOX) == 0
    assert not await redis_client.exists(SINCE)
    assert receiver.metric("cgb_webhook_requests_total", outcome="bad_signature") == 1


async def test_a_body_over_three_mebibytes_is_413_and_three_is_taken(receiver: Receiver, redis_client: Any) -> None:
    def padded(size: int) -> bytes:
        head = b'{"object": "whatsapp_business_account", "entry": [], "pad": "'
        return head + b"x" * (size - len(head) - 2) + b'"}'

    status, _ = await receiver.post(None, raw=padded(3 * 1024 * 1024))
    assert status == 200
    # taken and stored (the processor may have handled it already: an empty entry list leaves nothing behind)
    assert receiver.metric("cgb_webhook_requests_total", outcome="stored") == 1
    await redis_client.delete(INBOX, MALFORMED)
    status, _ = await receiver.post(None, raw=padded(3 * 1024 * 1024 + 1))
    assert status == 413
    assert await redis_client.xlen(INBOX) == 0
    assert receiver.metric("cgb_webhook_requests_total", outcome="too_large") == 1


MALFORMED_CASES: list[tuple[str, bytes]] = [
    ("not JSON", b"{nope"),
    ("not an object", b"[1, 2]"),
    ("another object", json.dumps({"object": "page", "entry": []}).encode()),
    ("statuses not a list", json.dumps(envelope({"statuses": {"id": "w"}})).encode()),
    ("unknown status value", json.dumps(status_payload("wamid.X", "bounced", A)).encode()),
    ("timestamp not Unix seconds", json.dumps(status_payload("wamid.X", "sent", A, ts=None) | {}).encode()),
    ("no recipient", json.dumps(envelope({"statuses": [{"id": "w", "status": "sent", "timestamp": "1"}]})).encode()),
    (
        "no wamid",
        json.dumps(envelope({"statuses": [{"status": "sent", "timestamp": "1", "recipient_id": "1"}]})).encode(),
    ),
    ("error code a string", json.dumps(status_payload("w", "failed", A, errors=[{"code": "x"}])).encode()),
    ("entry missing", json.dumps({"object": "whatsapp_business_account"}).encode()),
    ("inbound without sender", json.dumps(envelope({"messages": [{"id": "m", "timestamp": "1"}]})).encode()),
]
# a timestamp in ISO form rather than Unix seconds
MALFORMED_CASES[5] = (
    "timestamp not Unix seconds",
    json.dumps(
        envelope(
            {"statuses": [{"id": "w", "status": "sent", "timestamp": "2026-12-02T10:00:00Z", "recipient_id": "1"}]}
        )
    ).encode(),
)


ENVELOPE_CASES = {"not JSON", "not an object", "another object", "entry missing"}


@pytest.mark.parametrize(("case", "body"), MALFORMED_CASES, ids=[c for c, _ in MALFORMED_CASES])
async def test_a_signed_malformed_payload_is_kept_and_touches_no_timeline(
    harness: Harness, receiver: Receiver, redis_client: Any, case: str, body: bytes
) -> None:
    harness.sim.configure(webhook_url=None)
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    status, _ = await receiver.post(None, raw=body)
    assert status == 200
    if case in ENVELOPE_CASES:  # the body as a whole is not a WhatsApp webhook: kept whole (redacted), counted
        kept = await eventually(lambda: redis_client.xrange(MALFORMED))
        assert len(kept) == 1
        assert b"body" in kept[0][1]
        await eventually(lambda: _inbox_empty(redis_client))
        assert receiver.metric("cgb_webhook_requests_total", outcome="malformed") == 1
    else:  # one item is set aside, on its own, once the stored webhook is processed
        kept = await eventually(lambda: redis_client.xrange(MALFORMED))
        assert len(kept) == 1
        assert b"item" in kept[0][1]
        assert receiver.metric("cgb_webhook_items_malformed_total") == 1
    assert kept[0][1][b"reason"]
    found = await status_of(harness, job.job_id)
    assert (found.status, [e.status for e in found.events]) == ("accepted", ["accepted"])


@pytest.mark.parametrize("odd", ["deleted", "warning", "payment_captured"])
async def test_an_unknown_status_value_is_set_aside_and_its_neighbours_are_applied(
    harness: Harness, receiver: Receiver, redis_client: Any, odd: str
) -> None:
    harness.sim.configure(webhook_url=None)
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    ts = str(int(time.time()))
    items = [
        {"id": "wamid.ODD1", "status": odd, "timestamp": ts, "recipient_id": A.lstrip("+")},
        {"id": "wamid.GOOD1", "status": "sent", "timestamp": ts, "recipient_id": A.lstrip("+")},
        {"id": "wamid.ODD2", "status": "sent", "timestamp": "²", "recipient_id": A.lstrip("+")},
    ]
    assert (await receiver.post(envelope({"statuses": items})))[0] == 200
    await eventually(lambda: _inbox_empty(redis_client))
    found = await status_of(harness, job.job_id)
    assert (found.status, found.wamid) == ("sent", "wamid.GOOD1")
    kept = await redis_client.xrange(MALFORMED)
    assert sorted(json.loads(f[b"item"])["id"] for _i, f in kept) == ["wamid.ODD1", "wamid.ODD2"]
    assert receiver.metric("cgb_webhook_items_malformed_total") == 2


async def test_other_fields_are_valid_and_ignored(receiver: Receiver, redis_client: Any) -> None:
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {"id": "1", "changes": [{"field": "message_template_status_update", "value": {"event": "APPROVED"}}]}
        ],
    }
    assert (await receiver.post(payload))[0] == 200
    assert await redis_client.xlen(MALFORMED) == 0
    await eventually(lambda: _inbox_empty(redis_client))
    assert receiver.metric("cgb_webhook_requests_total", outcome="ok") == 1


# -- timelines ----------------------------------------------------------------------------------------------------


async def test_a_text_becomes_sent_delivered_read(harness: Harness, receiver: Receiver, redis_client: Any) -> None:
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    result = await job.result()
    assert result["window"] == "unknown"
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert found.status == "read"
    assert found.wamid == "wamid.SIM00000001"
    assert [e.status for e in found.events] == ["accepted", "sent", "delivered", "read"]
    [step] = found.steps
    assert (step.step, step.matched_by, step.wa_id) == ("text", "recipient", None)  # no phone in the record
    assert found.events[1].meta is not None
    assert found.events[1].meta["pricing"]["category"] == "utility"
    assert [(e["job"], e["step"], e["status"], e["wamid"]) for e in await stream(harness)] == [
        (job.job_id, "text", s, "wamid.SIM00000001") for s in ("sent", "delivered", "read")
    ]
    assert await redis_client.zcard(ACCEPTED) == 0  # matched: no longer waiting
    for status in ("sent", "delivered", "read"):
        assert receiver.metric("cgb_deliveries_total", status=status) == 1
    assert receiver.metric("cgb_delivery_seconds_count") == 1
    assert receiver.metric("cgb_webhook_requests_total", outcome="ok") == 3


@pytest.mark.parametrize(
    ("switches", "final", "changes"),
    [
        ({"webhook_out_of_order": True}, "read", ["read"]),
        ({"webhook_drop": ["delivered"]}, "read", ["sent", "read"]),
        ({"webhook_read": False}, "delivered", ["sent", "delivered"]),
        ({"webhook_duplicates": True}, "read", ["sent", "delivered", "read"]),
        ({"webhook_duplicates": True, "webhook_out_of_order": True}, "read", ["read"]),
    ],
    ids=["out of order", "delivered missing", "not read", "every status twice", "twice and out of order"],
)
async def test_status_moves_forward_only(
    harness: Harness, receiver: Receiver, switches: dict[str, Any], final: str, changes: list[str]
) -> None:
    harness.sim.configure(**switches)
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert found.status == final
    arrived = [s["status"] for s in harness.sim.state.status_objects(harness.sim.state.outbox[0])]
    arrived = [s for s in arrived if s not in switches.get("webhook_drop", [])]
    if switches.get("webhook_out_of_order"):
        arrived.reverse()
    assert [e.status for e in found.steps[0].events] == ["accepted", *arrived]  # late ones kept, never twice
    assert [e["status"] for e in await stream(harness)] == changes
    duplicates = receiver.metric("cgb_webhook_requests_total", outcome="duplicate")
    assert duplicates == (len(arrived) if switches.get("webhook_duplicates") else 0)


async def test_a_late_status_is_kept_but_does_not_move_the_status_back(harness: Harness, receiver: Receiver) -> None:
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    await settled(harness)
    status, _ = await receiver.post(
        status_payload("wamid.SIM00000001", "failed", A, errors=[{"code": 131026, "title": "Undeliverable"}])
    )
    assert status == 200
    await eventually(lambda: _inbox_empty(receiver.redis))
    found = await status_of(harness, job.job_id)
    assert (found.status, found.error) == ("read", None)
    assert [e.status for e in found.events][-1] == "failed"


async def test_two_messages_of_one_job_each_have_a_timeline(harness: Harness, receiver: Receiver) -> None:
    harness.sim.configure(webhook_read=False)
    await harness.known(A)
    await harness.sim.state.post_webhook({})  # nothing: the simulator's first post is not our concern
    [job] = await harness.enqueue(
        {"to": A, "message": "your form", "fileUrl": "https://example.com/f.pdf", "fileType": "document"}
    )
    await harness.run()
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert [(s.step, s.status) for s in found.steps] == [("file", "delivered"), ("text", "delivered")]
    assert found.status == "delivered"
    assert {s.wamid for s in found.steps} == {"wamid.SIM00000001", "wamid.SIM00000002"}
    assert found.wamid == found.steps[-1].wamid


async def test_free_text_outside_the_window_fails_131047_and_shuts_the_window(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    await harness.known(B)
    harness.sim.state.contacts[int(B.lstrip("+"))]["last_inbound"] = None
    [job] = await harness.enqueue({"to": B, "message": "hello"})
    await harness.run()
    assert (await job.result())["success"] is True  # what CGB said
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert found.status == "failed"
    assert found.error is not None
    assert found.error.code == 131047
    assert [e["error"] for e in await stream(harness)] == ["131047"]
    assert (await redis_client.get(window_key(B))).startswith(b"c:")
    [second] = await harness.enqueue({"to": B, "message": "again"})
    await harness.run()
    assert (await second.result())["window"] == "closed"


# -- matching ------------------------------------------------------------------------------------------------------


async def test_a_status_that_overtakes_the_send_is_matched_once_the_send_is_recorded(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    harness.sim.configure(webhook_url=None)
    await harness.known(A)
    assert (await receiver.post(status_payload("wamid.EARLY", "sent", A)))[0] == 200
    await eventually(lambda: redis_client.zcard(ORPHANS))
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    found = await eventually(lambda: _status_is(harness, job.job_id, "sent"))
    assert (found.wamid, found.steps[0].matched_by) == ("wamid.EARLY", "recipient")
    assert await redis_client.zcard(ORPHANS) == 0


async def _status_is(harness: Harness, job_id: str, status: str) -> Delivery | None:
    found = await delivery(await harness.pool(), job_id)
    return found if found is not None and found.status == status else None


async def test_a_status_that_matches_nothing_is_kept_as_unmatched(receiver: Receiver, redis_client: Any) -> None:
    receiver.processor.orphan_grace = 0.2
    assert (await receiver.post(status_payload("wamid.NOBODY", "delivered", B)))[0] == 200
    await eventually(lambda: redis_client.xlen(UNMATCHED))
    [(_id, fields)] = await redis_client.xrange(UNMATCHED)
    assert json.loads(fields[b"status"])[0]["id"] == "wamid.NOBODY"
    assert await redis_client.zcard(ORPHANS) == 0
    assert receiver.metric("cgb_webhook_statuses_unmatched_total", reason="none") == 1


async def test_two_sends_to_one_person_never_swap_whichever_status_comes_first(
    harness: Harness, redis_url: str, redis_client: Any
) -> None:
    """Symptom 1 of the attribution issue: B's first status arriving before A's gave A B's wamid (and B A's). Here
    the turn is made to lapse (no status came within it), so both sends are out at once: B's status is held as
    ambiguous, A's is A's by its time, and B's then is B's."""
    rec, stop = await start_receiver(redis_url, clock_skew=1.0)
    rec.processor.orphan_grace = 10.0
    harness.sim.configure(webhook_url=None)
    harness.set_env(STATUS_TURN_WAIT="0", CGB_TIMEOUT="200")  # the turn lapses after 0.2 s
    try:
        await harness.known(A)
        [first] = await harness.enqueue({"to": A, "message": "one"})
        await harness.run()
        await asyncio.sleep(2.5)
        [second] = await harness.enqueue({"to": A, "message": "two"})
        await harness.run()
        a_sent = (await status_of(harness, first.job_id)).steps[0].accepted_at
        a_ts = int(datetime.fromisoformat(a_sent.replace("Z", "+00:00")).timestamp())
        assert (await rec.post(status_payload("wamid.TWO", "sent", A)))[0] == 200
        await eventually(lambda: redis_client.zcard(ORPHANS))  # held: it could be either send's
        assert (await status_of(harness, second.job_id)).status == "accepted"
        assert (await rec.post(status_payload("wamid.ONE", "sent", A, ts=a_ts)))[0] == 200
        await eventually(lambda: _status_is(harness, first.job_id, "sent"))
        await eventually(lambda: _status_is(harness, second.job_id, "sent"), within=8)
        one, two = await status_of(harness, first.job_id), await status_of(harness, second.job_id)
        assert (one.wamid, one.steps[0].matched_by) == ("wamid.ONE", "recipient")
        assert (two.wamid, two.steps[0].matched_by) == ("wamid.TWO", "recipient")
        # A's text then fails outside the window: A is failed, B is untouched
        failed = status_payload("wamid.ONE", "failed", A, ts=a_ts + 1, errors=[{"code": 131047, "title": "x"}])
        assert (await rec.post(failed))[0] == 200
        await eventually(lambda: _status_is(harness, first.job_id, "failed"))
        assert (await status_of(harness, second.job_id)).status == "sent"
        assert await redis_client.zcard(ORPHANS) == 0
    finally:
        await stop()


async def test_a_second_message_to_one_person_waits_for_the_first_status(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    harness.sim.configure(webhook_delay=0.3)
    await harness.known(A)
    first, second = await harness.enqueue({"to": A, "message": "one"}, {"to": A, "message": "two"})
    await harness.run()
    await settled(harness)
    sends = harness.sim.requests("send_text")
    assert len(sends) == 2
    one, two = await status_of(harness, first.job_id), await status_of(harness, second.job_id)
    assert {one.status, two.status} == {"read"}
    assert one.wamid != two.wamid
    # the later send left only after the earlier one's first status arrived
    statuses = [
        w for w in harness.sim.state.webhooks if w["payload"]["entry"][0]["changes"][0]["value"].get("statuses")
    ]
    first_status_at = statuses[0]["posted_at"]
    assert sends[1]["at"] >= first_status_at
    result = await second.result(timeout=5)
    assert result["attempts"] == 1  # waiting for the turn used up no attempt
    assert not await redis_client.exists("cgb:turn:" + __import__("cgb_worker").keys.who(A))


async def test_a_send_older_than_the_match_window_is_not_taken(
    harness: Harness, redis_url: str, redis_client: Any
) -> None:
    rec, stop = await start_receiver(redis_url, match_window=1.0)
    try:
        rec.processor.orphan_grace = 0.1
        await harness.known(A)
        [job] = await harness.enqueue({"to": A, "message": "hello"})
        await harness.run()
        assert (await rec.post(status_payload("wamid.LATE", "sent", A, ts=int(time.time()) + 120)))[0] == 200
        await eventually(lambda: redis_client.xlen(UNMATCHED))
        assert (await status_of(harness, job.job_id)).status == "accepted"
    finally:
        await stop()


async def test_business_scoped_user_ids_match_when_the_phone_is_withheld(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    harness.sim.configure(webhook_user_ids=True, webhook_withhold_phone=True)
    await harness.known(A)
    user_id = harness.sim.state.user_id(A)
    # an inbound message with both ids teaches the receiver which phone the BSUID belongs to
    assert (await receiver.post(inbound_payload(A, user_id=user_id)))[0] == 200
    await eventually(lambda: _inbox_empty(redis_client))
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert found.status == "read"
    assert (found.steps[0].user_id, found.steps[0].wa_id) == (user_id, None)
    assert "recipient_id" not in (found.events[1].meta or {})


# -- the window -------------------------------------------------------------------------------------------------


async def test_an_inbound_message_opens_the_window(harness: Harness, receiver: Receiver, redis_client: Any) -> None:
    await harness.known(A)
    assert (await receiver.post(inbound_payload(A)))[0] == 200
    await eventually(lambda: redis_client.exists(window_key(A)))
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    assert (await job.result())["window"] == "open"


async def test_an_older_inbound_does_not_overwrite_a_newer_one(receiver: Receiver, redis_client: Any) -> None:
    now = int(time.time())
    for ts in (now, now - 90000):
        assert (await receiver.post(inbound_payload(A, ts=ts)))[0] == 200
        await eventually(lambda: _inbox_empty(redis_client))
    assert await redis_client.get(window_key(A)) == f"o:{now * 1000}".encode()


async def test_no_record_reads_closed_once_the_receiver_has_listened_for_a_day(
    harness: Harness, redis_client: Any
) -> None:
    await harness.known(A)
    await redis_client.set(SINCE, int((time.time() - 90000) * 1000))
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    assert (await job.result())["window"] == "closed"
    await redis_client.set(SINCE, int((time.time() - 3600) * 1000))
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    assert (await job.result())["window"] == "unknown"


async def test_outside_window_fail_refuses_text_and_file_before_any_cgb_call(
    harness: Harness, redis_client: Any
) -> None:
    harness.set_env(CGB_OUTSIDE_WINDOW="fail")
    await harness.known(A, cached=False)
    await redis_client.set(window_key(A), f"c:{int(time.time() * 1000)}")
    jobs = await harness.enqueue(
        {"to": A, "message": "hello"},
        {"to": A, "fileUrl": "https://example.com/a.pdf", "fileType": "document"},
    )
    await harness.run()
    for job in jobs:
        error = await harness.outcome(job)
        assert isinstance(error, E.OutsideWindowError), error
    assert harness.sim.requests() == []
    assert sorted(m.decode() for m in await redis_client.zrange("cgb:dead:index", 0, -1)) == sorted(
        j.job_id for j in jobs
    )


@pytest.mark.parametrize(
    ("window", "sent"),
    [("open", "text"), ("closed", "whatsapp_template"), ("unknown", "whatsapp_template")],
)
async def test_message_and_template_send_by_the_window(
    harness: Harness, redis_client: Any, window: str, sent: str
) -> None:
    await harness.known(A)
    if window == "open":
        await redis_client.set(window_key(A), f"o:{int(time.time() * 1000)}")
    elif window == "closed":
        await redis_client.set(window_key(A), f"c:{int(time.time() * 1000)}")
    [job] = await harness.enqueue({"to": A, "message": "Your visa is approved", "whatsappTemplate": TEMPLATE})
    await harness.run()
    result = await job.result()
    assert (result["kind"], result["window"]) == (sent, window)
    [request] = harness.sim.requests()
    assert request["endpoint"] == ("send_text" if sent == "text" else "send_content")
    if sent == "text":
        assert request["body"]["text"] == "Your visa is approved"
    else:
        assert request["body"]["messages"][0]["template"]["name"] == "visa_approved"


async def test_a_text_failed_131047_is_followed_by_its_template_once(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    harness.sim.configure(webhook_duplicates=True)
    await harness.known(B)
    harness.sim.state.contacts[int(B.lstrip("+"))]["last_inbound"] = None  # WhatsApp's window: shut
    await redis_client.set(window_key(B), f"o:{int(time.time() * 1000)}")  # what we believed: open
    [job] = await harness.enqueue({"to": B, "message": "Your visa is approved", "whatsappTemplate": TEMPLATE})
    await harness.run()
    assert (await job.result())["kind"] == "text"
    await settled(harness)
    pool = await harness.pool()
    queued = await pool.queued_jobs()
    assert [(j.job_id, j.kwargs.get("fallback_of")) for j in queued] == [(f"{job.job_id}:fallback", job.job_id)]
    await harness.run()
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert [(s.step, s.status, s.fallback_for) for s in found.steps] == [
        ("text", "failed", None),
        ("whatsapp_template", "read", "text"),
    ]
    assert found.status == "read"
    assert [o["kind"] for o in harness.sim.state.outbox] == ["text", "whatsapp_template"]


# -- durability --------------------------------------------------------------------------------------------------


async def test_a_webhook_stored_by_a_receiver_that_died_is_processed_by_the_next(
    harness: Harness, redis_url: str, redis_client: Any
) -> None:
    from cgb_worker import create_pool
    from cgb_worker.metrics import ReceiverMetrics

    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await redis_client.set(TRACKING, "1")
    await harness.run()
    pool = await create_pool(redis_url, ride_out_outages=False)
    try:
        # a receiver that stores and answers 200 but never processes (it dies right after)
        app = create_app(pool, settings(redis=RedisConfig(redis_url)), process=False, monitor=False)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        rec = Receiver(f"http://127.0.0.1:{port}/webhooks/whatsapp", app, pool)
        assert (await rec.post(status_payload("wamid.D1", "delivered", A)))[0] == 200
        await runner.cleanup()
        # a consumer that took the entry and died before acknowledging it
        processor = Processor(pool, settings(), ReceiverMetrics(), consumer="dead-one")
        await processor.ensure_group()
        await pool.xreadgroup("receivers", "dead-one", {INBOX: ">"}, count=10)
        assert (await status_of(harness, job.job_id)).status == "accepted"
        survivor = Processor(pool, settings(), ReceiverMetrics(), consumer="survivor")
        assert await survivor.turn(block_ms=10) == 1
        assert (await status_of(harness, job.job_id)).status == "delivered"
        assert await pool.xlen(INBOX) == 0
    finally:
        await pool.aclose()


async def test_without_a_receiver_nothing_is_tracked_and_the_timeline_says_accepted(
    harness: Harness, redis_client: Any
) -> None:
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    assert not await redis_client.exists(ACCEPTED)
    found = await status_of(harness, job.job_id)
    assert (found.status, [s.step for s in found.steps]) == ("accepted", ["text"])
    assert (await status_of(harness, job.job_id, unconfirmed_after=0.0)).status == "unconfirmed"


async def test_a_send_without_any_status_becomes_unconfirmed(
    harness: Harness, redis_url: str, redis_client: Any
) -> None:
    rec, stop = await start_receiver(redis_url, unconfirmed_after=0.3)
    try:
        await harness.known(A)
        [job] = await harness.enqueue({"to": A, "message": "hello"})
        await harness.run()
        assert await redis_client.zcard(ACCEPTED) == 1
        await asyncio.sleep(0.4)
        assert await rec.processor.sweep() == 1
        assert await rec.processor.sweep() == 0  # once
        assert (await status_of(harness, job.job_id, unconfirmed_after=3600)).status == "unconfirmed"
        assert [e["status"] for e in await stream(harness)] == ["unconfirmed"]
        assert rec.metric("cgb_deliveries_total", status="unconfirmed") == 1
        # unconfirmed is not an end: a status that comes later (Meta redelivering after an outage) still finds it
        assert await redis_client.zcard(ACCEPTED) == 1
        assert (await rec.post(status_payload("wamid.LATE", "delivered", A)))[0] == 200
        await eventually(lambda: _status_is(harness, job.job_id, "delivered"))
        assert (await status_of(harness, job.job_id)).steps[0].matched_by == "recipient"
        assert await redis_client.zcard(ACCEPTED) == 0
    finally:
        await stop()


async def test_the_stream_is_read_with_a_consumer_group(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    """What the README shows a producer doing."""
    await redis_client.xgroup_create(STREAM, "visa-backend", id="0", mkstream=True)
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    await settled(harness)
    read = await redis_client.xreadgroup("visa-backend", "backend-1", {STREAM: ">"}, count=10)
    [(_name, entries)] = read
    assert [(f[b"job"].decode(), f[b"status"].decode()) for _id, f in entries] == [
        (job.job_id, "sent"),
        (job.job_id, "delivered"),
        (job.job_id, "read"),
    ]
    await redis_client.xack(STREAM, "visa-backend", *[i for i, _ in entries])


async def test_the_receiver_logs_no_phone_wamid_text_or_secret(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    harness.sim.configure(webhook_delay=0.3)  # the statuses come once the worker has run, and the sink is on
    await harness.known(B)
    harness.sim.state.contacts[int(B.lstrip("+"))]["last_inbound"] = None
    await redis_client.set(window_key(B), f"o:{int(time.time() * 1000)}")
    await harness.enqueue({"to": B, "message": "secret visa text", "whatsappTemplate": TEMPLATE})
    await harness.run()  # sets up logging afresh, so the sink goes on after it
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    try:
        await receiver.post(inbound_payload(A))
        await settled(harness)
        await receiver.post(None, raw=b"{bad")
        await receiver.post(status_payload("wamid.Z", "sent", A), secret="wrong")
    finally:
        logger.remove(sink)
    text = "\n".join(lines)
    for needle in (A.lstrip("+"), B.lstrip("+"), "wamid.", "secret visa text", SECRET):
        assert needle not in text, needle
    assert "131047" in text  # the receiver did log what happened, by code


def test_an_index_member_sorts_by_recipient_then_time_and_parses_back() -> None:
    from cgb_worker.keys import who
    from cgb_worker.sends import awaiting_member, parse_member

    m = awaiting_member(who(A), 1764650000123, 0, "job|with|bars|text")
    assert parse_member(m) == (who(A), 1764650000123, 0, "job|with|bars", "text")
    assert A.lstrip("+") not in m  # phones appear in Redis only hashed
    ordered = sorted(
        [awaiting_member(who(A), 1764650000999, 0, "b|text"), awaiting_member(who(A), 1764650000123, 0, "a|text")]
    )
    assert [parse_member(x)[3] for x in ordered] == ["a", "b"]


async def test_matching_takes_the_recipients_send_among_thousands_waiting(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    from cgb_worker.sends import StepRecord

    now = int(time.time() * 1000)
    others = [StepRecord(f"other-{i}", "text", f"+1202555{i:04d}", now - 1000, True) for i in range(3000)]
    mine = StepRecord("mine", "text", A, now - 500, True)
    async with redis_client.pipeline(transaction=False) as pipe:
        for rec in [*others, mine]:
            pipe.hset(f"cgb:sends:{rec.delivery_id}", mapping={**rec.fields(), "text": "sent"})
            pipe.zadd(ACCEPTED, {rec.member: 0})
        await pipe.execute()
    assert (await receiver.post(status_payload("wamid.MINE", "delivered", A)))[0] == 200
    await eventually(lambda: _status_is(harness, "mine", "delivered"))
    assert await redis_client.zcard(ACCEPTED) == 3000
    assert (await status_of(harness, "other-0")).status == "accepted"


async def test_a_template_whatsapp_rejects_shows_failed_132000(
    harness: Harness, receiver: Receiver, tmp_path: Any
) -> None:
    """The worker has no catalog here, so CGB says success; WhatsApp's webhook tells the truth."""
    catalog = tmp_path / "templates.toml"
    catalog.write_text('[[template]]\nname = "visa_approved"\nlanguages = ["en"]\nbody = 2\n')
    harness.sim.configure(wa_templates_file=str(catalog))
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "whatsappTemplate": TEMPLATE})  # one parameter; two approved
    await harness.run()
    assert (await job.result())["success"] is True
    await settled(harness)
    found = await status_of(harness, job.job_id)
    assert found.status == "failed"
    assert found.error is not None
    assert (found.error.code, found.error.title) == (
        132000,
        "Number of parameters does not match the expected number of params",
    )
    assert [e.status for e in found.events] == ["accepted", "failed"]


async def test_the_simulators_inbound_message_opens_the_window(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    await harness.known(B)
    url = harness.sim.root + "/_sim/inbound"
    async with aiohttp.ClientSession() as http, http.post(url, json={"phone": B, "text": "hi"}) as resp:
        assert resp.status == 200
    [posted] = harness.sim.state.webhooks
    assert posted["status"] == 200
    assert posted["payload"]["entry"][0]["changes"][0]["value"]["messages"][0]["from"] == B.lstrip("+")
    await eventually(lambda: redis_client.exists(window_key(B)))
    [job] = await harness.enqueue({"to": B, "message": "Visa approved.", "whatsappTemplate": TEMPLATE})
    await harness.run()
    assert ((await job.result())["kind"], (await job.result())["window"]) == ("text", "open")


async def test_redis_down_is_a_503_so_meta_redelivers() -> None:
    from arq.connections import ArqRedis

    pool = ArqRedis(host="127.0.0.1", port=free_port())  # nothing listens there
    config = settings()
    app = create_app(pool, config)
    endpoints = Endpoints(app, config)
    await endpoints.start("127.0.0.1", 0, "127.0.0.1", 0)
    try:
        rec = Receiver(f"http://127.0.0.1:{endpoints.port}/webhooks/whatsapp", app, pool)
        assert (await rec.post(status_payload("wamid.X", "sent", A)))[0] == 503
        health = f"http://127.0.0.1:{endpoints.admin_port}/healthz"

        async def unhealthy() -> bool:
            async with aiohttp.ClientSession() as http, http.get(health) as resp:
                return resp.status == 503

        await eventually(unhealthy, within=config.redis_timeout + 3)
        assert app[METRICS].registry.get_sample_value("cgb_webhook_requests_total", {"outcome": "store_failed"}) == 1
    finally:
        await endpoints.stop()
        await pool.aclose()


@pytest.mark.parametrize(
    ("payload", "kwargs", "why"),
    [
        ({"to": A, "message": "hi"}, {"fallback_of": "job-1"}, "a fallback job sends a whatsappTemplate alone"),
        ({"to": A, "message": "hi", "whatsappTemplate": TEMPLATE}, {"fallback_of": "job-1"}, "alone"),
        ({"to": A, "whatsappTemplate": TEMPLATE}, {"fallback_of": ""}, "fallback_of must be the id"),
    ],
    ids=["a text", "a text and a template", "an empty id"],
)
async def test_a_bad_fallback_job_is_refused(
    harness: Harness, payload: dict[str, Any], kwargs: dict[str, Any], why: str
) -> None:
    await harness.known(A)
    [job] = await harness.enqueue(payload, **kwargs)
    await harness.run()
    error = await harness.outcome(job)
    assert isinstance(error, E.InvalidJobError), error
    assert why in str(error)
    assert harness.sim.requests() == []


async def test_a_retry_keeps_to_the_choice_its_first_try_made(harness: Harness, redis_client: Any) -> None:
    """The first try chose the text (window open) and its outcome is unknown; the window now reads closed.
    The retry must not send the template beside a text that may have gone out."""
    from cgb_worker.sends import key as sends_key

    await harness.known(A)
    await redis_client.set(window_key(A), f"c:{int(time.time() * 1000)}")
    await redis_client.hset(sends_key("choice-1"), "text", "sending")
    await redis_client.set("arq:retry:choice-1", 1)  # arq's try counter: this run is the job's second try
    [job] = await harness.enqueue(
        {"to": A, "message": "Visa approved.", "whatsappTemplate": TEMPLATE}, _job_id="choice-1"
    )
    await harness.run()
    result = await harness.outcome(job)
    assert (result["kind"], result["window"], result["possibleDuplicate"]) == ("text", "closed", True)
    assert [r["endpoint"] for r in harness.sim.requests()] == ["send_text"]


async def test_an_entry_that_fails_to_process_does_not_block_the_inbox(
    harness: Harness, receiver: Receiver, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await harness.known(A)
    harness.sim.configure(webhook_url=None)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    processor = receiver.processor
    original = processor.read
    calls = 0

    def flaky(body: bytes) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return original(body)

    monkeypatch.setattr(processor, "read", flaky)
    assert (await receiver.post(status_payload("wamid.P1", "sent", A)))[0] == 200
    assert (await receiver.post(status_payload("wamid.P1", "delivered", A)))[0] == 200
    await eventually(lambda: _status_is(harness, job.job_id, "delivered"))
    [(_id, fields)] = await redis_client.xrange(MALFORMED)
    assert fields[b"reason"] == b"processing failed: RuntimeError"
    assert b'"sent"' in fields[b"body"]
    await eventually(lambda: _inbox_empty(redis_client))


async def test_the_receiver_makes_its_inbox_again_after_redis_lost_it(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    """A Redis without persistence restarted: the inbox stream and its group are gone."""
    await redis_client.delete(INBOX)
    await asyncio.sleep(0.5)
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    await settled(harness)
    assert (await status_of(harness, job.job_id)).status == "read"


async def test_a_131047_for_a_recipient_known_only_by_bsuid_writes_no_window_key(
    harness: Harness, receiver: Receiver, redis_client: Any
) -> None:
    harness.sim.configure(webhook_url=None)
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    assert (await receiver.post(status_payload("wamid.U1", "sent", A)))[0] == 200
    await eventually(lambda: _status_is(harness, job.job_id, "sent"))
    error = {"code": 131047, "title": "Re-engagement message"}
    failed = {"id": "wamid.U1", "status": "failed", "timestamp": str(int(time.time())),
              "recipient_user_id": "US.UNSEEN1", "errors": [error]}  # fmt: skip
    assert (await receiver.post(envelope({"statuses": [failed]})))[0] == 200
    found = await eventually(lambda: _status_is(harness, job.job_id, "failed"))
    assert found.steps[0].user_id == "US.UNSEEN1"
    assert await redis_client.keys("cgb:window:*") == []  # no phone to hang the closed window on
