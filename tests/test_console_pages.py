"""The console's pages over what real parts wrote: real arq workers sending through the simulator with the rate
limit on, the real receiver taking the simulator's signed webhooks over HTTP, shuffled, delayed and duplicated
as Meta's are; the console read over real HTTP."""

from __future__ import annotations

import html as html_lib
import json
import re
import time
from typing import Any

import aiohttp
import pytest

from cgb_worker.simulator import FaultRule

from .attribution import settle
from .conftest import Console, Harness, _serve
from .test_console import _csrf
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
    result = re.search(r'<pre id="result">(.*?)</pre>', job, re.S)
    assert result, job
    shown = json.loads(html_lib.unescape(result.group(1)).replace("*", "0"))  # masked digits read as zeros
    assert (shown["success"], shown["kind"], shown["attempts"], shown["possibleDuplicate"]) == (True, "text", 2, False)
    assert shown["to"].endswith("30")
    assert 'id="possible-duplicate"' not in job
    timeline = _rows(job, "timeline")
    # the worker's own 'accepted', then WhatsApp's three, each once though half were posted twice
    assert timeline[0][0] == "accepted"
    assert sorted(r[0] for r in timeline[1:]) == ["delivered", "read", "sent"]
    assert all(r[4].startswith("wamid.SIM") and r[5] in ("wamid", "recipient") for r in timeline[1:])
    assert timeline[0][4:6] == ["", ""]  # the send itself: no wamid yet, and nothing was matched
    failed = [r for r in _rows(bad, "timeline") if r[0] == "failed"]
    assert len(failed) == 1
    assert failed[0][6].startswith("131026 ")
    assert failed[0][6].endswith("undeliverable: not on WhatsApp, terms not accepted, or an old app")
    for page in (overview, job, bad):
        assert "2025550130" not in page
        assert "2025550131" not in page


# -- failures: filters and replaying a selection ------------------------------------------------------------------


async def _dead(redis: Any, job_id: str, error: BaseException, age: float) -> None:
    """A dead letter that failed ``age`` seconds ago."""
    import msgspec

    from cgb_worker.deadletters import ENTRIES, INDEX, DeadLetters

    entry = await DeadLetters(redis).add(job_id=job_id, function="whatsapp_send", attempts=3, enqueued_at=None,
                                         payload={"to": OK, "message": f"text of {job_id}"}, error=error)  # fmt: skip
    at = entry.failed_at - age
    await redis.hset(ENTRIES, job_id, msgspec.msgpack.encode(msgspec.structs.replace(entry, failed_at=at)))
    await redis.zadd(INDEX, {job_id: at})


async def test_failures_filter_by_error_code_and_age_and_list_what_whatsapp_failed(console: Console) -> None:
    from cgb_worker import keys
    from cgb_worker.errors import CGBBadRequestError, InvalidPhoneError, UndeliverableError

    redis = console.redis
    await _dead(redis, "d-new-400", CGBBadRequestError("bad", status=400, code=4001), 60)
    await _dead(redis, "d-old-400", CGBBadRequestError("bad", status=400), 3 * 86400)
    await _dead(redis, "d-undeliverable", UndeliverableError("131026 a day ago"), 7200)
    await _dead(redis, "d-phone", InvalidPhoneError("no country code"), 30)
    now_ms = int(time.time() * 1000)
    for job, step, status, code, ago in [
        ("m1", "text", "failed", "131026", 10),
        ("m2", "text", "delivered", "", 5),
        ("m3", "flow", "failed", "131047", 90_000),
        ("m4", "text", "failed", "", 1),
    ]:
        await redis.xadd(keys.DELIVERIES, {"job": job, "step": step, "status": status, "wamid": "wamid.X",
                                           "error": code, "at": now_ms - ago * 1000})  # fmt: skip

    async def shown(query: str) -> tuple[list[str], list[str]]:
        async with aiohttp.ClientSession() as http, http.get(console.url + "/failures" + query) as resp:
            assert resp.status == 200
            page = await resp.text()
        dead = [r[1] for r in _rows(page, "dead-letters")] if 'id="dead-letters"' in page else []
        failed = [r[0] for r in _rows(page, "failed-messages")] if 'id="failed-messages"' in page else []
        return dead, failed

    assert await shown("") == (
        ["d-phone", "d-new-400", "d-undeliverable", "d-old-400"],
        ["m4", "m3", "m1"],
    )  # as recorded, newest first
    assert await shown("?error=cgbbadrequesterror") == (["d-new-400", "d-old-400"], [])  # a class names jobs only
    assert await shown("?code=4001") == (["d-new-400"], [])
    assert await shown("?code=400") == (["d-old-400"], [])  # no CGB code: the HTTP status
    assert await shown("?code=131026") == (["d-undeliverable"], ["m1"])
    assert await shown("?age=1h") == (["d-phone", "d-new-400"], ["m4", "m1"])
    assert await shown("?age=older-24h") == (["d-old-400"], ["m3"])
    assert await shown("?code=131047&age=24h") == ([], [])
    # bad filters are ignored, never an error: a code that is no number, an unknown age, a control character
    for query in ("?code=abc", "?code=-1", "?code=99999999999999", "?age=forever", "?error=%00x", "?age=%0a",
                  "?error=%2B12025550100", "?error=Invalid%20Phone", "?error=" + "E" * 200,
                  "?error=a202_555_0100"):  # fmt: skip
        dead, _failed = await shown(query)
        assert len(dead) == 4, query


