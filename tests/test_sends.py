"""The send log's first read: it marks a cached text or file ``sending`` in the same command, and only then."""

from __future__ import annotations

from typing import Any

from cgb_worker.sends import RESULT, SENDING, SENT, TTL, SendLog


async def test_first_read_marks_only_a_cached_unsent_step(redis_client: Any) -> None:
    log = SendLog(redis_client)
    key = log.key("job-1")

    record, cached, marked = await log.load_with("job-1", "cache:none", "text")
    assert (record, cached, marked) == ({}, None, False)  # contact not cached: I/O comes before the send
    assert await redis_client.exists(key) == 0

    await redis_client.set("cache:dana", "972500000001")
    record, cached, marked = await log.load_with("job-1", "cache:dana", "text")
    assert (record, cached, marked) == ({}, b"972500000001", True)  # the record as it was before the mark
    assert await redis_client.hgetall(key) == {b"text": SENDING}
    assert TTL - 5 < await redis_client.ttl(key) <= TTL

    record, _, marked = await log.load_with("job-1", "cache:dana", "text")
    assert (record, marked) == ({b"text": SENDING}, True)  # an earlier try's mark is what the job sees

    await log.mark("job-1", "text", SENT)
    record, _, marked = await log.load_with("job-1", "cache:dana", "text")
    assert (record, marked) == ({b"text": SENT}, False)

    await log.mark("job-2", "file", SENT, result=b"r")
    record, _, marked = await log.load_with("job-2", "cache:dana", "text")
    assert (record[RESULT], marked) == (b"r", False)
    assert await redis_client.hget(log.key("job-2"), "text") is None

    record, _, marked = await log.load_with("job-3", "cache:dana")  # no step named (a template)
    assert (record, marked) == ({}, False)
