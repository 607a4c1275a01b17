"""``expiresAt`` and quiet hours end to end: a real arq Worker, a real Redis, the simulator over real HTTP.

Quiet ranges are computed around the recipient's local time now (Asia/Jerusalem for +972 numbers), so the tests
hold at any hour of the day; the expected wake is the first minute past the range, found minute by minute."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from arq.jobs import JobStatus

from cgb_worker import errors as E
from cgb_worker import keys
from cgb_worker.deadletters import DeadLetters
from cgb_worker.quiet import QuietHours
from cgb_worker.simulator import FaultRule

from .conftest import Harness
from .test_quiet import around, minute_of, walk

A = "+972500000001"
B = "+972500000002"
JERUSALEM = ZoneInfo("Asia/Jerusalem")


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def counted(worker: Any, name: str, labels: dict[str, str]) -> float | None:
    value: float | None = worker.ctx["metrics"].registry.get_sample_value(name, labels)
    return value


def quiet_now() -> tuple[QuietHours, datetime]:
    """A range holding Jerusalem's local time now (an hour back, two ahead), and the minute it ends."""
    now = datetime.now(UTC)
    quiet = around(minute_of(now, JERUSALEM), 60, 120)
    wake = walk([JERUSALEM], quiet, now)
    assert wake is not None
    return quiet, wake


async def test_an_expired_job_is_refused_before_any_cgb_call(harness: Harness, redis_client: Any) -> None:
    past = datetime.now(UTC) - timedelta(minutes=5)
    [job] = await harness.enqueue({"to": A, "message": "Your table is ready", "expiresAt": iso(past)})
    [worker] = await harness.run()
    error = await harness.outcome(job)
    assert isinstance(error, E.ExpiredError), error
    assert str(error) == f"the job expired at {utc(past)} (expiresAt): not sent"
    assert "972" not in str(error)  # no phone in the message
    assert harness.sim.requests() == []  # not even the contact lookup
    assert harness.sim.state.outbox == []
    assert counted(worker, "cgb_jobs_expired_total", {"reason": "passed"}) == 1
    assert counted(worker, "cgb_jobs_total", {"kind": "text", "outcome": "failed"}) == 1
    [letter] = await DeadLetters(redis_client).list()
    assert (letter.job_id, letter.error_type, letter.attempts) == (job.job_id, "ExpiredError", 1)


async def test_a_job_expiring_before_its_send_leaves_is_refused_at_the_step(harness: Harness) -> None:
    """The contact lookup takes 1.5 s and the job expires 1 s after it starts: the send step, the one every
    send passes (retries, replays, fallbacks, resends), refuses it; nothing is sent."""
    harness.sim.state.faults.append(FaultRule(delay=1.5, method="GET", path="/contacts/[0-9]+$"))
    [job] = await harness.enqueue(
        {"to": A, "message": "Doors close in a minute", "expiresAt": iso(datetime.now(UTC) + timedelta(seconds=1))}
    )
    [worker] = await harness.run()
    error = await harness.outcome(job)
    assert isinstance(error, E.ExpiredError), error
    assert "expired at" in str(error)
    endpoints = [r["endpoint"] for r in harness.sim.requests()]
    assert endpoints[0] == "get_contact"
    assert "send_text" not in endpoints  # the contact was found or made; the text never left
    assert harness.sim.state.outbox == []
    assert counted(worker, "cgb_jobs_expired_total", {"reason": "passed"}) == 1


async def test_an_expired_fallback_template_is_refused(harness: Harness) -> None:
    """A 131047 fallback carries its text job's expiresAt; past it, the template is not sent either."""
    await harness.known(A)
    past = datetime.now(UTC) - timedelta(seconds=1)
    template = {"name": "visa_approved", "language": "en", "body": ["Dana"]}
    [job] = await harness.enqueue(
        {"to": A, "whatsappTemplate": template, "expiresAt": iso(past)}, fallback_of="job-1", _job_id="job-1:fallback"
    )
    await harness.run()
    error = await harness.outcome(job)
    assert isinstance(error, E.ExpiredError), error
    assert harness.sim.requests() == []


async def test_a_job_before_its_expiry_is_sent(harness: Harness) -> None:
    [job] = await harness.enqueue(
        {"to": A, "message": "Still valid", "expiresAt": iso(datetime.now(UTC) + timedelta(hours=1))}
    )
    await harness.run()
    assert (await harness.outcome(job))["success"] is True
    assert [m["text"] for m in harness.sim.state.outbox] == ["Still valid"]


