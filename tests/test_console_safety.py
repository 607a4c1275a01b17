"""Attacks on the operations console, each over real HTTP and a real Redis: numbers in any spelling and in ids,
a frozen Redis, an over-long request, redirects off the console, a cookie kept after signing out, odd host
names."""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from cgb_worker import create_pool, keys
from cgb_worker.console import app as app_module
from cgb_worker.console import auth as auth_module
from cgb_worker.console.app import _masked, create_console
from cgb_worker.console.auth import COOKIE, SESSION_TTL, ConsoleAuth
from cgb_worker.deadletters import DeadLetters
from cgb_worker.errors import InvalidJobError
from cgb_worker.settings import Secret

from .conftest import CONSOLE_TOKEN as TOKEN_VALUE
from .conftest import PHONE_KEY, Console, Harness, _serve, communicate, free_port, start_redis_server
from .test_console import _csrf, _sign_in

DIGITS = "2025550100"


def _shown(html: str) -> str:
    """A page without the find form's example number: what it shows of the data, its links and forms included
    (an id holding a number is sealed in them)."""
    html = re.sub(r'(?:name="(?:csrf|s)" value|[?&]s)=[^"&]*', "", html)  # opaque tokens: CSRF, sealed ids
    return re.sub(r'\splaceholder="[^"]*"', "", html)


def _runs(text: str) -> str:
    """Every digit of ``text`` in order, the separators between them dropped: a number spelled with any
    separators shows here whole."""
    return "".join(c for c in text if c.isdigit())


# -- numbers in any spelling (finding 2) -----------------------------------------------------------------------

