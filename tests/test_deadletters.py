"""The dead-letter store: masked entries, the original kept for replay, capped."""

from __future__ import annotations

from typing import Any

from cgb_worker import errors as E
from cgb_worker.deadletters import ENTRIES, INDEX, PAYLOADS, DeadLetters, mask_payload


async def test_add_list_get_remove_purge(redis_client: Any) -> None:
    store = DeadLetters(redis_client, max_entries=3)
    payload = {"to": "+972500000001", "message": "hi", "email": "dana@example.test"}
    entry = await store.add(
        job_id="j1",
        function="whatsapp_send",
        payload=payload,
        error=E.CGBServerError("down", status=503),
        attempts=4,
        enqueued_at=1.0,
    )
    assert entry.payload == {"to": "+972*******01", "message": "hi", "email": "d***@example.test"}
    assert (entry.error_type, entry.error, entry.attempts) == ("CGBServerError", "HTTP 503: down", 4)
    assert await store.get("j1") == entry
    assert await store.original_payload("j1") == payload
    raw = await redis_client.hget(ENTRIES, "j1")
    assert b"500000001" not in raw  # the listing copy holds no full number
    for i in range(2, 6):
        await store.add(
            job_id=f"j{i}",
            function="whatsapp_send",
            payload={"to": "x"},
            error=ValueError("v"),
            attempts=1,
            enqueued_at=None,
        )
    assert await store.count() == 3  # capped: the oldest went
    assert [d.job_id for d in await store.list()] == ["j5", "j4", "j3"]
    assert await store.get("j1") is None
    assert await store.original_payload("j1") is None
    assert await redis_client.hlen(PAYLOADS) == 3
    assert await store.remove("j4") is True
    assert await store.remove("j4") is False
    assert await store.purge() == 2
    assert await redis_client.exists(INDEX, ENTRIES, PAYLOADS) == 0
    assert await store.list() == []


def test_mask_payload() -> None:
    assert mask_payload(["not", "a", "dict"]) == "<not a mapping>"
    assert mask_payload({"to": 5}) == {"to": 5}
    assert mask_payload({"email": "nobody"}) == {"email": "nobody"}


async def test_removing_an_entry_gives_its_send_record_its_lifetime_back(redis_client: Any) -> None:
    from cgb_worker import errors as E
    from cgb_worker.sends import TTL
    from cgb_worker.sends import key as sends_key

    store = DeadLetters(redis_client)
    await redis_client.hset(sends_key("job-9"), "text", "sending")
    await redis_client.expire(sends_key("job-9"), 60)
    await store.add(
        job_id="job-9",
        function="whatsapp_send",
        payload={"to": "+12025550100"},
        error=E.CGBAuthError("no"),
        attempts=1,
        enqueued_at=None,
    )
    assert await redis_client.ttl(sends_key("job-9")) == -1  # kept while the entry lives
    assert await store.remove("job-9") is True
    assert TTL - 5 < await redis_client.ttl(sends_key("job-9")) <= TTL