async def test_replaying_a_selection_asks_first_and_links_each_new_job(console: Console) -> None:
    from cgb_worker.deadletters import DeadLetters
    from cgb_worker.errors import CGBServerError

    redis = console.redis
    for name in ("d1", "d2", "d3"):
        await _dead(redis, name, CGBServerError("down", status=503), 60)
    async with console.session() as http:
        async with http.get(console.url + "/failures/replay?job=d1&job=d3&job=d1&job=nope&job=%00") as resp:
            assert resp.status == 200
            page = await resp.text()
        assert [r[0] for r in _rows(page, "selection")] == ["d1", "d3"]  # each once; unknown and bad ids dropped
        csrf = _csrf(page)
        async with http.post(console.url + "/failures/replay", data=[("job", "d1"), ("job", "d3")],
                             allow_redirects=False) as resp:  # fmt: skip
            assert resp.status == 403  # no CSRF token: nothing done
        assert await DeadLetters(redis).get("d1") is not None
        await DeadLetters(redis).remove("d3")  # someone else deleted one meanwhile
        form = [("csrf", csrf), ("job", "d1"), ("job", "d3")]
        async with http.post(console.url + "/failures/replay", data=form, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/failures?replayed=1&gone=1"
        new_id = (await redis.get("cgb:replay:as:d1")).decode()
        assert await redis.zscore("arq:queue", new_id) is not None
        async with http.get(console.url + f"/jobs/{new_id}") as resp:
            assert 'id="replay-of" href="/jobs/d1"' in await resp.text()
        async with http.get(console.url + "/failures?replayed=1&gone=1") as resp:
            assert "1 replayed; 1 were no longer dead letters" in await resp.text()
        # every one the filter shows: d2 only is left
        async with http.get(console.url + "/failures/replay?all=1&error=CGBServerError") as resp:
            page = await resp.text()
        assert [r[0] for r in _rows(page, "selection")] == ["d2"]
        async with http.post(console.url + "/failures/replay", data=[("csrf", _csrf(page)), ("job", "d2")],
                             allow_redirects=False) as resp:  # fmt: skip
            assert resp.headers["Location"] == "/failures?replayed=1&gone=0"
        assert await DeadLetters(redis).count() == 0
        async with http.get(console.url + "/failures/replay?all=1") as resp:
            assert resp.status == 400  # nothing left to replay


# -- the suppression list -----------------------------------------------------------------------------------------


async def test_the_suppression_list_adds_and_removes_behind_a_confirmation(console: Console) -> None:
    from cgb_worker import keys
    from cgb_worker.suppression import lookup_who, suppress_who

    redis = console.redis
    who = keys.who(OK)
    await suppress_who(redis, keys.who(UNREACHABLE), scope="all", reason="keyword")
    async with console.session() as http:
        async with http.get(console.url + "/suppressions") as resp:
            page = await resp.text()
        assert _rows(page, "suppressed")[0][:2] == [keys.who(UNREACHABLE)[:12], "all"]
        csrf = _csrf(page)
        async with http.post(console.url + "/suppressions", data={"csrf": csrf, "phone": "+1 (202) 555-0130"}) as resp:
            page = await resp.text()
        assert "+1********30" in page
        assert 'id="not-suppressed"' in page
        for bad in ("", "12", "not a number", "+1 202 555 01300000"):
            async with http.post(console.url + "/suppressions", data={"csrf": csrf, "phone": bad}) as resp:
                assert resp.status == 400, bad
        async with http.get(console.url + f"/suppressions/{who}/add?scope=marketing") as resp:
            confirm = await resp.text()
        assert f"Suppress <code>{who[:12]}</code> for marketing?" in confirm
        async with http.post(console.url + f"/suppressions/{who}/add", data={"csrf": csrf, "scope": "everything"},
                             allow_redirects=False) as resp:  # fmt: skip
            assert resp.status == 400
        async with http.post(console.url + f"/suppressions/{who}/add", data={"scope": "marketing"},
                             allow_redirects=False) as resp:  # fmt: skip
            assert resp.status == 403  # no CSRF token
        assert not (await lookup_who(redis, who)).entries
        async with http.post(console.url + f"/suppressions/{who}/add", data={"csrf": csrf, "scope": "marketing"},
                             allow_redirects=False) as resp:  # fmt: skip
            assert resp.status == 303
        entries = (await lookup_who(redis, who)).entries
        assert [(e.scope, e.reason) for e in entries] == [("marketing", "operator")]
        async with http.get(console.url + f"/suppressions/{who}/remove") as resp:
            assert "Remove every opt-out" in await resp.text()
        async with http.post(console.url + f"/suppressions/{who}/remove", data={"csrf": csrf},
                             allow_redirects=False) as resp:  # fmt: skip
            assert resp.status == 303
        assert not (await lookup_who(redis, who)).entries
        async with http.post(console.url + f"/suppressions/{who}/remove", data={"csrf": csrf}) as resp:
            assert resp.status == 404  # lifted already
        for bad in ("ZZ", who.upper(), who + "0", "../" + who[3:]):
            async with http.get(console.url + f"/suppressions/{bad}/remove") as resp:
                assert resp.status == 404, bad
        async with http.get(console.url + "/suppressions") as resp:
            page = await resp.text()
    for digits in ("2025550130", "2025550131"):
        assert digits not in page
        assert digits not in confirm


async def test_a_jobs_fallback_and_resends_are_linked_both_ways(console: Console) -> None:
    import json

    from cgb_worker import keys

    pool = console.redis
    record = {"status": "failed", "at": int(time.time() * 1000), "wamid": "wamid.A", "error": {"code": 131047}}
    await pool.hset(keys.sends("j1"), mapping={"d:text": json.dumps(record), "text": "sent"})
    for child in ("j1:fallback", "j1:resend:text~1"):
        await pool.enqueue_job("whatsapp_send", {"to": OK, "message": "x"}, _job_id=child)
    await pool.enqueue_job("whatsapp_send", {"to": OK, "message": "x"}, _job_id="j2")
    async with aiohttp.ClientSession() as http:
        async with http.get(console.url + "/jobs/j1") as resp:
            page = await resp.text()
        async with http.get(console.url + "/jobs/j1%3Aresend%3Atext~1") as resp:
            child = await resp.text()
        async with http.get(console.url + "/jobs/j2") as resp:
            lone = await resp.text()
    links = re.findall(r'<li>([^<]*): <a href="([^"]+)">', page)
    assert links == [("fallback template", "/jobs/j1%3Afallback"), ("automatic resend (text~1)",
                                                                    "/jobs/j1%3Aresend%3Atext~1")]  # fmt: skip
    assert re.findall(r'<li>([^<]*): <a href="([^"]+)">', child) == [("automatic resend of", "/jobs/j1")]
    assert 'id="related"' not in lone


async def test_a_real_shaped_wamid_is_shown_by_its_tail_not_the_number_it_encodes(console: Console) -> None:
    import base64
    import json

    from cgb_worker import keys

    # the shape WhatsApp's ids have: protobuf-like bytes, the recipient's number first, base64
    raw = b"\x18\x0b12025550100\x15\x02\x00\x11\x18\x129A3CA5B3D4CD6E67E7\x00"
    wamid = "wamid." + base64.b64encode(raw).decode()
    record = {"status": "delivered", "at": int(time.time() * 1000), "wamid": wamid, "match": "wamid"}
    event = {"status": "delivered", "at": "2026-12-04T05:00:00Z", "received": "x", "wamid": wamid}
    await console.redis.hset(keys.sends("j1"), mapping={"d:text": json.dumps(record), "text": "sent",
                                                        "e:text": json.dumps(event) + "\n"})  # fmt: skip
    await console.redis.enqueue_job("whatsapp_send", {"to": OK, "message": "x"}, _job_id="j1")
    async with aiohttp.ClientSession() as http, http.get(console.url + "/jobs/j1") as resp:
        page = await resp.text()
    assert [r[4] for r in _rows(page, "timeline") if r[0] == "delivered"] == ["wamid.…" + wamid[-16:]]
    assert [r[3] for r in _rows(page, "steps")] == ["wamid.…" + wamid[-16:]]
    assert wamid[6:30] not in page  # the head, which encodes the number
    for word in re.findall(r"[A-Za-z0-9+/=]{8,}", page):
        try:
            decoded = base64.b64decode(word + "=" * (-len(word) % 4))
        except ValueError:
            continue
        assert b"2025550100" not in decoded


# -- what a page view costs Redis ---------------------------------------------------------------------------------


async def _commands(redis: Any) -> dict[str, int]:
    stats = await redis.info("commandstats")
    skip = ("cmdstat_info", "cmdstat_config")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k not in skip}


