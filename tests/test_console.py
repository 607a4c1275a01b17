"""The operations console over real HTTP, a real Redis and a real arq worker: who may see it (the token, the
session cookie, the bearer, loopback only without a token, Host checked), CSRF on every action, what its pages
show, and that no phone number appears in clear."""

from __future__ import annotations

import re
import time
from typing import Any

import aiohttp
import pytest

from cgb_worker.console.auth import COOKIE
from cgb_worker.deadletters import DeadLetters
from cgb_worker.errors import InvalidJobError
from cgb_worker.settings import load_console_settings

from .conftest import CONSOLE_TOKEN as TOKEN_VALUE
from .conftest import PHONE_KEY, Console, Harness

PHONE = "+12025550100"
DIGITS = "2025550100"


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, html
    return found.group(1)


async def _sign_in(console: Console, http: aiohttp.ClientSession, token: str = TOKEN_VALUE) -> aiohttp.ClientResponse:
    async with http.get(console.url + "/login") as resp:
        csrf = _csrf(await resp.text())
    resp = await http.post(console.url + "/login", data={"csrf": csrf, "token": token, "next": "/failures"})
    await resp.read()
    return resp


# -- who may see it ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/failures", "/find", "/jobs/abc", "/failures/abc/replay"])
async def test_with_a_token_every_page_sends_you_to_sign_in(guarded: Console, path: str) -> None:
    async with guarded.session() as http, http.get(guarded.url + path, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == f"/login?next={path}"


async def test_signing_in_sets_a_strict_http_only_cookie_and_opens_the_pages(guarded: Console) -> None:
    async with guarded.session() as http:
        resp = await _sign_in(guarded, http)
        assert resp.status == 200
        assert str(resp.url).endswith("/failures")  # followed `next`
        header = next(h for h in resp.history[0].headers.getall("Set-Cookie") if h.startswith(COOKIE))
        assert "HttpOnly" in header
        assert "SameSite=Strict" in header
        async with http.get(guarded.url + "/") as page:
            assert page.status == 200
            assert "Overview" in await page.text()


@pytest.mark.parametrize(
    "token",
    ["wrong-token-0123456789", "", TOKEN_VALUE[:-1], TOKEN_VALUE + "x", TOKEN_VALUE.upper(), "\x00" * 30],
)
async def test_a_wrong_token_is_refused(guarded: Console, token: str) -> None:
    async with guarded.session() as http:
        resp = await _sign_in(guarded, http, token)
        assert resp.status == 401
        assert "not the console" in await resp.text()
        async with http.get(guarded.url + "/", allow_redirects=False) as page:
            assert page.status == 303


async def test_bearer_opens_every_page_and_action_without_csrf(guarded: Console) -> None:
    dead = DeadLetters(guarded.redis)
    await dead.add(job_id="d1", function="whatsapp_send", payload={"to": PHONE, "message": "m"},
                   error=InvalidJobError("bad"), attempts=1, enqueued_at=None)  # fmt: skip
    headers = {"Authorization": f"Bearer {TOKEN_VALUE}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(guarded.url + "/failures", headers=headers) as resp:
            assert resp.status == 200
            assert "d1" in await resp.text()
        async with http.post(guarded.url + "/failures/d1/delete", headers=headers, allow_redirects=False) as resp:
            assert resp.status == 303
        assert await dead.get("d1") is None
        bad = {"Authorization": "Bearer nope"}
        async with http.post(guarded.url + "/failures/d1/delete", headers=bad, allow_redirects=False) as resp:
            assert resp.status == 401


@pytest.mark.parametrize(
    "cookie",
    [
        "forged",
        "1.2.1.deadbeef",
        "",
        "x" * 300,
        # a signed-out session's cookie with its flag flipped: the signature no longer matches
        None,
    ],
)
async def test_a_forged_cookie_is_no_session(guarded: Console, cookie: str | None) -> None:
    async with guarded.session() as http:
        if cookie is None:
            async with http.get(guarded.url + "/login") as resp:
                sealed = resp.cookies[COOKIE].value
            issued, nonce, _flag, mac = sealed.split(".")
            cookie = f"{issued}.{nonce}.1.{mac}"
        async with (
            aiohttp.ClientSession() as bare,
            bare.get(guarded.url + "/", headers={"Cookie": f"{COOKIE}={cookie}"}, allow_redirects=False) as resp,
        ):
            assert resp.status == 303


async def test_an_expired_session_is_over(guarded: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    async with guarded.session() as http:
        await _sign_in(guarded, http)
        monkeypatch.setattr(time, "time", lambda: 10**12)  # far past the 12 hours
        async with http.get(guarded.url + "/", allow_redirects=False) as resp:
            assert resp.status == 303


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:x"])
async def test_signing_in_never_sends_you_off_the_console(guarded: Console, target: str) -> None:
    async with guarded.session() as http:
        async with http.get(guarded.url + "/login") as resp:
            csrf = _csrf(await resp.text())
        data = {"csrf": csrf, "token": TOKEN_VALUE, "next": target}
        async with http.post(guarded.url + "/login", data=data, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/"


async def test_without_a_token_only_loopback_names_are_answered(open_console: Console) -> None:
    async with aiohttp.ClientSession() as http:
        for host in ("127.0.0.1", "localhost", "localhost:1", "[::1]:8070"):
            async with http.get(open_console.url + "/", headers={"Host": host}) as resp:
                assert resp.status == 200, host
        for host in ("evil.example", "evil.example:8070", "127.0.0.1.evil.example", "", "[::2]"):
            async with http.get(open_console.url + "/", headers={"Host": host}) as resp:
                assert resp.status == 421, host


@pytest.mark.parametrize(
    ("env", "host", "line"),
    [
        ({"CONSOLE_HOST": "0.0.0.0"}, None, "CONSOLE_HOST: 0.0.0.0 is reachable from other machines"),
        ({}, "0.0.0.0", "--host: 0.0.0.0 is reachable from other machines"),
        ({}, "192.0.2.1", "--host: 192.0.2.1 is reachable"),
        ({"CONSOLE_TOKEN": "short"}, None, "CONSOLE_TOKEN: must be at least 16 characters"),
        ({"CONSOLE_PORT": "0"}, None, "CONSOLE_PORT:"),
    ],
)
def test_console_configuration_problems(env: dict[str, str], host: str | None, line: str) -> None:
    from cgb_worker.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_console_settings({"PHONE_HASH_KEY": PHONE_KEY, "REDIS_URL": "redis://127.0.0.1:1/0", **env}, host=host)
    assert any(p.startswith(line) for p in caught.value.problems), caught.value.problems


def test_with_a_token_any_address_is_allowed() -> None:
    settings = load_console_settings(
        {"PHONE_HASH_KEY": PHONE_KEY, "CONSOLE_TOKEN": TOKEN_VALUE, "CONSOLE_HOST": "0.0.0.0"}
    )
    assert settings.host == "0.0.0.0"
    assert settings.token is not None
    assert settings.token.get_secret_value() == TOKEN_VALUE
    assert TOKEN_VALUE not in repr(settings)


# -- CSRF --------------------------------------------------------------------------------------------------------


async def test_an_action_without_the_sessions_csrf_token_is_refused(open_console: Console) -> None:
    dead = DeadLetters(open_console.redis)
    await dead.add(job_id="d2", function="whatsapp_send", payload={"to": PHONE, "message": "m"},
                   error=InvalidJobError("bad"), attempts=1, enqueued_at=None)  # fmt: skip
    async with open_console.session() as http, open_console.session() as other:
        async with http.get(open_console.url + "/failures/d2/delete") as resp:
            csrf = _csrf(await resp.text())
        async with other.get(open_console.url + "/failures/d2/delete") as resp:
            others = _csrf(await resp.text())
        url = open_console.url + "/failures/d2/delete"
        for data in ({}, {"csrf": ""}, {"csrf": others}, {"csrf": csrf[:-1]}):
            async with http.post(url, data=data, allow_redirects=False) as resp:
                assert resp.status == 403, data
        async with aiohttp.ClientSession() as fresh, fresh.post(url, data={"csrf": csrf}) as resp:
            assert resp.status == 403  # the token without its session's cookie
        assert await dead.get("d2") is not None
        async with http.post(url, data={"csrf": csrf}, allow_redirects=False) as resp:
            assert resp.status == 303
        assert await dead.get("d2") is None


# -- the pages ---------------------------------------------------------------------------------------------------


async def test_the_overview_shows_the_queue_the_failures_and_the_receiver(open_console: Console) -> None:
    pool = open_console.redis
    for text in ("one", "two", "three"):
        await pool.enqueue_job("whatsapp_send", {"to": PHONE, "message": text})
    await pool.enqueue_job("whatsapp_send", {"to": PHONE, "message": "later"}, _defer_by=3600)
    dead = DeadLetters(pool)
    for i, error in enumerate([InvalidJobError("x"), InvalidJobError("y"), RuntimeError("z")]):
        await dead.add(job_id=f"f{i}", function="whatsapp_send", payload={"to": PHONE}, error=error, attempts=1,
                       enqueued_at=None)  # fmt: skip
    async with aiohttp.ClientSession() as http, http.get(open_console.url + "/") as resp:
        html = await resp.text()
    assert re.search(r'id="ready">3<', html)
    assert re.search(r'id="deferred">1<', html)
    assert re.search(r'id="running">0<', html)
    assert re.search(r'id="dead"><a href="/failures">3</a>', html)
    meaning = "The job payload can never be sent as it is; retrying will not help"
    assert f'InvalidJobError</a></td><td class="num">2</td><td>{meaning}<' in html
    assert 'RuntimeError</a></td><td class="num">1</td><td>not one of cgb-worker&#39;s errors' in html
    assert 'id="no-workers"' in html
    assert DIGITS not in html


async def test_a_jobs_page_after_a_real_send_shows_its_state_and_masked_payload(
    harness: Harness, open_console: Console
) -> None:
    [job] = await harness.enqueue({"to": PHONE, "message": "Your visa is approved"})
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{open_console.url}/jobs/{job.job_id}") as resp:
            queued = await resp.text()
        await harness.run()
        async with http.get(f"{open_console.url}/jobs/{job.job_id}") as resp:
            done = await resp.text()
        async with http.get(f"{open_console.url}/jobs/no-such-job") as resp:
            assert resp.status == 404
            assert "no-such-job: unknown: no queued, running or finished job" in await resp.text()
    assert re.search(rf'id="state" class="">{job.job_id}: queued, position 1, enqueued \d+ s ago<', queued)
    assert "&#34;message&#34;: &#34;Your visa is approved&#34;" in queued  # the payload, its number masked
    assert "&#34;to&#34;: &#34;+1********00&#34;" in queued
    assert re.search(rf'id="state" class="">{job.job_id}: succeeded \(try 1, finished ', done)
    for page in (queued, done):
        assert DIGITS not in page


async def test_replay_from_the_console_links_both_ways(open_console: Console) -> None:
    dead = DeadLetters(open_console.redis)
    await dead.add(job_id="gone1", function="whatsapp_send", payload={"to": PHONE, "message": "docs needed"},
                   error=RuntimeError("CGB was down"), attempts=5, enqueued_at=None)  # fmt: skip
    async with open_console.session() as http:
        async with http.get(open_console.url + "/failures?error=RuntimeError") as resp:
            listing = await resp.text()
        assert 'href="/failures/gone1/replay"' in listing
        async with http.get(open_console.url + "/failures/gone1/replay") as resp:
            confirm = await resp.text()
        assert "docs needed" in confirm
        assert DIGITS not in confirm
        async with http.post(open_console.url + "/failures/gone1/replay", data={"csrf": _csrf(confirm)}) as resp:
            new_page = await resp.text()
            new_id = str(resp.url).rsplit("/", 1)[1]
        assert new_id != "gone1"
        assert 'id="replay-of" href="/jobs/gone1"' in new_page
        assert await open_console.redis.zscore("arq:queue", new_id) is not None
        async with http.get(open_console.url + "/jobs/gone1") as resp:
            old_page = await resp.text()
        assert f'id="replayed-as" href="/jobs/{new_id}"' in old_page
        async with http.post(open_console.url + "/failures/gone1/replay", data={"csrf": _csrf(confirm)}) as resp:
            assert resp.status == 404  # replayed once only
    assert await dead.get("gone1") is None


async def test_find_by_job_id_and_hostile_ids(open_console: Console) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(open_console.url + "/find?job=abc123", allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/jobs/abc123"
        async with http.get(open_console.url + "/find", params={"job": "a?b#c d"}, allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/jobs/a%3Fb%23c%20d"  # the whole id, as one path segment
        for odd, where in (("a/b", "/jobs/a%2Fb"), ("a\x00b", "/jobs/a%00b"), ("..", "/job?id=.."),
                           ("x" * 1024, "/jobs/" + "x" * 1024)):  # fmt: skip
            async with http.get(open_console.url + "/find", params={"job": odd}, allow_redirects=False) as resp:
                assert resp.headers["Location"] == where, odd  # any id arq could hold: one path segment, quoted
        for bad in ("x" * 1025, "   "):
            async with http.get(open_console.url + "/find", params={"job": bad}, allow_redirects=False) as resp:
                assert resp.status == 400 if bad.strip() else 200, bad
        async with http.get(open_console.url + "/jobs/%3Cscript%3Ealert(1)%3C%2Fscript%3E") as resp:
            html = await resp.text()
            assert "<script>" not in html
            assert "&lt;script&gt;" in html


async def test_every_response_carries_the_security_headers(open_console: Console) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/failures", "/login", "/jobs/x"):
            async with http.get(open_console.url + path) as resp:
                assert resp.headers["X-Frame-Options"] == "DENY", path
                assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
                assert resp.headers["Cache-Control"] == "no-store"


async def test_console_command_refuses_a_public_address_without_a_token(harness: Harness) -> None:
    from .test_cli import cli

    code, out, err = await cli(harness, "console", "--host", "0.0.0.0")
    assert code == 2
    assert err.startswith("cgb-worker: the console cannot start:")
    assert "--host: 0.0.0.0 is reachable from other machines" in err
    assert len(err.splitlines()) == 2  # the headline and its one problem
    assert out == ""


def test_masking_keeps_arq_job_ids_whole_and_hides_numbers() -> None:
    from cgb_worker.console.app import _masked

    job_id = "13a614dd9f144908837336b6e035373e"  # holds a run of twelve digits
    text = f"{job_id}: failed: InvalidJobError: +1 202 555 0100 and 12025550100 are not on WhatsApp"
    shown = _masked(text)
    assert shown.startswith(job_id + ": failed: ")
    assert "555" not in shown
    assert DIGITS not in shown
    assert _masked("call 2025550100 now") == "call ********00 now"  # the last two digits, as the logs keep them


async def test_find_a_persons_jobs_by_number_without_the_number_anywhere(
    harness: Harness, open_console: Console
) -> None:
    other = "+972500000001"
    jobs = await harness.enqueue({"to": PHONE, "message": "one"}, {"to": other, "message": "two"})
    await harness.run()
    [latest] = await harness.enqueue({"to": PHONE, "message": "three"})  # tried later: listed first
    await harness.run()
    async with open_console.session() as http:
        async with http.get(open_console.url + "/find") as resp:
            csrf = _csrf(await resp.text())
        pages = {}
        for typed in ("+1 202 555 0100", "+1 (202) 555-0100", "12025550100x", "", "+972 50 000 0001"):
            async with http.post(open_console.url + "/find", data={"csrf": csrf, "phone": typed}) as resp:
                pages[typed] = (resp.status, await resp.text(), str(resp.url))
    status, html, url = pages["+1 202 555 0100"]
    assert status == 200
    assert url.endswith("/find")  # the number went in the body: no URL holds it
    listed = re.findall(r'<a href="/jobs/([0-9a-f]+)">', html)
    assert listed == [latest.job_id, jobs[0].job_id]  # newest first, the other person's job not there
    assert pages["+1 (202) 555-0100"][1].count('href="/jobs/') == 2  # any spelling of the same number
    assert pages["12025550100x"][0] == 400
    assert pages[""][0] == 400
    assert re.findall(r'<a href="/jobs/([0-9a-f]+)">', pages["+972 50 000 0001"][1]) == [jobs[1].job_id]
    for _status, page, page_url in pages.values():
        assert DIGITS not in page
        assert "2025550100" not in page_url
        assert "500000001" not in page


async def test_forget_removes_the_persons_job_index(harness: Harness, redis_client: Any) -> None:
    from cgb_worker import keys
    from cgb_worker.erasure import forget

    [job] = await harness.enqueue({"to": PHONE, "message": "one"})
    await harness.enqueue({"to": "+12025550199", "message": "someone else"})
    await harness.run()  # the worker writes its index entries when it stops, if not before
    index = keys.jobs_on(int(time.time() // 86400))
    members = await redis_client.zrange(index, 0, -1)
    mine = [m for m in members if m.startswith(keys.who(PHONE).encode() + b"|")]
    assert len(members) == 2
    assert len(mine) == 1
    assert mine[0].endswith(b"|" + job.job_id.encode())
    assert 7 * 24 * 3600 < await redis_client.ttl(index) <= 8 * 24 * 3600
    forgotten = await forget(redis_client, PHONE)
    assert forgotten.removed.get("job index") == 1
    assert await redis_client.zrange(index, 0, -1) == [m for m in members if m not in mine]  # the other stays
