"""Attribution under Meta's real behaviour: many people, bursts of jobs to each, statuses shuffled, delayed,
duplicated and sometimes without ``sent``; real workers, the real receiver over HTTP, the simulator. Not one
status may land on the wrong message (seeded, so a failure can be rerun)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from .attribution import Report, check, payloads, settle
from .conftest import Harness
from .test_webhooks import SECRET, start_receiver

PHONES = [f"+1202555{i:04d}" for i in range(110, 116)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 23])
async def test_no_status_lands_on_the_wrong_message(harness: Harness, redis_url: str, seed: int) -> None:
    rec, stop = await start_receiver(redis_url)
    rec.processor.orphan_grace = 8.0
    harness.set_env(STATUS_TURN_WAIT="1", CGB_TIMEOUT="1000", CGB_RATE_LIMIT="20")
    harness.sim.configure(
        webhook_url=rec.url,
        webhook_secret=SECRET,
        webhook_delay=0.05,
        webhook_jitter=1.2,
        webhook_duplicate_rate=0.2,
        webhook_drop_sent_rate=0.25,
        flow_messages=2,
        inbound_on_create=True,
    )
    harness.sim.state.random.seed(seed)
    try:
        await harness.known(*PHONES)
        jobs = payloads(random.Random(seed), PHONES, per_person=3)
        pool = await harness.pool()
        for job in jobs:
            await pool.enqueue_job("whatsapp_send", job["body"], _job_id=job["jid"])
        await harness.run(workers=2)
        await settle(harness.sim.state, pool, within=30)
        outbox: list[dict[str, Any]] = harness.sim.state.outbox
        report = Report()
        await check(pool, outbox, report)
        print(f"seed {seed}: {report.messages} messages, {report.placed} placed, {report.unresolved} unresolved")
        assert report.wrong == []
        assert report.messages >= len(jobs)
        # the flows' second messages may stay unresolved; everything else is placed
        assert report.placed >= report.messages - sum(1 for e in outbox if e["kind"] == "flow") // 2
    finally:
        await stop()
