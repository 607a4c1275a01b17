"""The fleet-wide rate limit: GCRA slots on Redis's clock, shared by every worker, waited for in place."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, cast

import pytest

from cgb_worker import errors as E
from cgb_worker.ratelimit import KEY, PENALTY_KEY, SPACING, RateLimiter, reset_deadline, set_deadline, try_budget
from cgb_worker.simulator import FaultRule

from .conftest import PHONE_KEY, Harness, free_port


def busiest_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u - t < 1.0) for i, t in enumerate(times))


async def redis_now(redis_client: Any) -> float:
    seconds, micros = await redis_client.time()
    return float(seconds) + float(micros) / 1e6


async def test_slots_are_spaced_evenly_and_waited_for_in_place(redis_client: Any) -> None:
    limiters = [RateLimiter(redis_client, rate=10) for _ in range(3)]  # three "processes"
    admitted: list[float] = []

    async def one(i: int) -> None:
        # the slot each was given (when it was let go), not a Redis round trip after it: on a loaded machine
        # (make test runs two processes) that trip's own delay would be measured as the limiter's
        admitted.append(await limiters[i % 3].acquire())

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(25)))
    elapsed = time.monotonic() - started
    times = sorted(admitted)
    assert busiest_second(times) <= 10
    interval = 1 / (10 * SPACING)
    assert all(b - a > interval - 0.02 for a, b in itertools.pairwise(times))
    assert 24 * interval - 0.05 <= elapsed <= 24 * interval + 0.5  # it waited in place: no throttles


async def test_a_slot_beyond_the_wait_allowed_is_not_reserved(redis_client: Any) -> None:
    limiter = RateLimiter(redis_client, rate=2)
    await limiter.acquire()
    await limiter.acquire(max_wait=1)  # the second slot, 0.5 s on
    before = await redis_client.get(KEY)
    started = time.monotonic()
    with pytest.raises(E.ThrottledError) as info:
        await limiter.acquire(max_wait=0.2)
    assert time.monotonic() - started < 0.1  # no sleep
    assert await redis_client.get(KEY) == before  # and nothing reserved
    assert info.value.retryable is True
    assert info.value.retry_after is not None
    assert 0.4 < info.value.retry_after <= 0.53  # the third slot, one interval of 0.521 s after the second


async def test_a_429_pauses_everyone_and_halves_the_rate(redis_client: Any) -> None:
    limiter = RateLimiter(redis_client, rate=4)
    await limiter.penalize(1.5)
    assert 25 < await redis_client.ttl(PENALTY_KEY) <= 30
    with pytest.raises(E.ThrottledError) as info:
        await RateLimiter(redis_client, rate=4).acquire(max_wait=0.1)  # another worker
    assert info.value.retry_after is not None
    assert 1.3 < info.value.retry_after <= 1.5
    await redis_client.delete(KEY)
    started = await redis_now(redis_client)
    await limiter.acquire()
    await limiter.acquire()
    # Half the rate: the second slot is two intervals on, not one.
    assert await redis_now(redis_client) - started >= 2 / (4 * SPACING) - 0.02
    await limiter.penalize(None)
    with pytest.raises(E.ThrottledError) as info:
        await limiter.acquire(max_wait=0)
    assert info.value.retry_after is not None
    assert 1.9 < info.value.retry_after <= 2.0


def test_the_budget_is_what_the_try_has_left_less_one_request() -> None:
    assert try_budget(5.0) is None  # outside a job: no deadline
    token = set_deadline(time.monotonic() + 10)
    try:
        budget = try_budget(5.0)
        assert budget is not None
        assert 4.4 < budget <= 4.5
    finally:
        reset_deadline(token)
    assert try_budget(5.0) is None


async def test_ten_texts_at_two_a_second_wait_in_place_and_leave_no_mark(harness: Harness, redis_client: Any) -> None:
    """Symptom 1: at CGB_RATE_LIMIT=2 with CGB_UNKNOWN_OUTCOME=fail, 9 of 10 texts ended as dead letters
    (SendOutcomeUnknownError), because a throttled try left its ``sending`` mark."""
    harness.set_env(CGB_RATE_LIMIT="2", CGB_UNKNOWN_OUTCOME="fail")
    await harness.known("+972500000001")
    jobs = await harness.enqueue(*({"to": "+972500000001", "message": f"m{i}"} for i in range(10)))
    await harness.run()
    results = [await harness.outcome(j) for j in jobs]
    assert all(isinstance(r, dict) and r["success"] for r in results), results
    assert not any(r["possibleDuplicate"] for r in results)
    assert [r["attempts"] for r in results] == [1] * 10
    assert await redis_client.zcard("cgb:dead:index") == 0
    assert [r["endpoint"] for r in harness.sim.state.requests] == ["send_text"] * 10
    sends = harness.sim.requests("send_text")
    texts = [r["body"]["text"] for r in sends]
    assert sorted(texts) == [f"m{i}" for i in range(10)]  # once each
    # Roughly in enqueue order: jobs claimed together ask for their slots about at once.
    assert all(abs(texts.index(f"m{i}") - i) <= 2 for i in range(10)), texts
    assert busiest_second([r["at"] for r in sends]) <= 2


async def test_a_cgb_429_slows_the_fleet(harness: Harness) -> None:
    harness.set_env(CGB_RATE_LIMIT="100")
    harness.sim.state.faults.append(FaultRule(status=429, retry_after="1", count=1, path="/send/text$"))
    jobs = await harness.enqueue(*({"to": "+972500000001", "message": f"m{i}"} for i in range(3)))
    await harness.run(max_jobs=1)
    results = [await harness.outcome(j) for j in jobs]
    assert all(r["success"] for r in results), results
    sends = sorted(r["at"] for r in harness.sim.requests("send_text"))
    # After the 429 nobody called CGB for a second, not only the job that saw it.
    assert sends[1] - sends[0] >= 0.95


async def test_a_throttled_job_is_deferred_even_when_redis_cannot_count_it(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Counting the deferral is bookkeeping: a Redis error there still ends in arq's Retry, not a raw error."""
    import redis.asyncio
    from arq import Retry

    from cgb_worker import jobs
    from cgb_worker.settings import load_settings

    async def throttled(*args: Any, **kwargs: Any) -> Any:
        raise E.ThrottledError("over the fleet's rate", retry_after=2.0)

    monkeypatch.setattr(jobs, "_send", throttled)
    dead = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.5)  # nothing listens there
    services = cast(
        Any,
        type("S", (), {"settings": load_settings({"CGB_API_KEY": "k", "PHONE_HASH_KEY": PHONE_KEY}), "redis": dead})(),
    )
    services.metrics = None
    try:
        with pytest.raises(Retry) as info:
            await jobs.whatsapp_send({"cgb": services, "job_id": "j1", "job_try": 1}, {"to": "+12025550100"})
    finally:
        await dead.aclose()
    assert info.value.defer_score == 2000  # the slot's own wait: Retry-After 2 s


async def test_a_request_that_wakes_late_takes_a_new_slot(redis_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy loop that wakes a request long after its slot would let it arrive beside the next second's
    requests; it takes the next slot instead."""
    real_sleep = asyncio.sleep
    sleeps: list[float] = []

    async def oversleep_once(seconds: float) -> None:
        sleeps.append(seconds)
        await real_sleep(seconds + (0.05 if len(sleeps) == 1 else 0))

    limiter = RateLimiter(redis_client, rate=10)
    await limiter.acquire()  # slot 0, now; the next is one interval on
    monkeypatch.setattr(asyncio, "sleep", oversleep_once)
    before = float(await redis_client.get(KEY))
    await limiter.acquire()
    after = float(await redis_client.get(KEY))
    assert len(sleeps) == 2  # woke 50 ms late, went back for another slot, and slept again
    interval_ms = 1000 / (10 * SPACING)
    assert after - before == pytest.approx(2 * interval_ms, abs=60)  # two slots taken, not one
