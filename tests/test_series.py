"""The counter series and the person index (cgb_worker.series): who writes what, the worker's batches, and what
the console reads back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cgb_worker import keys, series
from cgb_worker.deadletters import DeadLetters
from cgb_worker.errors import CGBServerError, ThrottledError
from cgb_worker.jobstate import TRIES_KEPT, last_retry_of, record_retry, tries
from cgb_worker.series import Recorder

NOW = 1_800_000_000.0 + 7 * 60 + 5  # an hour's eighth minute


async def _counted(redis: Any, now: float) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """The hour's by-minute counters of ``now``'s minute (their field's minute stripped) and its totals."""
    hour = series.hour_of(now)
    prefix = series.minute_field(now, "").encode()
    minute = {k[len(prefix) :]: v for k, v in (await redis.hgetall(keys.series_minutes(hour))).items()
              if k.startswith(prefix)}  # fmt: skip
    return minute, await redis.hgetall(keys.series_hour(hour))


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
    assert await _counted(redis_client, listed[1].at) == ({b"retried": b"1"}, {b"retried": b"1"})
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
    assert await _counted(redis_client, entry.failed_at) == ({b"dead": b"1"}, {b"dead": b"1"})


async def test_the_recorder_writes_a_spans_counts_and_index_entries_in_one_batch(redis_client: Any) -> None:
    recorder = Recorder(redis_client)
    for i in range(30):
        recorder.count("accepted", NOW)
        recorder.index("a" * 32, f"job-{i}", 1_700_000_000_000 + i, NOW)
    recorder.index("a" * 32, "job-0", 1_700_000_000_000, NOW)  # a second try of a job: one entry still
    recorder.count("accepted", NOW + 3600)  # the next hour
    assert await redis_client.dbsize() == 0  # nothing written before the flush
    await redis_client.config_resetstat()
    await recorder.flush()
    stats = await redis_client.info("commandstats")
    calls = {k[8:]: int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config|resetstat")}
    assert calls == {"hincrby": 4, "expire": 5, "zadd": 1}  # for 31 counts and 30 entries
    assert await _counted(redis_client, NOW) == ({b"accepted": b"30"}, {b"accepted": b"30"})
    assert await _counted(redis_client, NOW + 3600) == ({b"accepted": b"1"}, {b"accepted": b"1"})
    day = keys.jobs_on(int(NOW // 86400))
    members = await redis_client.zrange(day, 0, -1)
    assert len(members) == 30
    assert members[0] == ("a" * 32 + "|1700000000000|job-0").encode()
    assert 7 * 86400 < await redis_client.ttl(day) <= series.INDEX_TTL
    await redis_client.config_resetstat()
    await recorder.flush()  # nothing gathered since: no command
    stats = await redis_client.info("commandstats")
    assert {k for k in stats if k not in ("cmdstat_info", "cmdstat_config|resetstat")} == set()
    recorder.count("accepted", NOW)
    recorder.index("a" * 32, "job-99", 1_700_000_000_099, NOW)
    await redis_client.config_resetstat()
    await recorder.flush()  # keys whose TTL it set already: their writes alone
    stats = await redis_client.info("commandstats")
    calls = {k[8:]: int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config|resetstat")}
    assert calls == {"hincrby": 2, "zadd": 1}


async def test_the_recorder_keeps_what_it_could_not_write_and_bounds_the_index(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(series, "PENDING_MAX", 5)

    class Down:
        def pipeline(self, **_kw: Any) -> Any:
            raise ConnectionError("Redis is away")

    recorder = Recorder(Down())  # type: ignore[arg-type]
    for i in range(8):
        recorder.count("accepted", NOW)
        recorder.index("b" * 32, f"job-{i}", 1_700_000_000_000 + i, NOW)
    with pytest.raises(ConnectionError):
        await recorder.flush()
    recorder.redis = redis_client  # Redis is back: the counts in full, the newest five index entries
    await recorder.flush()
    assert await _counted(redis_client, NOW) == ({b"accepted": b"8"}, {b"accepted": b"8"})
    members = await redis_client.zrange(keys.jobs_on(int(NOW // 86400)), 0, -1)
    assert [m.rsplit(b"|", 1)[1] for m in members] == [f"job-{i}".encode() for i in range(3, 8)]


async def test_the_recorder_writes_on_its_own_and_once_more_when_stopped(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(series, "FLUSH_EVERY", 0.05)
    recorder = Recorder(redis_client)
    recorder.start()
    recorder.count("accepted", NOW)
    for _ in range(100):
        if (await _counted(redis_client, NOW))[1]:
            break
        await asyncio.sleep(0.02)
    assert (await _counted(redis_client, NOW))[1] == {b"accepted": b"1"}
    monkeypatch.setattr(series, "FLUSH_EVERY", 3600.0)
    await asyncio.sleep(0.1)  # the loop now sleeps an hour
    recorder.count("accepted", NOW)
    await recorder.stop()  # what is left is written on the way out
    assert (await _counted(redis_client, NOW))[1] == {b"accepted": b"2"}


async def test_read_gives_an_hour_by_minute_and_a_day_by_hour_oldest_first(redis_client: Any) -> None:
    now = 1_800_000_000.0 + 59  # the last second of a minute (an hour's first)
    async with redis_client.pipeline(transaction=True) as pipe:
        series.count(pipe, now, "accepted", 3)
        series.count(pipe, now - 59 * 60, "accepted")  # the window's first minute (the hour before)
        series.count(pipe, now - 60 * 60, "accepted", 100)  # a minute before the window: in the day only
        series.count(pipe, now - 23 * 3600, "code:131026", 2)
        series.count(pipe, now - 24 * 3600, "code:131049", 7)  # a day ago: in neither
        series.count(pipe, now, "code:131049")
        await pipe.execute()
    await redis_client.hset(keys.series_hour(series.hour_of(now)), mapping={"junk": "not a number"})
    await redis_client.hset(keys.series_minutes(series.hour_of(now)), mapping={"xx:accepted": "5", "nocolon": "1"})
    hour, day = await series.read(redis_client, now)
    assert len(hour.buckets) == 60
    assert len(day.buckets) == 24
    assert hour.series("accepted")[0] == 1
    assert hour.series("accepted")[-1] == 3
    assert sum(hour.series("accepted")) == 4
    assert hour.starts[-1] == 1_800_000_000.0
    assert hour.starts[0] == 1_800_000_000.0 - 59 * 60
    assert day.totals["accepted"] == 104
    assert day.totals["junk"] == 0  # a value that is no number counts as nothing, the page still shows
    assert day.codes() == [(131026, 2), (131049, 1)]
    assert hour.codes() == [(131049, 1)]
