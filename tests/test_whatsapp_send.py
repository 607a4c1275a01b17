"""whatsapp_send end to end: a real arq Worker, a real Redis, the simulator over real HTTP."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, cast

import msgspec
import pytest

from cgb_worker import errors as E
from cgb_worker.deadletters import DeadLetters
from cgb_worker.models import SendJob
from cgb_worker.simulator import FaultRule

from .conftest import Harness

A = "+972500000001"
B = "+972500000002"
US = "+12025550100"


def sends(harness: Harness) -> list[tuple[str, str, Any]]:
    return [(m["contact_id"], m["kind"], m.get("text") or m.get("url")) for m in harness.sim.state.outbox]


def calls(harness: Harness) -> list[str]:
    return [r["endpoint"] for r in harness.sim.state.requests]


async def dead_letters(harness: Harness, redis_client: Any) -> list[Any]:
    return await DeadLetters(redis_client).list()


# -- each kind -------------------------------------------------------------------------------------------


async def test_text_to_a_new_then_a_cached_contact(harness: Harness) -> None:
    [first] = await harness.enqueue({"to": A, "message": "Your visa is approved"})
    await harness.run()
    result = await harness.outcome(first)
    assert result["success"] is True
    assert result["contactId"] == "972500000001"
    assert result["to"] == A
    assert result["messageId"] is None
    assert result["kind"] == "text"
    assert result["attempts"] == 1
    assert result["error"] is None
    assert result["timestamp"].endswith("Z")
    # A new number: asked for by its id (the phone's digits), created, sent to: three calls.
    assert calls(harness) == ["get_contact", "create_contact", "send_text"]
    assert harness.sim.requests("get_contact")[0]["path"] == "/api/contacts/972500000001"
    create = harness.sim.requests("create_contact")[0]
    assert create["body"] == {"phone": A}

    harness.sim.state.requests.clear()
    [second] = await harness.enqueue({"to": "+972 50-000-0001", "message": "Second"})
    await harness.run()
    assert (await harness.outcome(second))["contactId"] == "972500000001"
    assert calls(harness) == ["send_text"]  # a cached contact costs one CGB call per message
    text = harness.sim.requests("send_text")[0]
    assert text["path"] == "/api/contacts/972500000001/send/text"
    assert text["body"] == {"text": "Second", "channel": "whatsapp"}
    assert sends(harness) == [("972500000001", "text", "Your visa is approved"), ("972500000001", "text", "Second")]


async def test_existing_contact_is_found_not_created(harness: Harness, http: Any) -> None:
    harness.sim.configure(stored_phone="digits")
    async with http.post(
        harness.sim.api_url + "/contacts", json={"phone": A}, headers={"X-ACCESS-TOKEN": harness.env["CGB_API_KEY"]}
    ):
        pass
    harness.sim.state.requests.clear()
    [job] = await harness.enqueue({"to": A, "message": "hi", "firstName": "Dana"})
    await harness.run()
    assert (await harness.outcome(job))["contactId"] == "972500000001"
    assert calls(harness) == ["get_contact", "send_text"]  # a known number whose cache expired: two calls


async def test_new_contact_gets_names_and_email(harness: Harness) -> None:
    [job] = await harness.enqueue(
        {"to": US, "message": "hi", "firstName": "Ana", "lastName": "Diaz", "email": "ana@example.test"}
    )
    await harness.run()
    assert (await harness.outcome(job))["success"] is True
    assert harness.sim.requests("create_contact")[0]["body"] == {
        "phone": US,
        "first_name": "Ana",
        "last_name": "Diaz",
        "email": "ana@example.test",
    }


async def test_struct_payload_travels_like_a_dict(harness: Harness) -> None:
    [job] = await harness.enqueue(SendJob(to=A, message="from a Struct"))
    await harness.run()
    assert (await harness.outcome(job))["kind"] == "text"
    assert sends(harness) == [("972500000001", "text", "from a Struct")]


async def test_file_then_text(harness: Harness) -> None:
    [job] = await harness.enqueue(
        {"to": A, "fileUrl": "https://files.example.test/visa.pdf", "fileType": "document", "message": "Your visa"}
    )
    await harness.run()
    result = await harness.outcome(job)
    assert result["kind"] == "file"
    assert sends(harness) == [
        ("972500000001", "file", "https://files.example.test/visa.pdf"),
        ("972500000001", "text", "Your visa"),
    ]
    assert harness.sim.requests("send_file")[0]["body"] == {
        "url": "https://files.example.test/visa.pdf",
        "type": "file",
        "channel": "whatsapp",
    }


async def test_template_by_env_mapping_with_variables_on_a_new_contact(harness: Harness) -> None:
    [job] = await harness.enqueue(
        {"to": A, "template": "visa_approved", "variables": {"first_name": "Dana", "visa_type": "work"}}
    )
    await harness.run()
    result = await harness.outcome(job)
    assert (result["kind"], result["flowId"], result["fallback"]) == ("template", "1752250957765", False)
    # New contact: the variables ride in the create call, by name, before the flow is triggered.
    assert calls(harness) == ["list_custom_fields", "get_contact", "create_contact", "send_flow"]
    assert harness.sim.requests("create_contact")[0]["body"]["actions"] == [
        {"action": "set_field_value", "field_name": "first_name", "value": "Dana"},
        {"action": "set_field_value", "field_name": "visa_type", "value": "work"},
    ]
    assert harness.sim.requests("send_flow")[0]["path"] == "/api/contacts/972500000001/send/1752250957765"
    assert sends(harness) == [("972500000001", "flow", "Hello Dana, your work visa is approved.")]


async def test_template_by_flow_name_with_typed_variables_on_an_existing_contact(harness: Harness) -> None:
    [warm] = await harness.enqueue({"to": A, "message": "hello"})
    await harness.run()
    harness.sim.state.requests.clear()
    [job] = await harness.enqueue(
        {
            "to": A,
            "template": "DOCUMENTS needed",  # flow "Documents Needed": case and _/space insensitive
            "variables": {"first_name": "Dana", "documents_needed": "passport", "deadline": "2026-12-01"},
        }
    )
    await harness.run()
    result = await harness.outcome(job)
    assert result["flowId"] == "1752250957766"
    # Existing contact: each field written by id, form-encoded, then the flow.
    assert calls(harness) == [
        "list_flows",
        "list_custom_fields",
        "set_custom_field",
        "set_custom_field",
        "set_custom_field",
        "send_flow",
    ]
    writes = [
        (r["path"].rsplit("/", 1)[1], r["content_type"], r["body"]) for r in harness.sim.requests("set_custom_field")
    ]
    assert writes == [
        ("612001", "application/x-www-form-urlencoded", {"value": "Dana"}),
        ("612003", "application/x-www-form-urlencoded", {"value": "passport"}),
        ("612004", "application/x-www-form-urlencoded", {"value": "1796083200"}),  # a date field: Unix seconds
    ]
    assert sends(harness)[-1] == ("972500000001", "flow", "Hi Dana, please send: passport by 1796083200.")
    assert warm is not None


async def test_template_never_matches_partially(harness: Harness) -> None:
    harness.set_env(CGB_TEMPLATE_VISA_APPROVED=None)
    [exact, partial] = await harness.enqueue(
        {"to": A, "template": "visa approved"}, {"to": A, "template": "visa approved remind"}
    )
    await harness.run()
    assert (await harness.outcome(exact))["flowId"] == "1752250957765"
    error = await harness.outcome(partial)
    assert isinstance(error, E.TemplateNotFoundError)
    assert "CGB_TEMPLATE_VISA_APPROVED_REMIND" in str(error)
    assert "among the account's 4 flows" in str(error)
    assert len(harness.sim.requests("list_flows")) == 1  # cached in Redis for the second job


async def test_unknown_template_falls_back_to_text_visibly(harness: Harness, capfd: Any) -> None:
    [job] = await harness.enqueue({"to": A, "template": "visa_rejected", "message": "Please call us"})
    await harness.run()
    result = await harness.outcome(job)
    assert (result["kind"], result["fallback"], result["flowId"]) == ("text", True, None)
    assert sends(harness) == [("972500000001", "text", "Please call us")]
    assert "template 'visa_rejected' not found: sending the fallback text" in capfd.readouterr().err


async def test_stale_flow_list_is_served_when_cgb_cannot_refresh(harness: Harness, redis_client: Any) -> None:
    harness.set_env(CGB_TEMPLATE_VISA_APPROVED=None, CGB_TEMPLATE_CACHE_TIMEOUT="1")
    [first] = await harness.enqueue({"to": A, "template": "visa_approved"})
    await harness.run()
    assert (await harness.outcome(first))["success"] is True
    await asyncio.sleep(1.1)
    harness.sim.state.faults.append(FaultRule(status=503, path="/accounts/flows$"))
    [second] = await harness.enqueue({"to": A, "template": "visa_approved"})
    await harness.run()
    assert (await harness.outcome(second))["flowId"] == "1752250957765"
    assert len(harness.sim.requests("list_flows")) == 2  # the refresh was tried, failed, and the copy served


# -- permanent errors: no retry, nothing sent --------------------------------------------------------------

PERMANENT: list[tuple[str, Any, type[Exception], str]] = [
    ("missing phone", {"message": "hi"}, E.InvalidJobError, "missing required field `to`"),
    ("invalid phone", {"to": "+972 12", "message": "hi"}, E.InvalidPhoneError, "too short"),
    ("no country code", {"to": "0500000001", "message": "hi"}, E.InvalidPhoneError, "no country code"),
    ("phone not a string", {"to": 972500000001, "message": "hi"}, E.InvalidJobError, "Expected `str`"),
    ("no content", {"to": A}, E.InvalidJobError, "no content"),
    ("empty message", {"to": A, "message": "  "}, E.InvalidJobError, "message is empty"),
    ("text too long", {"to": A, "message": "x" * 4097}, E.InvalidJobError, "4097 characters; WhatsApp allows 4096"),
    ("unknown fileType", {"to": A, "fileUrl": "https://f.test/a", "fileType": "pdf"}, E.InvalidJobError, "fileType"),
    ("fileType missing", {"to": A, "fileUrl": "https://f.test/a"}, E.InvalidJobError, "needs a fileType"),
    ("fileUrl missing", {"to": A, "fileType": "image"}, E.InvalidJobError, "needs a fileUrl"),
    ("ftp fileUrl", {"to": A, "fileUrl": "ftp://f.test/a", "fileType": "image"}, E.InvalidJobError, "http"),
    ("file:// fileUrl", {"to": A, "fileUrl": "file:///etc/passwd", "fileType": "image"}, E.InvalidJobError, "http"),
    (
        "nested variables",
        {"to": A, "template": "visa_approved", "variables": {"a": {"b": 1}}},
        E.InvalidJobError,
        "flat mapping of scalars",
    ),
    ("list variables", {"to": A, "template": "visa_approved", "variables": ["a"]}, E.InvalidJobError, "mapping"),
    (
        "variables without template",
        {"to": A, "message": "hi", "variables": {"a": 1}},
        E.InvalidJobError,
        "variables need a template",
    ),
    (
        "template and file",
        {"to": A, "template": "visa_approved", "fileUrl": "https://f.test/a", "fileType": "image"},
        E.InvalidJobError,
        "cannot be combined",
    ),
    ("unknown field", {"to": A, "message": "hi", "priority": "high"}, E.InvalidJobError, "unknown field `priority`"),
    (
        "snake_case field",
        {"to": A, "file_url": "https://f.test/a", "fileType": "image"},
        E.InvalidJobError,
        "unknown field `file_url`",
    ),
    ("payload not a mapping", ["+972500000001", "hi"], E.InvalidJobError, "payload must be a mapping"),
    ("unknown template", {"to": A, "template": "no_such_template"}, E.TemplateNotFoundError, "not found"),
    (
        "unknown variable",
        {"to": A, "template": "visa_approved", "variables": {"passport_no": "X1"}},
        E.UnknownVariableError,
        "no custom field for variable(s) 'passport_no'",
    ),
    (
        "bad number variable",
        {"to": A, "template": "visa_approved", "variables": {"applicants": "two"}},
        E.UnknownVariableError,
        "needs a number",
    ),
    (
        "bad date variable",
        {"to": A, "template": "visa_approved", "variables": {"deadline": "next week"}},
        E.UnknownVariableError,
        "not an ISO 8601 date",
    ),
]


@pytest.mark.parametrize(("payload", "exc", "text"), [p[1:] for p in PERMANENT], ids=[p[0] for p in PERMANENT])
async def test_permanent_errors_fail_at_once_and_send_nothing(
    harness: Harness, redis_client: Any, payload: Any, exc: type[Exception], text: str
) -> None:
    [job] = await harness.enqueue(payload)
    await harness.run()
    error = await harness.outcome(job)
    assert type(error) is exc
    assert text in str(error)
    assert harness.sim.state.outbox == []
    assert not any(r["endpoint"].startswith("send") for r in harness.sim.state.requests)
    assert not harness.sim.requests("create_contact")
    [dead] = await dead_letters(harness, redis_client)
    assert (dead.job_id, dead.error_type, dead.attempts) == (job.job_id, exc.__name__, 1)
    info = await job.info()
    assert info.job_try == 1  # never retried


@pytest.mark.parametrize(
    ("rule", "exc", "status"),
    [
        (FaultRule(status=400, path="/send/text$"), E.CGBBadRequestError, 400),
        (FaultRule(status=404, path="/send/text$"), E.CGBNotFoundError, 404),
        (FaultRule(status=403, path="/send/text$"), E.CGBAuthError, 403),
        (FaultRule(error_in_200=401, path="/send/text$"), E.CGBAuthError, 200),
        (FaultRule(success_false=True, path="/send/text$"), E.CGBBadRequestError, 200),
    ],
    ids=["400", "404", "403", "401-in-200", "success-false"],
)
async def test_cgb_permanent_errors_are_typed_and_not_retried(
    harness: Harness, redis_client: Any, rule: FaultRule, exc: type[E.CGBAPIError], status: int
) -> None:
    harness.sim.state.faults.append(rule)
    [job] = await harness.enqueue({"to": A, "message": "hi"})
    await harness.run()
    error = await harness.outcome(job)
    assert type(error) is exc
    assert (error.status, error.endpoint) == (status, "send_text")
    assert len(harness.sim.requests("send_text")) == 1
    assert (await dead_letters(harness, redis_client))[0].error_type == exc.__name__


async def test_wrong_api_key_fails_without_retry(harness: Harness) -> None:
    harness.set_env(CGB_API_KEY="1000001.NotTheRightKeyNotTheRightKey00")
    [job] = await harness.enqueue({"to": A, "message": "hi"})
    await harness.run()
    error = await harness.outcome(job)
    assert isinstance(error, E.CGBAuthError)
    assert error.message == "No valid API key provided."
    assert len(harness.sim.state.requests) == 1


# -- retries ----------------------------------------------------------------------------------------------


async def test_5xx_twice_then_success(harness: Harness) -> None:
    harness.sim.state.faults.append(FaultRule(status=503, count=2, path="/send/text$"))
    [job] = await harness.enqueue({"to": A, "message": "hi"})
    await harness.run()
    result = await harness.outcome(job)
    assert (result["success"], result["attempts"], result["possibleDuplicate"]) == (True, 3, False)
    assert len(harness.sim.requests("send_text")) == 3
    assert sends(harness) == [("972500000001", "text", "hi")]
    assert len(harness.sim.requests("create_contact")) == 1  # the contact was cached on the first try


async def test_429_waits_at_least_retry_after(harness: Harness) -> None:
    harness.sim.state.faults.append(FaultRule(status=429, retry_after="1", count=1, path="/send/text$"))
    [job] = await harness.enqueue({"to": A, "message": "hi"})
    started = time.monotonic()
    await harness.run()
    elapsed = time.monotonic() - started
    result = await harness.outcome(job)
    assert result["attempts"] == 2
    # CGB_RETRY_MAX_DELAY is 0.05 s here: the Retry-After floor is what made it wait.
    assert elapsed >= 1.0
    gap = harness.sim.requests("send_text")[1]["at"] - harness.sim.requests("send_text")[0]["at"]
    assert gap >= 0.95


async def test_retries_exhausted_keep_the_real_error(harness: Harness, redis_client: Any) -> None:
    harness.sim.state.faults.append(FaultRule(status=502, path="/send/text$"))
    [job] = await harness.enqueue({"to": A, "message": "hi"})
    await harness.run()
    error = await harness.outcome(job)
    assert type(error) is E.CGBServerError
    assert error.status == 502
    assert "max" not in str(error)
    assert len(harness.sim.requests("send_text")) == 4  # the first try and CGB_RETRY_ATTEMPTS=3 retries
    [dead] = await dead_letters(harness, redis_client)
    assert (dead.error_type, dead.attempts) == ("CGBServerError", 4)
    assert dead.payload == {"to": "+972*******01", "message": "hi"}


async def test_connection_refused_is_retried(harness: Harness) -> None:
    from .conftest import free_port

    harness.set_env(CGB_API_URL=f"http://127.0.0.1:{free_port()}/api", CGB_RETRY_ATTEMPTS="1")
    [job] = await harness.enqueue({"to": A, "message": "hi"})
    await harness.run()
    error = await harness.outcome(job)
    assert type(error) is E.CGBConnectError
    assert (await job.info()).job_try == 2


# -- exactly one contact, exactly one send ---------------------------------------------------------------


async def test_50_concurrent_jobs_for_one_new_number_create_one_contact(harness: Harness) -> None:
    harness.sim.configure(latency=0.05)  # widen the race
    jobs = await harness.enqueue(*({"to": B, "message": f"m{i}"} for i in range(50)))
    await harness.run(workers=3, max_jobs=50)  # three workers, each with its own in-process state
    results = [await harness.outcome(j) for j in jobs]
    assert all(r["contactId"] == "972500000002" for r in results), results
    assert len(harness.sim.requests("create_contact")) == 1
    assert len(harness.sim.requests("send_text")) == 50
    assert sorted(t for _, _, t in sends(harness)) == sorted(f"m{i}" for i in range(50))


async def test_a_sent_step_is_not_resent_when_a_later_step_fails(harness: Harness) -> None:
    harness.sim.state.faults.append(FaultRule(status=503, count=2, path="/send/text$"))
    [job] = await harness.enqueue(
        {"to": A, "fileUrl": "https://files.example.test/a.pdf", "fileType": "document", "message": "see file"}
    )
    await harness.run()
    result = await harness.outcome(job)
    assert result["attempts"] == 3
    assert [k for _, k, _ in sends(harness)] == ["file", "text"]
    assert len(harness.sim.requests("send_file")) == 1


async def test_a_rerun_of_a_finished_job_sends_nothing(harness: Harness, redis_client: Any) -> None:
    from cgb_worker.jobs import whatsapp_send
    from cgb_worker.worker import shutdown, worker_settings

    [job] = await harness.enqueue({"to": A, "message": "once"})
    await harness.run()
    first = await harness.outcome(job)
    # Run the same job id again, as arq would after the worker died before storing the result.
    ctx: dict[str, Any] = {"redis": redis_client, "job_id": job.job_id, "job_try": 2}
    await cast(Any, worker_settings(harness.env)).on_startup(ctx)
    try:
        again = await whatsapp_send(ctx, {"to": A, "message": "once"})
    finally:
        await shutdown(ctx)
    assert msgspec.to_builtins(again) == first
    assert len(harness.sim.requests("send_text")) == 1


@pytest.mark.parametrize("policy", ["resend", "fail"])
async def test_unknown_outcome_follows_the_policy(harness: Harness, redis_client: Any, policy: str) -> None:
    # CGB takes longer than our timeout but still performs the send: we cannot know it went out.
    harness.set_env(CGB_TIMEOUT="300", CGB_UNKNOWN_OUTCOME=policy)
    harness.sim.state.faults.append(FaultRule(delay=0.6, count=1, path="/send/text$"))
    [job] = await harness.enqueue({"to": A, "message": "maybe twice"})
    await harness.run()
    await asyncio.sleep(0.5)  # let the slow request finish on the simulator's side
    outcome = await harness.outcome(job)
    if policy == "resend":
        assert outcome["possibleDuplicate"] is True
        assert outcome["attempts"] == 2
        assert [t for _, _, t in sends(harness)] == ["maybe twice", "maybe twice"]
    else:
        assert type(outcome) is E.SendOutcomeUnknownError
        assert [t for _, _, t in sends(harness)] == ["maybe twice"]
        [dead] = await dead_letters(harness, redis_client)
        assert dead.error_type == "SendOutcomeUnknownError"


async def test_stale_cached_contact_is_resolved_again(harness: Harness) -> None:
    [first] = await harness.enqueue({"to": A, "message": "one"})
    await harness.run()
    harness.sim.state.contacts.clear()  # the contact disappears from CGB; our cache still has it
    harness.sim.state.requests.clear()
    [second] = await harness.enqueue({"to": A, "message": "two"})
    await harness.run()
    assert (await harness.outcome(second))["success"] is True
    assert calls(harness) == ["send_text", "find_contacts", "find_contacts", "create_contact", "send_text"]
    assert first is not None


# -- configuration ----------------------------------------------------------------------------------------


def test_bad_configuration_stops_the_worker_before_it_connects() -> None:
    from cgb_worker import ConfigError, worker_settings

    with pytest.raises(ConfigError) as info:
        worker_settings({"CGB_TIMEOUT": "fast", "CGB_DEFAULT_REGION": "Atlantis", "REDIS_URL": "redis://r:63790x/0"})
    assert [p.split(":")[0] for p in info.value.problems] == [
        "CGB_API_KEY",
        "CGB_TIMEOUT",
        "PHONE_HASH_KEY",
        "REDIS_URL",
        "CGB_DEFAULT_REGION",
    ]


def test_arq_cli_refuses_to_start_on_bad_configuration(redis_url: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    arq = Path(sys.executable).parent / "arq"
    env = {
        "PATH": os.environ["PATH"],
        "REDIS_URL": "redis://cache.internal:63790x/0",
        "CGB_TIMEOUT": "-5",
        "CGB_RETRY_ATTEMPTS": "many",
    }
    proc = subprocess.run(
        [str(arq), "cgb_worker.WorkerSettings"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert "cgb-worker cannot start: invalid configuration:" in proc.stderr
    for name in ("CGB_API_KEY", "CGB_TIMEOUT", "CGB_RETRY_ATTEMPTS", "REDIS_URL", "PHONE_HASH_KEY"):
        assert f"  - {name}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Starting worker" not in proc.stderr  # it stopped before arq connected anywhere


async def test_keyword_fields_work_and_mixing_styles_is_refused(harness: Harness) -> None:
    pool = await harness.pool()
    by_keywords = await pool.enqueue_job("whatsapp_send", to=A, message="by keywords")
    mixed = await pool.enqueue_job("whatsapp_send", {"to": A, "message": "a"}, message="b")
    await harness.run()
    assert (await harness.outcome(by_keywords))["kind"] == "text"
    error = await harness.outcome(mixed)
    assert type(error) is E.InvalidJobError
    assert "not both" in str(error)
    assert [t for _, _, t in sends(harness)] == ["by keywords"]


async def test_redis_failure_mid_job_is_retried(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from cgb_worker.sends import SendLog

    real_mark = SendLog.mark_sending
    failures = iter([True])

    async def flaky_mark(self: SendLog, job_id: str, step: str, *args: Any, **kwargs: Any) -> None:
        if next(failures, False):
            raise RedisConnectionError("Connection reset by peer")
        await real_mark(self, job_id, step, *args, **kwargs)

    monkeypatch.setattr(SendLog, "mark_sending", flaky_mark)
    [job] = await harness.enqueue({"to": A, "message": "after a Redis blip"})
    await harness.run()
    result = await harness.outcome(job)
    assert result["attempts"] == 2
    assert result["possibleDuplicate"] is False  # the mark failed, so the request never left
    assert [t for _, _, t in sends(harness)] == ["after a Redis blip"]


async def test_a_dead_letter_replays_and_sends_once(harness: Harness, redis_client: Any) -> None:
    harness.sim.state.faults.append(FaultRule(status=503, path="/send/text$"))
    [job] = await harness.enqueue({"to": A, "message": "after the outage"})
    await harness.run()
    assert isinstance(await harness.outcome(job), E.CGBServerError)
    harness.sim.state.faults.clear()
    store = DeadLetters(redis_client)
    new_id = await store.replay(await harness.pool(), job.job_id)
    assert new_id is not None
    assert new_id != job.job_id
    assert await store.count() == 0
    assert await store.replay(await harness.pool(), job.job_id) is None
    await harness.run()
    assert [t for _, _, t in sends(harness)] == ["after the outage"]


def test_result_timestamps_are_utc_with_milliseconds() -> None:
    from datetime import UTC, datetime

    from cgb_worker.jobs import _now

    for _ in range(3):
        before = datetime.now(UTC).replace(microsecond=0)
        stamp = _now()
        after = datetime.now(UTC)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
        assert before <= datetime.fromisoformat(stamp.replace("Z", "+00:00")) <= after