async def test_quiet_hours_defer_marketing_and_send_authentication(
    harness: Harness, redis_client: Any, capfd: Any
) -> None:
    quiet, wake = quiet_now()
    harness.set_env(QUIET_HOURS=str(quiet))  # QUIET_HOURS_CATEGORIES: marketing, the default
    expires = wake + timedelta(hours=1)  # after the quiet hours: the job waits for them
    [marketing, code] = await harness.enqueue(
        {"to": A, "message": "20% off today", "category": "marketing", "expiresAt": iso(expires)},
        {"to": A, "message": "Your code is 1234", "category": "authentication"},
    )
    [worker] = await harness.run(max_burst_jobs=2)

    # The authentication job went out, at once; the marketing job made no call at all.
    assert (await harness.outcome(code))["category"] == "authentication"
    assert [r["endpoint"] for r in harness.sim.requests()] == ["get_contact", "create_contact", "send_text"]
    assert [m["text"] for m in harness.sim.state.outbox] == ["Your code is 1234"]

    # The marketing job is back in arq's queue, deferred to the first minute after the quiet hours.
    assert await marketing.status() == JobStatus.deferred
    info = await marketing.info()
    assert info is not None
    assert info.score is not None
    assert abs(info.score - wake.timestamp() * 1000) < 2000, (info.score, wake)
    # A deferral, not a failure: counted as one, so it uses up no attempt.
    assert await redis_client.get(keys.throttled(marketing.job_id)) == b"1"
    assert counted(worker, "cgb_quiet_deferred_total", {"category": "marketing"}) == 1
    assert counted(worker, "cgb_job_retries_total", {"error_class": "QuietHoursError"}) is None
    err = capfd.readouterr().err
    assert f"quiet hours for the recipient ({quiet} local) until {utc(wake)}; deferred" in err
    assert "throttled" not in err.split("quiet hours for the recipient")[1].splitlines()[0]

    # When it wakes (its score brought forward, and the range no longer holding), it is sent on its first attempt.
    harness.set_env(QUIET_HOURS=None)
    await redis_client.zadd("arq:queue", {marketing.job_id: int(time.time() * 1000)}, xx=True)
    await harness.run()
    result = await harness.outcome(marketing)
    assert (result["category"], result["attempts"]) == ("marketing", 1)
    assert [m["text"] for m in harness.sim.state.outbox] == ["Your code is 1234", "20% off today"]


async def test_quiet_hours_apply_to_the_configured_categories_only(harness: Harness) -> None:
    quiet, wake = quiet_now()
    harness.set_env(QUIET_HOURS=str(quiet), QUIET_HOURS_CATEGORIES="utility")
    [service, marketing] = await harness.enqueue(
        {"to": A, "message": "Your visa was posted"},  # a text: service by default
        {"to": B, "message": "New offers", "category": "marketing"},
    )
    [utility] = await harness.enqueue({"to": A, "message": "Your appointment is at 10", "category": "utility"})
    await harness.run(max_burst_jobs=3)
    assert (await harness.outcome(service))["category"] == "service"
    assert (await harness.outcome(marketing))["category"] == "marketing"
    assert sorted(m["text"] for m in harness.sim.state.outbox) == ["New offers", "Your visa was posted"]
    pool = await harness.pool()
    [deferred] = await pool.queued_jobs()
    assert deferred.job_id == utility.job_id
    assert abs(deferred.score - wake.timestamp() * 1000) < 2000


async def test_an_expiry_inside_the_quiet_hours_fails_at_once(harness: Harness, redis_client: Any) -> None:
    quiet, wake = quiet_now()
    harness.set_env(QUIET_HOURS=str(quiet))
    expires = wake - timedelta(minutes=30)
    [job] = await harness.enqueue(
        {"to": A, "message": "Flash sale, tonight only", "category": "marketing", "expiresAt": iso(expires)}
    )
    [worker] = await harness.run()
    error = await harness.outcome(job)
    assert isinstance(error, E.ExpiredError), error
    assert str(error) == (
        f"the job would expire (expiresAt {utc(expires)}) during the recipient's quiet hours "
        f"({quiet} local, until {utc(wake)}): not sent"
    )
    assert harness.sim.requests() == []
    assert await job.status() == JobStatus.complete  # failed for good, not deferred
    assert counted(worker, "cgb_jobs_expired_total", {"reason": "quiet_hours"}) == 1
    assert counted(worker, "cgb_quiet_deferred_total", {"category": "marketing"}) is None
    assert await redis_client.get(keys.throttled(job.job_id)) is None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("2026-12-03T10:00:00", "needs an offset"),
        ("tomorrow", "not an ISO 8601 time"),
        ("2026-13-01T00:00:00Z", "not an ISO 8601 time"),
        ("0001-01-01T00:00:00+23:59", "out of range"),
        ("9999-12-31T23:59:59-23:59", "out of range"),
        (12345, "invalid payload"),
    ],
)
def test_a_bad_expires_at_is_refused_when_validated(value: Any, why: str) -> None:
    from cgb_worker.jobs import validate

    with pytest.raises(E.InvalidJobError, match=why):
        validate({"to": "+12025550100", "message": "hello", "expiresAt": value})


def test_expires_at_is_kept_in_utc() -> None:
    from cgb_worker.jobs import validate

    plan = validate({"to": "+12025550100", "message": "hello", "expiresAt": "2026-12-03T12:00:00+02:00"})
    assert plan.expires_at == datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