async def _seed(redis: Any, start: int, n: int) -> None:
    from cgb_worker.deadletters import DeadLetters
    from cgb_worker.errors import CGBServerError
    from cgb_worker.suppression import suppress_who

    for i in range(start, start + n):
        await suppress_who(redis, f"{i:032x}", scope="marketing", reason="131050")
        await redis.enqueue_job("whatsapp_send", {"to": OK, "message": f"m{i}"}, _job_id=f"q{i}")
        if i % 3 == 0:
            error = CGBServerError("down", status=503)
            await DeadLetters(redis).add(job_id=f"d{i}", function="whatsapp_send", payload={"to": OK}, error=error,
                                         attempts=3, enqueued_at=None)  # fmt: skip


async def test_a_page_view_costs_the_same_redis_commands_however_many_jobs_and_never_a_scan(console: Console) -> None:
    redis = console.redis
    views = [("GET", "/", None), ("GET", "/failures", None), ("GET", "/failures?code=503&age=1h", None),
             ("GET", "/jobs/q1", None), ("GET", "/suppressions", None)]  # fmt: skip

    async def costs() -> list[dict[str, int]]:
        out = []
        async with aiohttp.ClientSession() as http:
            for method, path, _body in views:
                await redis.config_resetstat()
                async with http.request(method, console.url + path) as resp:
                    assert resp.status == 200, path
                out.append(await _commands(redis))
        return out

    await _seed(redis, 0, 300)
    await costs()  # the first views load the scripts
    small = await costs()
    await _seed(redis, 300, 1200)
    large = await costs()
    for (_m, path, _b), few, many in zip(views, small, large, strict=True):
        assert few == many, path  # the same commands, as often, with five times the jobs and dead letters
        assert not {"keys", "scan", "hscan", "zscan"} & set(many), (path, many)
        assert many.get("sscan", 0) <= 1, path  # the suppression list: one page of its index
    overview = dict(large[0])
    assert overview.pop("hgetall") == 2 + 24  # the counter series: two hours by minute, a day of hours
    assert sum(overview.values()) <= 20, overview  # and a handful more, whatever the backlog
    assert large[-1]["mget"] == 1  # one page of the suppression list's entries, of 1,500


