"""The counter series (cgb_worker.series): who writes which counter, and what the console reads back."""

from __future__ import annotations

import time
from typing import Any

from cgb_worker import keys, series
from cgb_worker.deadletters import DeadLetters
from cgb_worker.errors import CGBServerError, ThrottledError
from cgb_worker.jobstate import TRIES_KEPT, last_retry_of, record_retry, tries
from cgb_worker.sends import SendLog


async def _bucket(redis: Any, now: float) -> dict[bytes, bytes]:
    minute, hour = series.bucket_keys(now)
    assert await redis.hgetall(minute) == await redis.hgetall(hour)
    return await redis.hgetall(minute)  # type: ignore[no-any-return]


async def test_a_step_sent_counts_accepted_with_its_mark(redis_client: Any) -> None:
    log = SendLog(redis_client)
    before = time.time()
    await log.mark_sent("job-1", "text")
    await log.mark_sent("job-1", "template", result=b"done")
    assert await redis_client.hget(keys.sends("job-1"), "template") is not None
    counted = await _bucket(redis_client, before)
    if not counted:  # the minute turned between the two: the next one has them
        counted = await _bucket(redis_client, before + 60)
    assert counted == {b"accepted": b"2"}


async def test_a_retry_is_listed_newest_first_and_only_a_counted_one_counts(redis_client: Any) -> None:
    now = time.time()
    await record_retry(
        redis_client,
        "job-1",
        last_retry_of(CGBServerError("boom", status=502), attempt=1, job_try=1, retry_in=2, counted=True),
    )
    await record_retry(
        redis_client, "job-1", last_retry_of(ThrottledError("wait"), attempt=2, job_try=2, retry_in=1, counted=False)
    )
    listed = await tries(redis_client, "job-1")
    assert [(t.error_type, t.job_try, t.counted, t.status) for t in listed] == [
        ("ThrottledError", 2, False, None),
        ("CGBServerError", 1, True, 502),
    ]
    window = series.bucket_keys(listed[1].at)
    assert await redis_client.hget(window[0], "retried") == b"1"
    assert await redis_client.hget(window[1], "retried") == b"1"
    assert abs(listed[1].at - now) < 60
    await redis_client.rpush(keys.tries("job-1"), b"\xc1not msgpack")  # another version's record: skipped
    assert len(await tries(redis_client, "job-1")) == 2


async def test_tries_are_capped_to_the_newest(redis_client: Any) -> None:
    for i in range(TRIES_KEPT + 5):
        record = last_retry_of(ThrottledError("wait"), attempt=1, job_try=i + 1, retry_in=1, counted=False)
        await record_retry(redis_client, "job-1", record)
    listed = await tries(redis_client, "job-1")
    assert [t.job_try for t in listed] == list(range(TRIES_KEPT + 5, 5, -1))
    assert await redis_client.llen(keys.tries("job-1")) == TRIES_KEPT
    assert 0 < await redis_client.ttl(keys.tries("job-1")) <= 7 * 86400


async def test_a_dead_letter_counts_dead(redis_client: Any) -> None:
    entry = await DeadLetters(redis_client).add(
        job_id="job-1", function="whatsapp_send", payload={"to": "+12025550100"}, error=ValueError("bad"),
        attempts=1, enqueued_at=None,
    )  # fmt: skip
    assert await _bucket(redis_client, entry.failed_at) == {b"dead": b"1"}


async def test_read_gives_an_hour_by_minute_and_a_day_by_hour_oldest_first(redis_client: Any) -> None:
    now = 1_800_000_000.0 + 59  # the last second of a minute
    async with redis_client.pipeline(transaction=True) as pipe:
        series.count(pipe, now, "accepted", 3)
        series.count(pipe, now - 59 * 60, "accepted")  # the hour's first minute
        series.count(pipe, now - 60 * 60, "accepted", 100)  # a minute before the hour: in the day only
        series.count(pipe, now - 23 * 3600, "code:131026", 2)
        series.count(pipe, now - 24 * 3600, "code:131049", 7)  # a day and an hour ago: in neither
        series.count(pipe, now, "code:131049")
        await pipe.execute()
    hour, day = await series.read(redis_client, now)
    assert len(hour.buckets) == 60
    assert len(day.buckets) == 24
    assert hour.series("accepted")[0] == 1
    assert hour.series("accepted")[-1] == 3
    assert sum(hour.series("accepted")) == 4
    assert hour.starts[-1] == 1_800_000_000.0
    assert hour.starts[0] == 1_800_000_000.0 - 59 * 60
    assert day.totals["accepted"] == 104
    assert day.codes() == [(131026, 2), (131049, 1)]
    assert hour.codes() == [(131049, 1)]
