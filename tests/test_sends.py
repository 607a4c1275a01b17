"""The send log's Redis record, and which failures prove that nothing went out."""

from __future__ import annotations

from typing import Any

import pytest

from cgb_worker import errors as E
from cgb_worker.sends import RESULT, SENDING, SENT, TTL, SendLog, key, nothing_sent


async def test_marks_and_their_ttl(redis_client: Any) -> None:
    log = SendLog(redis_client)
    assert await log.load("job-1") == {}
    await log.mark_sending("job-1", "text")
    assert await redis_client.hgetall(key("job-1")) == {b"text": SENDING}
    assert TTL - 5 < await redis_client.ttl(key("job-1")) <= TTL
    await log.mark_sent("job-1", "text", result=b"r")
    assert await log.load("job-1") == {b"text": SENT, RESULT: b"r"}
    assert TTL - 5 < await redis_client.ttl(key("job-1")) <= TTL
    await log.clear("job-1", "text")
    assert await log.load("job-1") == {RESULT: b"r"}


OUTCOMES = [
    ("no connection", E.CGBConnectError("refused"), True),
    ("timeout after sending", E.CGBTimeoutError("no answer"), False),
    ("400", E.CGBBadRequestError("bad", status=400), True),
    ("401", E.CGBAuthError("no key", status=401), True),
    ("404", E.CGBNotFoundError("gone", status=404), True),
    ("408", E.CGBServerError("timeout", status=408), True),
    ("429", E.CGBRateLimitError("slow down", status=429), True),
    ("500", E.CGBServerError("boom", status=500), False),
    ("501", E.CGBServerError("not implemented", status=501), False),
    ("502", E.CGBServerError("bad gateway", status=502), False),
    ("503", E.CGBServerError("unavailable", status=503), True),
    ("504", E.CGBServerError("gateway timeout", status=504), False),
    ("error 500 in a 200", E.CGBServerError("boom", status=200, code=500), False),
    ("error 503 in a 200", E.CGBServerError("busy", status=200, code=503), True),
    ("error 401 in a 200", E.CGBAuthError("no key", status=200, code=401), True),
    ("success false", E.CGBBadRequestError("no", status=200), True),
    ("our own validation", E.InvalidJobError("bad"), True),
]


@pytest.mark.parametrize(("error", "proves"), [o[1:] for o in OUTCOMES], ids=[o[0] for o in OUTCOMES])
def test_what_each_failure_proves(error: Exception, proves: bool) -> None:
    """Symptom 5: 500, 502 and 504 cleared the ``sending`` mark as if nothing went out."""
    assert nothing_sent(error) is proves
