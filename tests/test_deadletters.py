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


# -- the CLI over a real worker: delete, list --error, replay --all and permanent errors ---------------------


async def _two_dead_letters(harness: Any) -> tuple[str, str]:
    """A text CGB refused (401: permanent) and a file CGB failed (503, no retries left: retryable)."""
    from cgb_worker.simulator import FaultRule

    await harness.known("+972500000001", "+12025550100")
    harness.set_env(CGB_RETRY_ATTEMPTS="0")
    harness.sim.state.faults.append(FaultRule(status=401, path="/send/text$", count=1))
    harness.sim.state.faults.append(FaultRule(status=503, path="/send/file$", count=1))
    auth, server = await harness.enqueue(
        {"to": "+972500000001", "message": "refused"},
        {"to": "+12025550100", "fileUrl": "https://files.example.test/v.pdf", "fileType": "document"},
    )
    await harness.run()
    return auth.job_id, server.job_id


async def test_list_filters_by_error_class_and_delete_drops_one(harness: Any, redis_client: Any) -> None:
    from .test_cli import cli

    auth, server = await _two_dead_letters(harness)
    code, out, _ = await cli(harness, "dead-letters", "list", "--error", "cgbservererror")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "2 dead letter(s), 1 with cgbservererror"
    assert len(lines) == 2
    assert lines[1].startswith(server)
    assert "CGBServerError: HTTP 503 on send_file" in lines[1]
    code, out, _ = await cli(harness, "dead-letters", "list", "--error", "NoSuchError")
    assert (code, out) == (0, "2 dead letter(s), 0 with NoSuchError\n")

    code, out, _ = await cli(harness, "dead-letters", "delete", auth)
    assert (code, out) == (0, f"deleted dead letter {auth}\n")
    assert await DeadLetters(redis_client).get(auth) is None
    code, _, err = await cli(harness, "dead-letters", "delete", auth)
    assert (code, err) == (1, f"cgb-worker: no dead letter {auth!r}\n")
    code, out, _ = await cli(harness, "status", auth)
    assert code == 1  # arq still holds its failed result
    assert out == f"{auth}: failed: CGBAuthError: HTTP 401 on send_text: Injected 401\n"


async def test_replay_all_skips_permanent_errors_unless_asked(harness: Any, redis_client: Any) -> None:
    from .test_cli import cli

    auth, server = await _two_dead_letters(harness)
    code, out, _ = await cli(harness, "dead-letters", "replay", "--all")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"replayed {server} as ")
    assert lines[1:] == [
        "1 job(s) enqueued again",
        "1 skipped: their error is permanent (dead-letters list shows which); --include-permanent replays them too",
    ]
    assert [d.job_id for d in await DeadLetters(redis_client).list()] == [auth]
    code, _, err = await cli(harness, "dead-letters", "replay", auth, "--include-permanent")
    assert (code, err) == (2, "cgb-worker: --include-permanent goes with --all\n")
    code, out, _ = await cli(harness, "dead-letters", "replay", "--all", "--include-permanent")
    assert code == 0
    assert out.splitlines()[0].startswith(f"replayed {auth} as ")
    assert out.splitlines()[1:] == ["1 job(s) enqueued again"]
    await harness.run()
    assert sorted(m.get("text") or m.get("url", "") for m in harness.sim.state.outbox) == [
        "https://files.example.test/v.pdf",
        "refused",
    ]
    assert await DeadLetters(redis_client).count() == 0


def test_permanent_is_decided_by_the_error_class() -> None:
    assert E.is_retryable("CGBServerError")
    assert E.is_retryable("CGBRateLimitError")
    assert E.is_retryable("StoreUnavailableError")
    assert not E.is_retryable("CGBAuthError")
    assert not E.is_retryable("InvalidPhoneError")
    assert not E.is_retryable("ValueError")  # not ours: permanent
