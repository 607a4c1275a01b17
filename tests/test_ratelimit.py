"""The fleet-wide rate limit: a sliding one-second window in Redis, shared by every worker."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from cgb_worker import errors as E
from cgb_worker.ratelimit import PAUSE_KEY, PENALTY_KEY, RateLimiter
from cgb_worker.simulator import FaultRule

from .conftest import Harness, free_port


def busiest_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u - t < 1.0) for i, t in enumerate(times))


async def test_no_window_admits_more_than_the_limit(redis_client: Any) -> None:
    limiters = [RateLimiter(redis_client, rate=10, max_wait=30) for _ in range(3)]  # three "processes"
    admitted: list[float] = []

    async def one(limiter: RateLimiter) -> None:
        await limiter.acquire()
        admitted.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(one(limiters[i % 3]) for i in range(35)))
    assert len(admitted) == 35
    # Redis's clock decides; ours reads it a moment later, so allow one request of slack.
    assert busiest_second(admitted) <= 11
    assert time.monotonic() - started >= 2.9  # 35 at 10/s: at least three full windows


async def test_a_long_wait_is_a_throttle_not_a_sleep(redis_client: Any) -> None:
    limiter = RateLimiter(redis_client, rate=2, max_wait=0.2)
    await limiter.acquire()
    await limiter.acquire()
    started = time.monotonic()
    with pytest.raises(E.ThrottledError) as info:
        await limiter.acquire()
    assert time.monotonic() - started < 0.3
    assert info.value.retryable is True
    assert info.value.retry_after is not None
    assert 0.5 < info.value.retry_after <= 1.1  # the 1.1 s window


async def test_a_429_pauses_everyone_and_halves_the_limit(redis_client: Any) -> None:
    limiter = RateLimiter(redis_client, rate=4, max_wait=0.1)
    await limiter.penalize(1.5)
    assert 1400 < await redis_client.pttl(PAUSE_KEY) <= 1500
    assert 25 < await redis_client.ttl(PENALTY_KEY) <= 30
    with pytest.raises(E.ThrottledError) as info:
        await RateLimiter(redis_client, rate=4, max_wait=0.1).acquire()  # another worker
    assert info.value.retry_after is not None
    assert info.value.retry_after > 1.3
    await redis_client.delete(PAUSE_KEY)
    await limiter.acquire()
    await limiter.acquire()
    with pytest.raises(E.ThrottledError):
        await limiter.acquire()  # 2 a second now, not 4
    await limiter.penalize(None)
    assert 1900 < await redis_client.pttl(PAUSE_KEY) <= 2000


async def test_throttled_jobs_use_no_retry_attempts(harness: Harness) -> None:
    harness.set_env(CGB_RATE_LIMIT="4", CGB_RETRY_ATTEMPTS="0")
    jobs = await harness.enqueue(*({"to": f"+1202555{i:04d}", "message": f"m{i}"} for i in range(6)))
    await harness.run()
    results = [await harness.outcome(j) for j in jobs]
    assert all(isinstance(r, dict) and r["success"] for r in results), results
    # Each new number costs four calls (find, find, create, send): 24 calls at 4 a second.
    assert busiest_second([r["at"] for r in harness.sim.state.requests]) <= 5
    assert len(harness.sim.state.outbox) == 6


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
    services = cast(Any, type("S", (), {"settings": load_settings({"CGB_API_KEY": "k"}), "redis": dead})())
    services.metrics = None
    try:
        with pytest.raises(Retry) as info:
            await jobs.whatsapp_send({"cgb": services, "job_id": "j1", "job_try": 1}, {"to": "+12025550100"})
    finally:
        await dead.aclose()
    assert 2000 <= (info.value.defer_score or 0) <= 3000  # Retry-After 2 s, plus up to half again of jitter