SPELLINGS = [
    "+1 202 555 0101ext",
    "202_555_0101",
    "+1/202/555/0101",
    "+1\u00a0202\u00a0555\u00a00101",  # NBSP
    "+1\u2009202\u2009555\u20090101",  # thin space
    "+1\u3000202\u3000555\u30000101",  # ideographic space
    "+1\u202f202\u202f555\u202f0101",  # narrow NBSP
    "+1\u2013202\u2014555\u20120101",  # en, em and figure dashes
    "+1\u2212202\u2212555\u22120101",  # minus sign
    "+1.202.555.0101",
    "+1 (202) 555-0101",
    "(202)555-0101x",
    "x2025550101",
    "tel:+12025550101;ext",
    "202\u200b555\u200b0101",  # zero-width space
    "202\t555\n0101",
    "2 0 2 5 5 5 0 1 0 1",
    "202 - 555 - 0101",
    "202*555*0101",
    "\u0662\u0660\u0662\u0665\u0665\u0665\u0660\u0661\u0660\u0661",  # Arabic-Indic digits
    "\uff12\uff10\uff12\uff15\uff15\uff15\uff10\uff11\uff10\uff11",  # fullwidth digits
    "20255\u00b9\u00b2\u00b3",  # superscripts
    "+972 50 000 0001x",
    "+972-50-000-0001",
    "12345",
    # letters without case that display as a blank or a dot between digit groups (the re-attack's finding 8)
    "972\u3164501\u3164234\u3164567",  # Hangul filler
    "972\ua78f501\ua78f234\ua78f567",  # Latin letter sinological dot
    "972\u318d501\u318d234\u318d567",  # Hangul letter araea
    "972\u01c0501\u01c0234\u01c0567",  # Latin letter dental click
    "972\u1427501\u1427234\u1427567",  # Canadian syllabics final middle dot
    "972\u05d0501\u05d0234",  # a Hebrew letter between the groups
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_number_in_any_spelling_is_masked_but_its_last_two_digits(spelling: str) -> None:
    shown = _masked(f"could not send to {spelling} today")
    digits = _runs(shown)
    assert len(digits) == 2, shown  # only the last two digits of the number are left
    assert shown.startswith("could not send to "), shown
    assert shown.endswith(" today"), shown


@pytest.mark.parametrize(
    "spelling",
    [
        "+1\\u00a0202\\u00a0555\\u00a00101",  # as tojson writes a NBSP
        "+1\\xa0202\\xa0555\\xa00101",  # as repr() writes one
        "202\\n555\\n0101",  # a newline inside a JSON string
        "\\u0662\\u0660\\u0662\\u0665\\u0665\\u0665\\u0660\\u0661\\u0660\\u0661",  # Arabic-Indic, escaped
        "202\\u003c555\\u003e0101",  # tojson's escaped < and >
        '202\\"555\\"0101',
    ],
)
def test_a_number_spelled_with_escape_sequences_is_masked(spelling: str) -> None:
    shown = _masked(spelling)
    assert "555" not in shown, shown
    assert "202" not in shown, shown
    assert "\\u0665" not in shown, shown


def test_a_payload_shown_as_json_has_no_number_in_any_spelling() -> None:
    from jinja2 import Environment

    env = Environment(autoescape=True)
    env.filters["masked"] = _masked
    payload = {"to": "+1********00", "message": "call me on +1\u00a0202\u00a0555\u00a00101 or 202\n555\n0101",
               "alt": ["202", "555", "0101"], "n": 12025550101}  # fmt: skip
    shown = env.from_string("{{ p|tojson(indent=2)|masked }}").render(p=payload)
    assert "555" not in shown
    assert "+1********00" in shown  # a masked number stays as it was


@pytest.mark.parametrize(
    "value",
    [
        "1" * 32,  # 32 hex digits, none a letter
        "12025550100000000000000000000000",
        "0" * 31 + "1",
        "2025550100" * 3 + "01",
    ],
)
def test_an_all_digit_32_hex_string_is_no_job_id(value: str) -> None:
    shown = _masked(f"job {value}: failed")
    assert len(_runs(shown)) == 2, shown


def test_arq_job_ids_are_kept_whole_and_only_they() -> None:
    for _ in range(200):
        job_id = uuid.uuid4().hex
        assert _masked(f"{job_id}: failed, replayed as {job_id}") == f"{job_id}: failed, replayed as {job_id}"
    real = "13a614dd9f144908837336b6e035373e"  # holds a run of twelve digits
    for not_an_id in (
        "x" + real,  # part of a longer word
        real + "0",
        real.upper(),
        real[:12] + "1" + real[13:],  # not a uuid4: version digit 1
        real[:16] + "c" + real[17:],  # not a uuid4: variant digit c
    ):
        assert "144908837336" not in _masked(not_an_id), not_an_id
    assert _masked(f"ids {real}, {real}.") == f"ids {real}, {real}."
    # next to a kept id, a number is still masked
    assert _runs(_masked(f"{real} 202 555 0101")) == _runs(real) + "01"


def test_the_consoles_own_timestamps_are_kept_and_nothing_like_them() -> None:
    line = "deferred until 2025-06-01 12:00:00 UTC (in 3 min), enqueued 12 s ago"
    assert _masked(line) == line
    for near in ("2025-06-01 12:00:00", "2025-13-01 12:00:00 UTC", "2025-06-01 25:00:00 UTC", "2025-06-01 12:00"):
        assert len(_runs(_masked(near))) == 2, near


def test_short_numbers_and_text_are_left_alone() -> None:
    for text in ("HTTP 429, try 3 of 5", "abc123", "code 1234", "v1.2.3", "none"):
        assert _masked(text) == text


# -- ids and error classes are user-controlled (finding 3) -------------------------------------------------------


class E12025550100(Exception):
    pass


async def test_a_job_id_holding_a_number_is_masked_on_every_page(harness: Harness, open_console: Console) -> None:
    [job] = await harness.enqueue({"to": "+12025550100", "message": "hi"}, _job_id="12025550100")
    assert job is not None
    await harness.run()  # sent: in the person's index, found by the number
    dead = DeadLetters(open_console.redis)
    await dead.add(job_id="+1 202 555 0100", function="whatsapp_send", payload={"to": "+12025550100"},
                   error=E12025550100("x"), attempts=1, enqueued_at=None)  # fmt: skip
    await dead.add(job_id="12025550100", function="whatsapp_send", payload={"to": "+12025550100"},
                   error=InvalidJobError("bad"), attempts=1, enqueued_at=None)  # fmt: skip
    pages: dict[str, str] = {}
    async with open_console.session() as http:
        for path in (
            "/jobs/12025550100",
            "/jobs/%2B1%20202%20555%200100",
            "/failures",
            "/failures?error=E12025550100",
            "/failures?error=%2B12025550100",
            "/failures?error=%2B1%C2%A0202%C2%A0555%C2%A00100",
            "/failures/12025550100/replay",
            "/failures/%2B1%20202%20555%200100/delete",
            "/",
        ):
            async with http.get(open_console.url + path) as resp:
                assert resp.status in (200, 404), path
                pages[path] = await resp.text()
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', pages["/"])
        assert csrf is not None
        async with http.post(open_console.url + "/find", data={"csrf": csrf.group(1), "phone": "+12025550100"}) as resp:
            pages["find"] = await resp.text()
    for path, page in pages.items():
        shown = _shown(page)
        assert "202 555" not in shown, (path, shown)
        assert "5550100" not in _runs(shown), (path, shown)
    job_page = pages["/jobs/12025550100"]
    assert re.search(r"<title>Job \*{9}00 ", job_page), job_page
    assert "<h1>Job <code>*********00</code></h1>" in job_page
    # the links still lead to the job: their targets carry the id sealed, and following them opens it
    sealed_links = re.findall(r'href="(/job\?s=[^"]+)">\*{9}00</a>', pages["find"])
    assert len(sealed_links) == 1
    async with open_console.session() as http:
        async with http.get(open_console.url + html.unescape(sealed_links[0])) as resp:
            assert "<h1>Job <code>*********00</code></h1>" in await resp.text()
        async with http.get(open_console.url + "/job?s=not-a-sealed-id") as resp:
            assert resp.status == 404
    assert 'href="/failures/replay?s=' in pages["/failures"]
    assert "?error=E12025550100" not in pages["/"]  # a class name holding a number is shown, not linked
    assert 'action="/failures/replay?s=' in pages["/failures/12025550100/replay"]


# -- a frozen Redis (finding 1) ------------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of the test's own, on its own port, that the test may freeze (SIGSTOP)."""
    workdir = tempfile.mkdtemp(prefix="cgb-test-frozen-redis-")
    proc, url = start_redis_server(workdir)
    try:
        yield url, proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)  # a stopped process does not act on SIGTERM until it runs again
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("token", [None, TOKEN_VALUE], ids=["open", "signed in"])
async def test_a_frozen_redis_is_a_503_within_the_bound_not_a_hung_page(
    own_redis: tuple[str, subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    url, proc = own_redis
    monkeypatch.setattr(app_module, "PAGE_TIMEOUT", 0.5)
    monkeypatch.setattr(auth_module, "FAILED_SIGN_IN_DELAY", 0.0)
    monkeypatch.setattr(app_module, "FAILED_SIGN_IN_DELAY", 0.0)
    pool = await create_pool(url, ride_out_outages=False)  # as `cgb-worker console` connects
    runner = web.AppRunner(create_console(pool, ConsoleAuth(Secret(token) if token else None, pool)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    paths = ["/", "/failures", "/failures?error=X", "/jobs/abc", "/failures/abc/replay"]
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            if token is not None:  # a signed-in cookie is checked in Redis (not signed out) before the page
                await _sign_in(Console(base, pool), http)
            async with http.get(base + "/") as resp:
                assert resp.status == 200
                csrf = _csrf(await resp.text())
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                for attempt in range(2):  # the second time over connections the first left behind
                    for path in paths:
                        started = time.monotonic()
                        async with http.get(base + path, timeout=aiohttp.ClientTimeout(total=15)) as resp:
                            assert resp.status == 503, (attempt, path)
                            assert await resp.text() == "Redis did not answer in 0.5 s\n"
                            assert resp.headers["Cache-Control"] == "no-store"
                            assert resp.headers["X-Frame-Options"] == "DENY"
                        assert time.monotonic() - started < 2.5, (attempt, path)
                    for action in ("/find", "/failures/abc/delete"):
                        data = {"csrf": csrf, "phone": "+12025550100"}
                        async with http.post(base + action, data=data, timeout=aiohttp.ClientTimeout(total=15)) as resp:
                            assert resp.status == 503, action
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            for path in paths[:2]:  # Redis back: the pages are again
                async with http.get(base + path, timeout=aiohttp.ClientTimeout(total=15)) as resp:
                    assert resp.status == 200, path
    finally:
        await runner.cleanup()
        await pool.aclose()


# -- redirects off the console (finding 5) -------------------------------------------------------------------------

OFF_THE_CONSOLE = [
    # control characters and whitespace, which browsers drop or read as a separator
    *(f"/{c}/evil.example" for c in "\t\n\r \x00\x01\x0b\x0c\x1b\x1f\x7f"),
    *(f"{c}//evil.example" for c in "\t\n\r \x00"),
    "/\t\t/evil.example",
    "/\u00a0/evil.example",
    "/\u3000/evil.example",
    "/\u2028/evil.example",
    "/\ufeff/evil.example",
    "/\u200b/evil.example",
    "/\uff0f/evil.example",  # fullwidth solidus
    "/\u2215/evil.example",  # division slash
    # backslashes, which browsers read as slashes
    "/\\evil.example",
    "\\/evil.example",
    "/\\/evil.example",
    "\\\\evil.example",
    # scheme-relative and absolute
    "//evil.example",
    "///evil.example",
    "////evil.example/",
    "https://evil.example/",
    "http:evil.example",
    "https:/\\evil.example",
    "javascript:alert(1)",
    "data:text/html,x",
    "evil.example",
    # percent-encoded: decoded once by a proxy or a server, they become the above
    "/%2F/evil.example",
    "/%2f/evil.example",
    "/%2F%2Fevil.example",
    "%2F%2Fevil.example",
    "/%09/evil.example",
    "/%0a/evil.example",
    "/%0D/evil.example",
    "/%00/evil.example",
    "/%20/evil.example",
    "/%5C/evil.example",
    "/%5cevil.example",
    "/%252F/evil.example",  # twice encoded
    "/%25252F/evil.example",
    "/%E3%80%80/evil.example",  # an ideographic space, UTF-8
    "/%C2%A0/evil.example",
    "/%EF%BC%8F/evil.example",  # a fullwidth solidus, UTF-8
    "/%E2%80%8B/evil.example",  # a zero-width space
    "/%EF%BC%BCevil.example",  # a fullwidth backslash
    # dot segments, which a browser resolves before sending
    "/.//evil.example",
    "/./evil.example",
    "/../evil.example",
    "/%2e//evil.example",
    "/%2E%2E//evil.example",
    "",
    "/" + "a" * 5000,
]
ON_THE_CONSOLE = ["/", "/failures", "/jobs/abc", "/failures?error=RuntimeError&page=2", "/jobs/a%2Fb", "/login?next=/"]


async def _login_page_next(console: Console, http: aiohttp.ClientSession, target: str) -> tuple[str, str]:
    """GET /login?next=<target>: the form's csrf and the ``next`` it carries back."""
    async with http.get(console.url + "/login", params={"next": target}) as resp:
        page = await resp.text()
    carried = re.search(r'name="next" value="([^"]*)"', page)
    assert carried is not None
    return _csrf(page), html.unescape(carried.group(1))


@pytest.mark.parametrize("target", OFF_THE_CONSOLE)
@pytest.mark.parametrize("posted", ["as forged", "as the form carries it"])
async def test_signing_in_never_leaves_the_console(guarded: Console, target: str, posted: str) -> None:
    async with guarded.session() as http:
        csrf, carried = await _login_page_next(guarded, http, target)
        assert carried == "/"  # GET /login?next=: the form carries the console's root
        data = {"csrf": csrf, "token": TOKEN_VALUE, "next": target if posted == "as forged" else carried}
        async with http.post(guarded.url + "/login", data=data, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/"


@pytest.mark.parametrize("target", OFF_THE_CONSOLE)
async def test_an_open_console_never_sends_you_off_it_either(open_console: Console, target: str) -> None:
    async with open_console.session() as http:
        csrf, carried = await _login_page_next(open_console, http, target)
        assert carried == "/"
        async with http.post(
            open_console.url + "/login", data={"csrf": csrf, "next": target}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/", repr(target)


@pytest.mark.parametrize("target", ON_THE_CONSOLE)
async def test_signing_in_still_leads_back_to_a_console_page(guarded: Console, target: str) -> None:
    async with guarded.session() as http:
        csrf, carried = await _login_page_next(guarded, http, target)
        assert carried == target
        data = {"csrf": csrf, "token": TOKEN_VALUE, "next": carried}
        async with http.post(guarded.url + "/login", data=data, allow_redirects=False) as resp:
            assert resp.headers["Location"] == target


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("//evil.example", "/login?next=/"),
        ("//evil.example/x", "/login?next=/"),
        ("/%2F/evil.example", "/login?next=/"),
        ("/%09/evil.example", "/login?next=/"),
        ("/%5C/evil.example", "/login?next=/"),
        ("/%252F/evil.example", "/login?next=/"),
        ("/jobs/abc", "/login?next=/jobs/abc"),
        ("/failures?error=A&page=2", "/login?next=/failures?error%3DA%26page%3D2"),
    ],
)
async def test_the_way_to_sign_in_carries_only_a_console_page(guarded: Console, path: str, location: str) -> None:
    async with guarded.session() as http:
        async with http.get(URL(guarded.url + path, encoded=True), allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == location
        if location != "/login?next=/":  # followed, the form carries the page back whole
            async with http.get(URL(guarded.url + location, encoded=True)) as resp:
                found = re.search(r'name="next" value="([^"]*)"', await resp.text())
            assert found is not None
            assert html.unescape(found.group(1)) == path


# -- host names (finding 7) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1", 200),
        ("127.0.0.1:8070", 200),
        ("localhost", 200),
        ("LOCALHOST", 200),
        ("LocalHost:8070", 200),
        ("localhost.", 200),
        ("localhost.:8070", 200),
        ("127.0.0.1.", 200),
        ("[::1]", 200),
        ("[::1]:8070", 200),
        ("[0:0:0:0:0:0:0:1]:8070", 200),
        ("[localhost]evil", 421),
        ("[localhost]", 421),
        ("[localhost]:8070", 421),
        ("[::1]evil.example", 421),
        ("[::1]:8070evil", 421),
        ("[::1]:", 421),
        ("[::1", 421),
        ("::1", 421),  # an IPv6 address in Host goes in brackets
        ("localhost..", 421),
        ("localhost:", 421),
        ("localhost:80:80", 421),
        ("localhost:http", 421),
        ("localhost:123456", 421),
        ("localhost evil.example", 421),
        ("evil.example@localhost", 421),
        ("localhost.evil.example", 421),
        ("localhost\\", 421),
        ("127.0.0.2", 421),
        ("[::2]", 421),
        ("[::ffff:127.0.0.1]", 421),
        ("", 421),
    ],
)
async def test_without_a_token_the_host_header_must_name_loopback_and_be_well_formed(
    open_console: Console, host: str, status: int
) -> None:
    async with aiohttp.ClientSession() as http, http.get(open_console.url + "/", headers={"Host": host}) as resp:
        assert resp.status == status, host


@pytest.mark.parametrize(
    ("given", "bound"),
    [("[::1]", "::1"), ("::1", "::1"), ("LOCALHOST", "LOCALHOST"), ("localhost.", "localhost."), (" [::1] ", "::1")],
)
@pytest.mark.parametrize("where", ["--host", "CONSOLE_HOST"])
def test_a_loopback_host_in_any_spelling_is_accepted_and_bindable(given: str, bound: str, where: str) -> None:
    from cgb_worker.settings import load_console_settings

    env = {"PHONE_HASH_KEY": PHONE_KEY, "REDIS_URL": "redis://127.0.0.1:1/0"}
    host, environ = (given, env) if where == "--host" else (None, {**env, "CONSOLE_HOST": given})
    assert load_console_settings(environ, host=host).host == bound


@pytest.mark.parametrize(
    ("given", "line"),
    [
        ("[localhost]", "{}: '[localhost]' is not a host name or an address"),
        ("[::1", "{}: '[::1' is not a host name or an address"),
        ("]::1[", "{}: ']::1[' is not a host name or an address"),
        ("[[::1]]", "{}: '[[::1]]' is not a host name or an address"),
        ("[::1]:8070", "{}: '[::1]:8070' is not a host name or an address"),
        ("localhost..", "{}: localhost.. is reachable from other machines"),
        ("[::2]", "{}: ::2 is reachable from other machines"),
    ],
)
@pytest.mark.parametrize("where", ["--host", "CONSOLE_HOST"])
def test_a_malformed_or_public_host_is_one_clear_line(given: str, line: str, where: str) -> None:
    from cgb_worker.errors import ConfigError
    from cgb_worker.settings import load_console_settings

    env = {"PHONE_HASH_KEY": PHONE_KEY, "REDIS_URL": "redis://127.0.0.1:1/0"}
    host, environ = (given, env) if where == "--host" else (None, {**env, "CONSOLE_HOST": given})
    with pytest.raises(ConfigError) as caught:
        load_console_settings(environ, host=host)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(line.format(where)), caught.value.problems


async def test_the_console_serves_on_a_bracketed_ipv6_loopback(harness: Harness, worker_env: dict[str, str]) -> None:
    port = free_port()
    env = {**worker_env, "CONSOLE_PORT": str(port), "LOG_LEVEL": "INFO"}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "cgb-worker"), "console", "--host", "[::1]",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert f"console on http://[::1]:{port}/ (no token: this machine only)" in line, line
        async with aiohttp.ClientSession() as http, http.get(f"http://[::1]:{port}/") as resp:
            assert resp.status == 200
    finally:
        if proc.returncode is None:
            proc.terminate()
        await communicate(proc, 10)


# -- signing out (finding 6) ---------------------------------------------------------------------------------------


async def _sign_out(console: Console, http: aiohttp.ClientSession) -> None:
    async with http.get(console.url + "/") as resp:
        csrf = _csrf(await resp.text())
    async with http.post(console.url + "/logout", data={"csrf": csrf}, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/login"


async def _with_cookie(url: str, cookie: str) -> int:
    async with (
        aiohttp.ClientSession() as bare,
        bare.get(url + "/", headers={"Cookie": f"{COOKIE}={cookie}"}, allow_redirects=False) as resp,
    ):
        return resp.status


async def test_a_cookie_copied_before_signing_out_is_refused_after_it(
    guarded: Console, redis_url: str, redis_client: Any
) -> None:
    async with guarded.session() as http, guarded.session() as colleague:
        await _sign_in(guarded, http)
        await _sign_in(guarded, colleague)
        copied = http.cookie_jar.filter_cookies(URL(guarded.url))[COOKIE].value
        assert await _with_cookie(guarded.url, copied) == 200
        await _sign_out(guarded, http)
        assert await _with_cookie(guarded.url, copied) == 303  # to sign in
        async with colleague.get(guarded.url + "/", allow_redirects=False) as resp:
            assert resp.status == 200  # another browser's session is not ended
        # the same token in a new console process (a restart, or a second console): still refused
        async for restarted in _serve(redis_url, TOKEN_VALUE):
            assert await _with_cookie(restarted.url, copied) == 303
        # and an action with the copied cookie and its CSRF token is refused too
        session = ConsoleAuth(Secret(TOKEN_VALUE), guarded.redis).open(copied)
        assert session is not None
        csrf = ConsoleAuth(Secret(TOKEN_VALUE), guarded.redis).csrf(session)
        async with (
            aiohttp.ClientSession() as bare,
            bare.post(guarded.url + "/failures/x/delete", data={"csrf": csrf},
                      headers={"Cookie": f"{COOKIE}={copied}"}, allow_redirects=False) as resp,
        ):  # fmt: skip
            assert resp.status in (401, 403)
    # what Redis keeps: one small key per signed-out session, named by a keyed digest, gone when it would be
    found = [key async for key in redis_client.scan_iter(match="cgb:console:*")]
    assert len(found) == 1, found
    assert session.nonce.encode() not in found[0]
    assert 0 < await redis_client.ttl(found[0]) <= SESSION_TTL


# -- an over-long request (finding 4) ------------------------------------------------------------------------------


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize(("level", "log_json"), [("INFO", "false"), ("INFO", "true"), ("DEBUG", "false")])
async def test_a_malformed_request_logs_one_line_without_its_bytes(
    harness: Harness, worker_env: dict[str, str], level: str, log_json: str
) -> None:
    port = free_port()
    env = {**worker_env, "CONSOLE_PORT": str(port), "LOG_LEVEL": level, "LOG_JSON": log_json}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "cgb-worker"), "console",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    number, spaced = "+1(202)555-0100", "+1 (202) 555-0100"
    bad = [
        b"GET /?to=" + number.encode() + b"x" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # request line
        b"GET /?to=" + spaced.encode() + b"x" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-To: " + spaced.encode() + b"y" * 9000 + b"\r\n\r\n",  # a header
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-To" + number.encode() + b"\r\n\r\n",  # no colon
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + number.encode() + b"\r\n\r\n",
        b"GET /" + number.encode() + b"\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        number.encode() + b" / HTTP/1.1\r\n\r\n",  # as the first request on its connection (a method)
        b"GET / HTTP/1.1\r\n\r\n" + number.encode() + b" / HTTP/1.1\r\n\r\n",  # a method, not the first request
    ]
    try:
        assert proc.stdout is not None
        line = ""
        while "console on" not in line:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "the console stopped"
        for request in bad:
            answer = await _raw(port, request)
            assert re.match(rb"HTTP/1\.[01] (400|200) ", answer), answer[:200]
            assert b"Traceback" not in answer
    finally:
        if proc.returncode is None:
            proc.terminate()
        out, _ = await communicate(proc, 10)
    text = out.decode()
    lines = [line for line in text.splitlines() if line.strip()]
    for shown in ("(202)", "555-0100", "5550100", "xxxxxxxxxx", "yyyyyyyyyy", "X-To", "\\x00"):
        assert shown not in text, (shown, text[-3000:])
    assert "Traceback" not in text
    if level == "INFO":
        about = [line for line in lines if "malformed" in line or "Error handling request" in line]
        assert len(about) == len(bad) - 1, lines  # one line each, but a first request's bad method (DEBUG)
        assert len(lines) == len(about) + 1, lines  # those and "console stopped" after the start line


def test_any_other_server_error_keeps_its_traceback_masked() -> None:
    import logging

    from cgb_worker.console.serve import _QuietServerLog

    try:
        raise ValueError("no job for +1 (202) 555-0100")
    except ValueError as exc:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                   ("127.0.0.1",), (type(exc), exc, exc.__traceback__))  # fmt: skip
    assert _QuietServerLog().filter(record)
    text = record.getMessage()
    assert text.startswith("Error handling request from 127.0.0.1\nTraceback (most recent call last):")
    assert "ValueError: no job for +* (***) ***-**00" in text
    assert record.exc_info is None


# -- a replay cut short loses nothing (the re-attack's finding 1) ---------------------------------------------------


async def test_a_replay_cut_short_by_a_frozen_redis_loses_no_dead_letter(
    own_redis: tuple[str, subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, proc = own_redis
    monkeypatch.setattr(app_module, "PAGE_TIMEOUT", 0.5)
    pool = await create_pool(url, ride_out_outages=False)
    dead = DeadLetters(pool)
    await dead.add(job_id="lost-0", function="whatsapp_send", payload={"to": "+12025550100", "message": "x"},
                   error=RuntimeError("CGB was down"), attempts=5, enqueued_at=None)  # fmt: skip
    runner = web.AppRunner(create_console(pool, ConsoleAuth(Secret(TOKEN_VALUE), pool)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    bearer = {"Authorization": f"Bearer {TOKEN_VALUE}"}
    action = f"http://127.0.0.1:{port}/failures/lost-0/replay"
    try:
        async with aiohttp.ClientSession() as http:
            os.kill(proc.pid, signal.SIGSTOP)  # frozen as the replay's first script is on its way
            try:
                async with http.post(action, headers=bearer, timeout=aiohttp.ClientTimeout(total=15)) as resp:
                    assert resp.status == 503
            finally:
                os.kill(proc.pid, signal.SIGCONT)  # Redis runs what it was sent, after the console gave up
            await asyncio.sleep(0.2)
            assert await dead.get("lost-0") is not None  # still there: a 503 never consumed the entry
            reserved: Any = await pool.hget(keys.DEAD_REPLAYING, "lost-0")  # type: ignore[misc]
            async with http.post(action, headers=bearer, allow_redirects=False) as resp:
                assert resp.status == 303
                new_id = resp.headers["Location"].rsplit("/", 1)[1]
        assert reserved is None or reserved.decode() == new_id  # the id the cut-short replay chose, if it did
        assert await dead.get("lost-0") is None
        assert await pool.zrange("arq:queue", 0, -1) == [new_id.encode()]  # one job
        assert (await pool.get(keys.replay_of(new_id))) == b"lost-0"
    finally:
        await runner.cleanup()
        await pool.aclose()


@pytest.mark.parametrize("cut", ["after reserving", "after enqueueing"])
async def test_the_next_replay_finishes_one_cut_short_under_the_same_id(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    pool = await create_pool(redis_url)
    dead = DeadLetters(pool)
    await dead.add(job_id="cut-0", function="whatsapp_send", payload={"to": "+12025550100", "message": "x"},
                   error=RuntimeError("down"), attempts=5, enqueued_at=None)  # fmt: skip

    class Died(Exception):
        pass

    real_enqueue = pool.enqueue_job

    async def dies_before(*args: Any, **kwargs: Any) -> Any:
        raise Died

    async def dies_after(*args: Any, **kwargs: Any) -> Any:
        await real_enqueue(*args, **kwargs)
        raise Died

    try:
        if cut == "after reserving":
            monkeypatch.setattr(pool, "enqueue_job", dies_before)
        else:
            monkeypatch.setattr(pool, "enqueue_job", dies_after)
        with pytest.raises(Died):
            await dead.replay(pool, "cut-0")
        monkeypatch.setattr(pool, "enqueue_job", real_enqueue)
        assert await dead.get("cut-0") is not None  # listed still, its replay under way
        chosen: Any = await pool.hget(keys.DEAD_REPLAYING, "cut-0")  # type: ignore[misc]
        new_id = await dead.replay(pool, "cut-0")
        assert new_id is not None
        assert new_id == chosen.decode()
        assert await pool.zrange("arq:queue", 0, -1) == [new_id.encode()]  # enqueued once, whichever way
        assert await dead.get("cut-0") is None
        assert await pool.hget(keys.DEAD_REPLAYING, "cut-0") is None  # type: ignore[misc]
        assert await dead.replay(pool, "cut-0") is None  # nothing left to replay
    finally:
        await pool.aclose()


async def test_a_dead_letter_whose_id_holds_a_number_is_replayed_and_deleted_through_sealed_links(
    open_console: Console,
) -> None:
    dead = DeadLetters(open_console.redis)
    for job_id in ("12025550100", "+1 202 555 0199"):
        await dead.add(job_id=job_id, function="whatsapp_send", payload={"to": "+12025550100", "message": "x"},
                       error=InvalidJobError("bad"), attempts=1, enqueued_at=None)  # fmt: skip
    async with open_console.session() as http:
        async with http.get(open_console.url + "/failures") as resp:
            page = await resp.text()
        assert "2025550100" not in page
        assert "2025550199" not in page
        csrf = _csrf(page)
        replay, delete = (html.unescape(h) for h in re.findall(r'<a href="([^"]+)">(?:Replay|Delete)</a>', page)[:2])
        async with http.get(open_console.url + replay) as resp:
            confirm = await resp.text()
        assert "2025550" not in confirm
        action = _post_target(confirm)
        hidden = re.findall(r'<input type="hidden" name="(job|s)" value="([^"]*)">', confirm)
        fields = [("csrf", csrf)] + [(n, html.unescape(v)) for n, v in hidden]
        assert [n for n, _v in fields] == ["csrf", "s"]  # the id goes back sealed
        async with http.post(open_console.url + action, data=fields, allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/failures?replayed=1&gone=0"
        async with http.get(open_console.url + delete) as resp:
            assert resp.status == 404  # the same entry, replayed a moment ago
        # the other one, deleted through its own sealed links
        async with http.get(open_console.url + "/failures") as resp:
            page = await resp.text()
        delete = html.unescape(re.findall(r'<a href="([^"]+)">Delete</a>', page)[0])
        async with http.get(open_console.url + delete) as resp:
            confirm = await resp.text()
        action = _post_target(confirm)
        async with http.post(open_console.url + action, data={"csrf": csrf}, allow_redirects=False) as resp:
            assert resp.status == 303
    assert await dead.count() == 0
    assert await open_console.redis.zcard("arq:queue") == 1


def _post_target(page: str) -> str:
    """Where a confirmation page's form posts."""
    found = re.search(r'<form method="post" action="(/failures/[^"]+)">', page)
    assert found, page
    return html.unescape(found.group(1))


# -- the third attack on the replay ----------------------------------------------------------------------------


async def test_a_replay_that_races_a_delete_reports_the_job_it_enqueued(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = await create_pool(redis_url)
    dead = DeadLetters(pool)
    await dead.add(job_id="race-1", function="whatsapp_send", payload={"to": "+12025550100", "message": "x"},
                   error=RuntimeError("down"), attempts=5, enqueued_at=None)  # fmt: skip
    real_enqueue = pool.enqueue_job

    async def deleted_first(*args: Any, **kwargs: Any) -> Any:
        assert await dead.remove("race-1")  # an operator deletes it as the replay enqueues
        return await real_enqueue(*args, **kwargs)

    try:
        monkeypatch.setattr(pool, "enqueue_job", deleted_first)
        new_id = await dead.replay(pool, "race-1")
        assert new_id is not None  # the job it made is reported, with its links
        assert await pool.zrange("arq:queue", 0, -1) == [new_id.encode()]
        assert await pool.get(keys.replayed_as("race-1")) == new_id.encode()
        assert await dead.get("race-1") is None
    finally:
        await pool.aclose()


async def test_a_dead_letter_added_again_under_an_id_is_replayed_with_its_own_payload(redis_url: str) -> None:
    pool = await create_pool(redis_url)
    dead = DeadLetters(pool)
    try:
        await dead.add(job_id="again-1", function="whatsapp_send", payload={"to": "+12025550100", "message": "old"},
                       error=RuntimeError("down"), attempts=5, enqueued_at=None)  # fmt: skip
        # a replay of it cut short, its job enqueued
        await pool.hset(keys.DEAD_REPLAYING, "again-1", "stale-new-id-0001")  # type: ignore[misc]
        await pool.enqueue_job("whatsapp_send", {"to": "+12025550100", "message": "old"}, _job_id="stale-new-id-0001")
        await dead.add(job_id="again-1", function="whatsapp_send", payload={"to": "+12025550100", "message": "new"},
                       error=RuntimeError("down"), attempts=5, enqueued_at=None)  # fmt: skip
        new_id = await dead.replay(pool, "again-1")
        assert new_id is not None
        assert new_id != "stale-new-id-0001"
        from arq.jobs import Job

        info = await Job(new_id, pool, _deserializer=pool.job_deserializer).info()
        assert info is not None
        assert info.args[0]["message"] == "new"
    finally:
        await pool.aclose()


async def test_a_dead_letter_whose_payload_cannot_be_read_is_left_and_said(open_console: Console) -> None:
    from cgb_worker.deadletters import PAYLOADS

    redis = open_console.redis
    dead = DeadLetters(redis)
    for job_id in ("unreadable-1", "fine-1"):
        await dead.add(job_id=job_id, function="whatsapp_send", payload={"to": "+12025550100", "message": "x"},
                       error=RuntimeError("down"), attempts=5, enqueued_at=None)  # fmt: skip
    await redis.hset(PAYLOADS, "unreadable-1", b"\xc1")
    async with open_console.session() as http:
        async with http.get(open_console.url + "/failures") as resp:
            csrf = _csrf(await resp.text())
        async with http.post(open_console.url + "/failures/unreadable-1/replay", data={"csrf": csrf},
                             allow_redirects=False) as resp:  # fmt: skip
            assert resp.status == 409
            assert "payload cannot be read" in await resp.text()
        assert await redis.hget(keys.DEAD_REPLAYING, "unreadable-1") is None  # nothing reserved
        form = [("csrf", csrf), ("job", "unreadable-1"), ("job", "fine-1")]
        async with http.post(open_console.url + "/failures/replay", data=form, allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/failures?replayed=1&gone=0&unreadable=1"
        async with http.get(open_console.url + "/failures?replayed=1&gone=0&unreadable=1") as resp:
            assert "1 left as they are: their payload cannot be read" in await resp.text()
    assert await dead.get("unreadable-1") is not None
    assert await dead.get("fine-1") is None


async def test_a_token_sealed_for_something_else_opens_no_job(open_console: Console) -> None:
    from cgb_worker import sealed

    other = sealed.seal(b"12025550100").decode()  # as a send record's kept payload is sealed, same key
    async with open_console.session() as http, http.get(open_console.url + "/job?s=" + other) as resp:
        assert resp.status == 404


def test_a_number_in_mathematical_digits_escaped_as_surrogate_pairs_is_masked() -> None:
    import json

    shown = _masked(json.dumps({"message": "call \U0001d7d0\U0001d7ce\U0001d7d0 \U0001d7d3\U0001d7d3\U0001d7d3 "
                                           "\U0001d7ce\U0001d7cf\U0001d7ce\U0001d7ce"}))  # fmt: skip
    assert shown.count("\\ud835") == 2  # the last two digits only
    assert shown.startswith('{"message": "call *** *** **')
