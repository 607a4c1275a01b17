"""The randomised attribution run, shared by ``tests/test_attribution.py`` (small) and ``make bench`` (larger).

Real arq workers send bursts of jobs to a few people (texts, a file with its text, native templates, flows that
send two WhatsApp messages) with the rate limit on; the simulator posts each message's statuses shuffled,
delayed, duplicated, and sometimes without ``sent``, to the real receiver over HTTP. The truth is the
simulator's outbox: every message it delivered carries the job id it came from (in its text, file URL, template
parameter or flow variable), so each wamid's job and step are known, and compared with every timeline.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from cgb_worker.receipts import delivery

STEP_OF_KIND = {"text": "text", "file": "file", "whatsapp_template": "whatsapp_template", "flow": "flow"}


@dataclass
class Report:
    messages: int = 0
    """WhatsApp messages the simulator delivered (its outbox)."""
    placed: int = 0
    """Messages whose wamid a timeline holds, on the right job and step."""
    wrong: list[str] = field(default_factory=list)
    """Messages placed on another job's or step's timeline: must stay empty."""
    unresolved: int = 0
    """Messages no timeline holds (never placed: said to be unmatched, not guessed)."""
    second_waits: list[float] = field(default_factory=list)
    """Seconds between two consecutive sends to one person, from the first's request to the second's."""
    seconds: float = 0.0


def payloads(rng: random.Random, phones: list[str], per_person: int) -> list[dict[str, Any]]:
    """A burst of ``per_person`` jobs to each phone, interleaved; each names its job id as ``jid``."""
    jobs: list[dict[str, Any]] = []
    n = 0
    for round_ in range(per_person):
        for phone in phones:
            n += 1
            jid = f"att-{n:04d}"
            kind = rng.choice(["text", "text", "file", "wa", "flow"])
            if kind == "text":
                body: dict[str, Any] = {"to": phone, "message": f"text of {jid}"}
            elif kind == "file":
                body = {"to": phone, "fileUrl": f"https://files.example/{jid}.pdf", "fileType": "document",
                        "message": f"text of {jid}"}  # fmt: skip
            elif kind == "wa":
                body = {"to": phone, "whatsappTemplate": {"name": "visa_approved", "language": "en", "body": [jid]}}
            else:
                body = {"to": phone, "template": "visa_approved", "variables": {"first_name": jid, "visa_type": "B2"}}
            jobs.append({"jid": jid, "round": round_, "body": body})
    return jobs


_JID = re.compile(r"att-\d{4}")


def job_of(entry: dict[str, Any]) -> str | None:
    text = " ".join(str(entry.get(k) or "") for k in ("text", "url")) + " " + str(entry.get("template") or "")
    found = _JID.search(text)
    return found.group(0) if found else None


async def check(pool: Any, outbox: list[dict[str, Any]], report: Report) -> None:
    """Compare each delivered message with the timelines."""
    truth: dict[str, tuple[str, str]] = {}
    for entry in outbox:
        jid = job_of(entry)
        assert jid is not None, entry
        truth[f"wamid.SIM{entry['seq']:08d}"] = (jid, STEP_OF_KIND[entry["kind"]])
    report.messages = len(truth)
    held: dict[str, tuple[str, str]] = {}
    for jid in sorted({j for j, _ in truth.values()}):
        found = await delivery(pool, jid)
        for step in found.steps if found else []:
            for wamid in step.wamids:
                held[wamid] = (jid, step.step)
    for wamid, where in held.items():
        if truth.get(wamid) != where:
            report.wrong.append(f"{wamid}: on {where}, belongs to {truth.get(wamid)}")
    report.placed = sum(1 for w, where in held.items() if truth.get(w) == where)
    report.unresolved = len(truth) - report.placed
    by_phone: dict[str, list[float]] = {}
    for entry in outbox:
        by_phone.setdefault(entry["phone"], []).append(entry["at"] / 1000)
    for times in by_phone.values():
        report.second_waits.extend(b - a for a, b in itertools.pairwise(times) if b > a)


async def settle(sim_state: Any, pool: Any, *, within: float) -> None:
    """Every status posted and every stored webhook processed, held statuses included."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        inbox_busy = await pool.xlen("cgb:webhooks:inbox") or any(
            g["pending"] for g in await pool.xinfo_groups("cgb:webhooks:inbox")
        )
        if not sim_state.webhook_tasks and not inbox_busy and not await pool.zcard("cgb:webhooks:orphans"):
            return
        await asyncio.sleep(0.1)