async def test_the_suppression_list_pages_through_a_long_list(
    console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cgb_worker.console import app as app_module
    from cgb_worker.suppression import suppress_who

    monkeypatch.setattr(app_module, "SUPPRESSIONS_PAGE", 40)
    people = {f"{i:032x}" for i in range(150)}  # past 128: a set Redis 7.2 would keep as one listpack is paged too
    for who in people:
        await suppress_who(console.redis, who, scope="all", reason="keyword")
    seen: set[str] = set()
    path, pages = "/suppressions", 0
    async with aiohttp.ClientSession() as http:
        while path:
            async with http.get(console.url + path) as resp:
                page = await resp.text()
            pages += 1
            assert '<h2 id="total">150 suppressed</h2>' in page
            shown = re.findall(r'href="/suppressions/([0-9a-f]{32})/remove"', page)
            assert len(shown) <= 100  # SSCAN's COUNT is a hint: a page stays near it
            seen.update(shown)
            found = re.search(r'id="next-page" href="(/suppressions\?page=\d+)"', page)
            path = found.group(1) if found else ""
            assert pages < 20
        for bad in ("?page=-1", "?page=abc", "?page=" + "9" * 30):  # ignored: the first page
            async with http.get(console.url + "/suppressions" + bad) as resp:
                assert resp.status == 200, bad
    assert seen == people
    assert pages >= 3


# -- one damaged record never breaks a page (the re-attack's finding 2) -------------------------------------------


async def test_one_damaged_record_never_breaks_a_page(console: Console) -> None:
    import json

    import msgspec

    from cgb_worker import keys, series
    from cgb_worker.deadletters import ENTRIES, INDEX, DeadLetters
    from cgb_worker.errors import CGBServerError

    redis = console.redis
    who = keys.who(OK)
    now = time.time()
    good = {"status": "read", "at": int(now * 1000), "wamid": "wamid.G", "match": "wamid"}
    await DeadLetters(redis).add(job_id="good-dead", function="whatsapp_send", payload={"to": OK},
                                 error=CGBServerError("down", status=503), attempts=3, enqueued_at=None)  # fmt: skip
    for job in ("good", "bad"):
        await redis.enqueue_job("whatsapp_send", {"to": OK, "message": "x"}, _job_id=job)
        await redis.hset(keys.sends(job), mapping={"d:text": json.dumps(good), "text": "sent"})
        await redis.zadd(keys.jobs_on(int(now // 86400)), {series.index_member(who, int(now * 1000), job): 0})
    await redis.xadd(keys.DELIVERIES, {"job": "good", "step": "text", "status": "failed", "wamid": "w",
                                       "error": "131026", "at": int(now * 1000)})  # fmt: skip
    damage = {
        "dead letter not msgpack": (ENTRIES, "hset", "bad-dead", b"\xc1\xc1"),
        "dead letter JSON": (ENTRIES, "hset", "bad-dead", b'{"jobId": "x"}'),
        "dead letter missing a field": (ENTRIES, "hset", "bad-dead", msgspec.msgpack.encode({"job_id": "x"})),
        "send record not JSON": (keys.sends("bad"), "hset", "d:flow", b"{nope"),
        "send record a list": (keys.sends("bad"), "hset", "d:flow", b"[1, 2]"),
        "send record at not a number": (keys.sends("bad"), "hset", "d:flow", b'{"status": "sent", "at": "soon"}'),
        "event line not JSON": (keys.sends("bad"), "hset", "e:text", b'{"status": "read", "at": "x"}\n{nope\n'),
        "unresolved not a number": (keys.sends("bad"), "hset", "u:text", b"many"),
        "step name not UTF-8": (keys.sends("bad"), "hset", b"d:\xff\xfe", json.dumps(good).encode()),
        "last retry not msgpack": (keys.last_retry("bad"), "set", None, b"\xc1"),
        "replay link not UTF-8": (keys.replay_of("bad"), "set", None, b"\xff\xfe"),
        "index member not ours": (keys.jobs_on(int(now // 86400)), "zadd", None, who.encode() + b"|\xff|\xfe"),
        "stream entry at not a number": (keys.DELIVERIES, "xadd", None, b"soon"),
        "counter not a number": (keys.series_hour(series.hour_of(now)), "hset", "accepted", b"lots"),
        "counter name not UTF-8": (keys.series_minutes(series.hour_of(now)), "hset", b"\xff:x", b"1"),
        # the third attack's
        "send record at infinite": (keys.sends("bad"), "hset", "d:flow", b'{"status": "sent", "at": 1e300}'),
        "send record wamid a number": (
            keys.sends("bad"),
            "hset",
            "d:flow",
            b'{"status": "sent", "at": 1, "wamid": 12025550100}',
        ),
        "send record resendOf a list": (
            keys.sends("bad"),
            "hset",
            "d:flow",
            b'{"status": "sent", "at": 1, "resendOf": [1], "match": 5}',
        ),
        "minute field a superscript": (keys.series_minutes(series.hour_of(now)), "hset", "\u00b2:accepted", b"1"),
        "code a superscript": (keys.series_hour(series.hour_of(now)), "hset", "code:\u00b2", b"1"),
        "stream at out of any calendar": (keys.DELIVERIES, "xadd", None, b"9" * 30),
        "dead letter failed in no year": (
            ENTRIES,
            "hset",
            "bad-dead",
            msgspec.msgpack.encode(
                {
                    "job_id": "bad-dead",
                    "function": "whatsapp_send",
                    "payload": {1: "a", "b": b"\x00"},
                    "error_type": "X",
                    "error": "x",
                    "attempts": 1,
                    "enqueued_at": None,
                    "failed_at": 1e300,
                }
            ),
        ),
        "index member of another century": (
            keys.jobs_on(int(now // 86400)),
            "zadd",
            None,
            who.encode() + b"|" + b"9" * 26 + b"|good",
        ),
    }
    csrf = ""
    async with console.session() as http:
        for name, (key, how, field, value) in damage.items():
            if how == "hset":
                await redis.hset(key, field, value)
                if key == ENTRIES:
                    await redis.zadd(INDEX, {field: now})
            elif how == "set":
                await redis.set(key, value)
            elif how == "zadd":
                await redis.zadd(key, {value: 0})
            else:
                await redis.xadd(
                    key, {"job": b"\xff", "step": "text", "status": "failed", "error": "\u00b2", "at": value}
                )
            pages = {}
            for path in ("/", "/failures", "/failures?code=131026", "/failures/replay?all=1", "/jobs/bad",
                         "/jobs/good", "/failures/bad-dead/delete"):  # fmt: skip
                async with http.get(console.url + path) as resp:
                    pages[path] = await resp.text()
                    assert resp.status in (200, 404), (name, path, pages[path][:300])
            async with http.get(console.url + "/find") as resp:
                csrf = _csrf(await resp.text())
            async with http.post(console.url + "/find", data={"csrf": csrf, "phone": OK}) as resp:
                found = await resp.text()
                assert resp.status == 200, name
            assert 'href="/jobs/good"' in found, name  # the neighbours still listed
            assert "good-dead" in pages["/failures"], name
            if key == ENTRIES:  # the damaged entry is listed (as such, when it does not decode) and can be deleted
                assert "bad-dead" in pages["/failures"], name
                async with http.post(console.url + "/failures/bad-dead/delete", data={"csrf": csrf},
                                     allow_redirects=False) as resp:  # fmt: skip
                    assert resp.status == 303, name
                assert await DeadLetters(redis).get("bad-dead") is None
            elif how == "hset":
                await redis.hdel(key, field)
            elif how == "set":
                await redis.delete(key)
            elif how == "zadd":
                await redis.zrem(key, value)
            else:
                last = await redis.xrevrange(key, count=1)
                await redis.xdel(key, last[0][0])


async def test_a_page_that_fails_answers_500_with_the_security_headers(
    console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cgb_worker.console import app as app_module

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug near +1 202 555 0100")

    monkeypatch.setattr(app_module, "_funnel", broken)
    async with aiohttp.ClientSession() as http, http.get(console.url + "/") as resp:
        assert resp.status == 500
        assert await resp.text() == "this page failed (ZeroDivisionError); the console's log says more\n"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-store"
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]


# -- any id arq could hold can be opened and acted on (the re-attack's finding 3) ----------------------------------


async def test_dead_letters_with_odd_ids_open_replay_and_delete(console: Console) -> None:
    from cgb_worker.deadletters import DeadLetters
    from cgb_worker.errors import CGBServerError

    redis = console.redis
    odd = ["dl/slash", "/lead", "trail/", "a//b", "..", ".", "tab\tid", "x" * 300, "q?&#%", "sp ace"]
    store = DeadLetters(redis)
    for job_id in odd:
        await store.add(job_id=job_id, function="whatsapp_send", payload={"to": OK, "message": "x"},
                        error=CGBServerError("down", status=503), attempts=3, enqueued_at=None)  # fmt: skip
    async with console.session() as http:
        async with http.get(console.url + "/failures") as resp:
            page = await resp.text()
        csrf = _csrf(page)
        hrefs = dict(re.findall(r'<td><a href="([^"]+)">([^<]*)</a></td>\s*<td>[0-9-]+ ', page))
        assert len(hrefs) == len(odd)
        for href in hrefs:  # each job page opens
            async with http.get(console.url + html_lib.unescape(href)) as resp:
                assert resp.status == 200, href
                assert 'id="state"' in await resp.text(), href
        deletes = re.findall(r'<a href="([^"]+)">Delete</a>', page)
        replays = re.findall(r'<a href="([^"]+)">Replay</a>', page)
        assert len(deletes) == len(replays) == len(odd)
        for href in deletes[:5]:  # five deleted through their confirmation pages
            target = console.url + html_lib.unescape(href)
            async with http.get(target) as resp:
                assert resp.status == 200, href
                action = re.search(r'<form method="post" action="(/failures/[^"]+)">', await resp.text())
                assert action, href
            async with http.post(console.url + html_lib.unescape(action.group(1)), data={"csrf": csrf},
                                 allow_redirects=False) as resp:  # fmt: skip
                assert resp.status == 303, href
        assert await store.count() == len(odd) - 5
        # the other five replayed all at once: each counted, none stuck
        async with http.get(console.url + "/failures/replay?all=1") as resp:
            confirm = await resp.text()
        chosen = re.findall(r'<input type="hidden" name="job" value="([^"]*)">', confirm)
        form = [("csrf", csrf)] + [("job", html_lib.unescape(v)) for v in chosen]
        assert len(form) == 6
        async with http.post(console.url + "/failures/replay", data=form, allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/failures?replayed=5&gone=0"
    assert await store.count() == 0
    assert await redis.zcard("arq:queue") == 5


async def test_a_jobs_page_says_when_it_may_have_sent_twice(harness: Harness, console: Console) -> None:
    await harness.known(OK)
    harness.sim.state.faults.append(FaultRule(status=502, after=True, count=1, path="/send/text$"))  # sent, then 502
    [job] = await harness.enqueue({"to": OK, "message": "Your visa is approved"})
    await harness.run()
    async with aiohttp.ClientSession() as http, http.get(console.url + f"/jobs/{job.job_id}") as resp:
        page = await resp.text()
    assert 'id="possible-duplicate"' in page
    assert '"possibleDuplicate": true' in html_lib.unescape(page)
    assert len(harness.sim.state.outbox) == 2  # what the warning says: the message went out twice


async def test_the_tries_are_numbered_by_arqs_tries_once_its_result_is_gone(console: Console) -> None:
    from cgb_worker.deadletters import DeadLetters
    from cgb_worker.errors import InvalidPhoneError, ThrottledError
    from cgb_worker.jobstate import last_retry_of, record_retry

    for job_try in (1, 2, 3):  # deferred three times (no attempt used up), then failed on arq's fourth try
        deferral = last_retry_of(ThrottledError("wait"), attempt=1, job_try=job_try, retry_in=1, counted=False)
        await record_retry(console.redis, "j-def", deferral)
    await DeadLetters(console.redis).add(job_id="j-def", function="whatsapp_send", payload={"to": OK},
                                         error=InvalidPhoneError("bad"), attempts=1, enqueued_at=None)  # fmt: skip
    async with aiohttp.ClientSession() as http, http.get(console.url + "/jobs/j-def") as resp:
        page = await resp.text()
    rows = _rows(page, "tries")
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("4", "failed", "InvalidPhoneError"),
        ("3", "deferred", "ThrottledError"),
        ("2", "deferred", "ThrottledError"),
        ("1", "deferred", "ThrottledError"),
    ]


async def test_a_failed_message_a_later_change_delivered_says_so(console: Console) -> None:
    from cgb_worker import keys

    now_ms = int(time.time() * 1000)
    for job, step, status, code in [("r1", "text", "failed", "131049"), ("r2", "text", "failed", "131026"),
                                    ("r1", "text~1", "sent", ""), ("r1", "text~1", "read", "")]:  # fmt: skip
        await console.redis.xadd(keys.DELIVERIES, {"job": job, "step": step, "status": status, "wamid": "w",
                                                   "error": code, "at": now_ms})  # fmt: skip
    async with aiohttp.ClientSession() as http, http.get(console.url + "/failures") as resp:
        page = await resp.text()
    rows = {r[0]: r[5] for r in _rows(page, "failed-messages")}
    assert rows == {"r1": "then read", "r2": ""}  # the resend was read; the other stands failed


async def test_a_key_of_another_type_is_a_500_that_says_so_not_a_redis_outage(console: Console) -> None:
    from cgb_worker import keys

    await console.redis.enqueue_job("whatsapp_send", {"to": OK, "message": "x"}, _job_id="wt")
    await console.redis.set(keys.tries("wt"), b"a string where a list is")
    async with aiohttp.ClientSession() as http, http.get(console.url + "/jobs/wt") as resp:
        assert resp.status == 500
        assert (await resp.text()).startswith("Redis refused a command: WRONGTYPE")
        assert resp.headers["X-Frame-Options"] == "DENY"
