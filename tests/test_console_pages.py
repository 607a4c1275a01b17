"""The console's pages over what real parts wrote: real arq workers sending through the simulator with the rate
limit on, the real receiver taking the simulator's signed webhooks over HTTP, shuffled, delayed and duplicated
as Meta's are; the console read over real HTTP."""

from __future__ import annotations

import html as html_lib
import re
from typing import Any

import aiohttp
import pytest

from cgb_worker.simulator import FaultRule

from .attribution import settle
from .conftest import Harness
from .test_console import Console, _serve
from .test_webhooks import SECRET, start_receiver

OK, UNREACHABLE = "+12025550130", "+12025550131"


@pytest.fixture
async def console(redis_url: str) -> Any:
    async for c in _serve(redis_url, None):
        yield c


def _rows(page: str, table: str) -> list[list[str]]:
    """The cells of a table's rows, tags stripped, entities decoded."""
    found = re.search(rf'<table id="{table}">(.*?)</table>', page, re.S)
    assert found, f"no table {table}"
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", found.group(1), re.S)
    return [
        [html_lib.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
        for r in rows
        if "<td" in r
    ]


async def test_the_overview_and_a_jobs_page_tell_what_really_happened(
    harness: Harness, redis_url: str, console: Console
) -> None:
    rec, stop = await start_receiver(redis_url)
    rec.processor.orphan_grace = 4.0
    harness.sim.configure(
        webhook_url=rec.url, webhook_secret=SECRET, webhook_delay=0.05, webhook_jitter=0.6,
        webhook_duplicate_rate=0.5, inbound_on_create=True, webhook_fail={UNREACHABLE[1:]: [131026]},
    )  # fmt: skip
    harness.sim.state.faults.append(FaultRule(status=503, count=1, path="/send/text$"))  # the first send: retried
    try:
        await harness.known(OK, UNREACHABLE)
        pool = await harness.pool()
        first = await pool.enqueue_job("whatsapp_send", {"to": OK, "message": "Your visa is approved"}, _job_id="j-ok")
        assert first is not None
        await harness.run()
        await pool.enqueue_job("whatsapp_send", {"to": OK, "message": "Documents needed"}, _job_id="j-ok2")
        await pool.enqueue_job("whatsapp_send", {"to": UNREACHABLE, "message": "Documents needed"}, _job_id="j-bad")
        await harness.run()
        await settle(harness.sim.state, pool, within=30)
        async with aiohttp.ClientSession() as http:
            async with http.get(console.url + "/") as resp:
                overview = await resp.text()
            async with http.get(console.url + "/jobs/j-ok") as resp:
                job = await resp.text()
            async with http.get(console.url + "/jobs/j-bad") as resp:
                bad = await resp.text()
    finally:
        await stop()
    # three messages accepted; two delivered and read whatever order their statuses came in, one failed
    funnel = {row[0]: row[1:] for row in _rows(overview, "funnel")}
    assert funnel["accepted"] == ["3", "100.0 %", "3", "100.0 %"]
    assert funnel["sent"] == ["2", "66.7 %", "2", "66.7 %"]  # WhatsApp said only 'failed' of the third
    assert funnel["delivered"] == ["2", "66.7 %", "2", "66.7 %"]
    assert funnel["read"] == ["2", "66.7 %", "2", "66.7 %"]
    assert funnel["failed"] == ["1", "33.3 %", "1", "33.3 %"]
    assert _rows(overview, "by-code") == [
        ["131026", "1", "undeliverable: not on WhatsApp, terms not accepted, or an old app"]
    ]
    assert "messages CGB accepted, per minute, the last hour" in overview
    assert re.search(r"<title>[^<]*UTC: accepted 3, dead 0</title>", overview)  # the three in one minute's bar
    # the job's tries, the latest first: it succeeded on its second try after CGB's 503
    tries = _rows(job, "tries")
    assert next(r[:3] for r in tries)[0] == "2"
    assert tries[0][2] == "succeeded"
    assert tries[1][0] == "1"
    assert tries[1][2:5] == ["retried", "CGBServerError", "HTTP 503 CGB code 503 on send_text"]
    timeline = _rows(job, "timeline")
    # the worker's own 'accepted', then WhatsApp's three, each once though half were posted twice
    assert timeline[0][0] == "accepted"
    assert sorted(r[0] for r in timeline[1:]) == ["delivered", "read", "sent"]
    assert all(r[4].startswith("wamid.SIM") and r[5] in ("wamid", "recipient") for r in timeline[1:])
    failed = [r for r in _rows(bad, "timeline") if r[0] == "failed"]
    assert len(failed) == 1
    assert failed[0][6].startswith("131026 ")
    assert failed[0][6].endswith("undeliverable: not on WhatsApp, terms not accepted, or an old app")
    for page in (overview, job, bad):
        assert "2025550130" not in page
        assert "2025550131" not in page
