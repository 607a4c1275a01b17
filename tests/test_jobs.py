"""Job-level units: payload validation, backoff, log masking; and the whole job's logs at DEBUG."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from cgb_worker import errors as E
from cgb_worker.jobs import Plan, retry_delay, validate
from cgb_worker.logs import mask_text, setup_logging
from cgb_worker.simulator import FaultRule

from .conftest import TOKEN, Harness


@pytest.mark.parametrize(
    ("payload", "region", "plan"),
    [
        ({"to": "+972500000001", "message": "hi"}, None, Plan("text", "+972500000001", message="hi")),
        ({"to": "050-000-0001", "message": "hi"}, "IL", Plan("text", "+972500000001", message="hi")),
        (
            {"to": "+12025550100", "template": " visa_approved ", "variables": {"n": 1, "ok": True, "x": None}},
            None,
            Plan("template", "+12025550100", template="visa_approved", variables={"n": 1, "ok": True, "x": None}),
        ),
        (
            {"to": "+12025550100", "template": "t", "message": "fallback"},
            None,
            Plan("template", "+12025550100", template="t", message="fallback"),
        ),
        (
            {"to": "+12025550100", "fileUrl": "http://f.test/a.png", "fileType": "image", "firstName": "Ana"},
            None,
            Plan("file", "+12025550100", file_url="http://f.test/a.png", file_type="image", first_name="Ana"),
        ),
        ({"to": "+12025550100", "message": "x" * 4096}, None, Plan("text", "+12025550100", message="x" * 4096)),
        ({"to": "+12025550100", "message": "שלום 👋"}, None, Plan("text", "+12025550100", message="שלום 👋")),
    ],
)
def test_valid_payloads(payload: dict[str, Any], region: str | None, plan: Plan) -> None:
    assert validate(payload, default_region=region) == plan


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (None, "payload must be a mapping"),
        ("+972500000001", "payload must be a mapping"),
        ({"to": "+972500000001", "message": 5}, "Expected `str | null`, got `int`"),
        ({"to": "+972500000001", "message": "hi", "email": "nobody"}, "email is not an email address"),
        ({"to": "+972500000001", "message": "hi", "firstName": "x" * 300}, "firstName is longer than 256"),
        ({"to": "+972500000001", "template": ""}, "template must be a name"),
        ({"to": "+972500000001", "template": "t", "variables": {"": 1}}, "non-empty string names"),
        ({"to": "+972500000001", "template": "t", "variables": {str(i): i for i in range(51)}}, "at most 50"),
        ({"to": "+972500000001", "template": "t", "variables": {"a": "x" * 4097}}, "longer than 4096"),
        ({"to": "+972500000001", "fileUrl": "https://", "fileType": "image"}, "http:// or https:// URL"),
        ({"to": "+972500000001", "fileUrl": "https://f.test/a b", "fileType": "image"}, "http:// or https:// URL"),
        ({"to": "+972500000001", "fileUrl": "https://f.test/" + "a" * 2048, "fileType": "image"}, "longer than 2048"),
        ({"to": "+972500000001", "message": "hi", "variables": None, "to2": 1}, "unknown field `to2`"),
    ],
)
def test_invalid_payloads(payload: Any, message: str) -> None:
    with pytest.raises(E.InvalidJobError, match=message.replace("|", r"\|").replace("(", r"\(")):
        validate(payload)


def test_retry_delay_is_full_jitter_capped_with_a_retry_after_floor() -> None:
    assert retry_delay(1, base=2, cap=300, rand=lambda: 1.0) == 2
    assert retry_delay(4, base=2, cap=300, rand=lambda: 1.0) == 16
    assert retry_delay(20, base=2, cap=300, rand=lambda: 1.0) == 300  # capped
    assert retry_delay(4, base=2, cap=300, rand=lambda: 0.5) == 8
    assert retry_delay(4, base=2, cap=300, rand=lambda: 0.0) == 0
    assert retry_delay(1, base=2, cap=5, retry_after=60, rand=lambda: 1.0) == 60  # the cap never shortens it
    assert retry_delay(3, base=2, cap=300, retry_after=1, rand=lambda: 1.0) == 8
    delays = [retry_delay(5, base=1, cap=100) for _ in range(200)]
    assert all(0 <= d <= 16 for d in delays)
    assert len(set(delays)) > 150  # jittered


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("to +972500000001 x", "to +972*******01 x"),
        ("+972 50-000-0001", "+972*******01"),
        ("{'to': '0500000001'}", "{'to': '+0*******01'}"),
        ("(202) 555-0100", "(+20******00"),  # no region to go by: masked all the same
        ("job e0ff4412345678b done", "job e0ff4412345678b done"),
        ("took 0.05s, try 3", "took 0.05s, try 3"),
        ("at 2026-11-26 12:00:00", "at 2026-11-26 12:00:00"),
        ("1234567", "1234567"),
    ],
)
def test_mask_text(text: str, expected: str) -> None:
    assert mask_text(text) == expected


def test_arq_job_arguments_are_dropped_from_its_log_line(capfd: Any) -> None:
    setup_logging("DEBUG")
    logging.getLogger("arq.worker").info("%6.2fs → %s(%s)%s", 0.01, "abc:whatsapp_send", "{'to': '+972500000001'}", "")
    err = capfd.readouterr().err
    assert "abc:whatsapp_send(…)" in err
    assert "972500000001" not in err


async def test_no_key_or_phone_in_logs_at_debug(harness: Harness, capfd: Any) -> None:
    """Whole jobs, failures and retries included, at DEBUG: the key and the numbers never show."""
    harness.set_env(LOG_LEVEL="DEBUG")
    harness.sim.state.faults.append(FaultRule(status=503, count=1, path="/send/text$"))
    phones = ["+972500000001", "+12025550100", "+972500000002"]
    jobs = await harness.enqueue(
        {"to": phones[0], "message": "hello", "email": "dana@example.test"},
        {"to": phones[1], "template": "visa_approved", "variables": {"first_name": "Ana"}},
        {"to": phones[2], "template": "missing_template"},
        {"to": "+972 50 000 0009", "message": "x", "unknown": 1},
    )
    await harness.run()
    outcomes = [await harness.outcome(j) for j in jobs]
    assert [isinstance(o, dict) for o in outcomes] == [True, True, False, False]
    err = capfd.readouterr().err
    assert "sent text to +972*******01" in err
    assert "retrying in" in err
    for secret in [TOKEN, *(p[1:] for p in phones), "500000009", "50 000 0009"]:
        assert secret not in err, secret


async def test_a_text_log_line_about_a_job_carries_its_id(harness: Harness, capfd: Any) -> None:
    await harness.known("+12025550100")
    [sent, refused] = await harness.enqueue({"to": "+12025550100", "message": "hi"}, {"to": "+1 202 555 0100"})
    await harness.run()
    err = capfd.readouterr().err
    assert f" [{sent.job_id}] sent text to +1********00" in err
    assert f" [{refused.job_id}] failed after 1 attempt: InvalidJobError: no content" in err
    assert " [" not in next(line for line in err.splitlines() if "cgb-worker ready" in line)  # not about a job
