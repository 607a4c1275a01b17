"""The receiver's public port against hostile clients: the real ``cgb-worker webhooks`` process, over real
sockets, with its own Redis (which one test freezes) and a file limit of 256.

Each test names what it sends and asserts the status code, the time it took, what was stored, and what the log
holds. Bounds in time here are the guarantee under test (a slow client must be cut off), with slack for a busy
machine; they are not speed measurements.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from cgb_worker.keys import INBOX, MALFORMED

from .conftest import free_port

SECRET = "public-port-test-secret"
CLI = str(Path(os.sys.executable).parent / "cgb-worker")  # type: ignore[attr-defined]
READ_TIMEOUT = 1.5
REDIS_TIMEOUT = 1.0
NOFILE = 256


class Stack:
    def __init__(self, redis_proc: subprocess.Popen[bytes], redis_url: str, proc: subprocess.Popen[bytes],
                 port: int, admin: int, log: Path) -> None:  # fmt: skip
        self.redis_proc, self.redis_url, self.proc = redis_proc, redis_url, proc
        self.port, self.admin, self.log = port, admin, log
        self.url = f"http://127.0.0.1:{port}/webhooks/whatsapp"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def metric(self, outcome: str) -> float:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.admin}/metrics") as resp:
            text = await resp.text()
        found = re.search(rf'cgb_webhook_requests_total{{outcome="{outcome}"}} ([\d.e+]+)', text)
        return float(found.group(1)) if found else 0.0

    async def inbox(self) -> int:
        client = redis.asyncio.Redis.from_url(self.redis_url)
        try:
            return int(await client.xlen(INBOX))
        finally:
            await client.aclose()

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    binary = shutil.which("redis-server")
    assert binary
    redis_port, port, admin = free_port(), free_port(), free_port()
    redis_proc = subprocess.Popen(
        [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    folder = Path(tempfile.mkdtemp())
    log = folder / "receiver.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_", "WEBHOOK_"))}
    env.update(
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        WABA_APP_SECRET=SECRET,
        PHONE_HASH_KEY="public-port-test-hash-key",
        WEBHOOK_PORT=str(port),
        WEBHOOK_ADMIN_PORT=str(admin),
        WEBHOOK_READ_TIMEOUT=str(READ_TIMEOUT),
        WEBHOOK_REDIS_TIMEOUT=str(REDIS_TIMEOUT),
        WEBHOOK_READ_MEMORY=str(16 * 1024 * 1024),
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

    with log.open("wb") as out:
        proc = subprocess.Popen(
            [CLI, "webhooks", "--host", "127.0.0.1"], env=env, stdout=out, stderr=out, preexec_fn=limit
        )
    stack = Stack(redis_proc, env["REDIS_URL"], proc, port, admin, log)
    deadline = time.monotonic() + 20
    while True:
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    try:
        yield stack
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        os.kill(redis_proc.pid, signal.SIGCONT)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def signed(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


async def exchange(port: int, head: bytes, body: bytes = b"", *, wait: float = 10.0) -> tuple[int | None, float]:
    """Send ``head`` and ``body`` as they are; the status code of the answer (None when the connection was
    closed without one) and the seconds it took."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), wait)
    except (ConnectionError, TimeoutError):
        line = b""
    finally:
        writer.close()
    took = time.monotonic() - started
    found = re.match(rb"HTTP/1\.[01] (\d{3})", line)
    return (int(found.group(1)) if found else None), took


def post_head(*headers: bytes, length: int | None = None) -> bytes:
    lines = [b"POST /webhooks/whatsapp HTTP/1.1", b"Host: receiver"]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join([*lines, *headers]) + b"\r\n\r\n"


BODY = json.dumps({"object": "whatsapp_business_account", "entry": []}).encode()
GOOD = signed(BODY).encode()


@pytest.mark.parametrize(
    "header",
    [
        b"X-Hub-Signature-256: sha256=" + "é".encode() * 32,
        b"X-Hub-Signature-256: sha256=\xff\xfe" + b"0" * 62,
        b"",
        b"X-Hub-Signature-256: " + GOOD + b"\r\nX-Hub-Signature-256: " + GOOD,
        b"X-Hub-Signature-256: " + GOOD[7:],
        b"X-Hub-Signature-256: sha256=" + b"a" * 63,
        b"X-Hub-Signature-256: sha1=" + b"a" * 40,
    ],
    ids=["non-ASCII", "invalid UTF-8", "missing", "duplicated", "no prefix", "63 hex digits", "sha1"],
)
async def test_a_bad_signature_header_is_401_before_the_body_is_read(stack: Stack, header: bytes) -> None:
    before = await stack.inbox()
    # A 3 MB body announced and never sent: only an answer before the body can come back in time.
    status, took = await exchange(stack.port, post_head(*([header] if header else []), length=3_000_000), wait=5)
    assert status == 401
    assert took < READ_TIMEOUT
    assert await stack.inbox() == before


async def test_a_signed_post_is_stored_and_answered_200(stack: Stack) -> None:
    before = await stack.metric("stored")
    status, _ = await exchange(stack.port, post_head(b"X-Hub-Signature-256: " + GOOD, length=len(BODY)), BODY)
    assert status == 200
    assert await stack.metric("stored") == before + 1


async def test_slow_headers_are_cut_off(stack: Stack) -> None:
    before = await stack.metric("slow_headers")
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    closed_after = None
    try:
        for byte in b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 0.25) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
    except ConnectionError:
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after is not None, "a client dripping its headers was never cut off"
    assert closed_after < READ_TIMEOUT + 1.5
    assert await stack.metric("slow_headers") == before + 1


async def test_a_slow_body_is_408(stack: Stack) -> None:
    head = post_head(b"X-Hub-Signature-256: " + GOOD, length=1000)
    status, took = await exchange(stack.port, head, b"x" * 10, wait=READ_TIMEOUT + 5)
    assert status == 408
    assert READ_TIMEOUT * 0.9 < took < READ_TIMEOUT + 2


async def test_a_client_gone_mid_body_is_counted_not_logged_with_a_traceback(stack: Stack) -> None:
    before = await stack.metric("client_gone")
    _reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(post_head(b"X-Hub-Signature-256: " + GOOD, length=100_000) + b"{" * 5000)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()

    async def counted() -> bool:
        return await stack.metric("client_gone") == before + 1

    await eventually(counted)
    assert "Traceback" not in stack.log_text()


@pytest.mark.parametrize("chunked", [False, True], ids=["Content-Length", "chunked"])
async def test_a_body_over_the_limit_is_413(stack: Stack, chunked: bool) -> None:
    size = 3 * 1024 * 1024 + 10
    if not chunked:
        status, took = await exchange(stack.port, post_head(b"X-Hub-Signature-256: " + GOOD, length=size), wait=5)
    else:
        head = post_head(b"X-Hub-Signature-256: " + GOOD, b"Transfer-Encoding: chunked")
        piece = b"a" * 65536
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(size // len(piece) + 1))
        status, took = await exchange(stack.port, head, chunks + b"0\r\n\r\n", wait=5)
    assert status == 413
    assert took < READ_TIMEOUT


@pytest.mark.parametrize(
    "body",
    [
        b'{"object": "whatsapp_business_account", "entry": [{"id": "\xff\xfe", "changes": []}]}',
        b'{"object": "whatsapp_business_account", "\xc3\x28": 1, "entry": []}',
        b'{"object": "whatsapp_business_account", "entry": [' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"]}",
        b"[" * 100_000,
        b"\x00\x01\x02 not json at all",
        json.dumps(
            {
                "object": "whatsapp_business_account",
                "entry": [
                    {
                        "changes": [
                            {
                                "field": "messages",
                                "value": {
                                    "statuses": [
                                        {
                                            "id": "wamid.X",
                                            "status": "sent",
                                            "timestamp": "²",
                                            "recipient_id": "12025550100",
                                        }
                                    ]
                                },
                            }
                        ]
                    }
                ],
            },
            ensure_ascii=False,
        ).encode(),
    ],
    ids=[
        "invalid UTF-8 in a value",
        "invalid UTF-8 in a key",
        "nesting 5,000 deep",
        "100,000 brackets",
        "binary",
        "a timestamp of ²",
    ],
)
async def test_any_signed_body_is_stored_answered_200_and_kept_as_malformed(stack: Stack, body: bytes) -> None:
    client = redis.asyncio.Redis.from_url(stack.redis_url)
    try:
        stored, malformed = await stack.metric("stored"), await client.xlen(MALFORMED)
        head = post_head(b"X-Hub-Signature-256: " + signed(body).encode(), length=len(body))
        status, _ = await exchange(stack.port, head, body)
        assert status == 200
        assert await stack.metric("stored") == stored + 1
        # stored raw; the processor reads it and keeps what it cannot use with the malformed ones

        async def processed() -> bool:
            return await stack.inbox() == 0

        await eventually(processed)
        # msgspec skips a key it does not need without decoding it: that body is an envelope with no entries
        kept = 0 if b'"\xc3\x28": 1' in body else 1
        assert await client.xlen(MALFORMED) == malformed + kept
    finally:
        await client.aclose()


async def test_unsigned_big_bodies_cost_bounded_memory_and_give_it_back(stack: Stack) -> None:
    wrong = b"X-Hub-Signature-256: sha256=" + b"0" * 64
    body = b"x" * (3 * 1024 * 1024 - 100)

    async def one() -> int | None:
        status, _ = await exchange(stack.port, post_head(wrong, length=len(body)), body, wait=30)
        return status

    await asyncio.gather(*(one() for _ in range(5)))  # the allocator's first growth, not counted
    baseline = stack.rss_kib()
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, stack.rss_kib())
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    statuses = await asyncio.gather(*(one() for _ in range(60)))
    watcher.cancel()
    await asyncio.sleep(0.5)
    after = stack.rss_kib()
    assert set(statuses) <= {401, 503}, statuses
    assert 401 in statuses
    # 60 bodies of 3 MiB at once would be 180 MiB, twice that joined; the read budget is 16 MiB, and each open
    # connection buffers up to about 400 KiB before aiohttp stops reading it (24 MiB for 60)
    assert peak - baseline < 64 * 1024, (baseline, peak)
    assert after - baseline < 24 * 1024, (baseline, after)


async def test_connections_beyond_the_cap_are_closed_and_a_signed_post_still_gets_through(stack: Stack) -> None:
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(NOFILE + 100):  # more than the file limit allows
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            except OSError:
                break
            held.append(writer)
        status, took = await exchange(stack.port, post_head(b"X-Hub-Signature-256: " + GOOD, length=len(BODY)), BODY)
        assert status == 200
        assert took < 2.0
        assert await stack.metric("evicted_connection") > 0
    finally:
        for writer in held:
            writer.close()
    assert "out of system resource" not in stack.log_text()


async def test_a_request_aiohttp_refuses_is_400_and_its_url_is_not_logged(stack: Stack) -> None:
    head = b"GET /webhooks/whatsapp?hub.verify_token=leaked-token-9 HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n"
    status, _ = await exchange(stack.port, head)
    assert status == 400
    status, _ = await exchange(stack.port, b"\x16\x03\x01 a TLS hello on a plain port\r\n\r\n")
    assert status in (400, None)
    await asyncio.sleep(0.2)
    assert "leaked-token-9" not in stack.log_text()
    assert await stack.metric("bad_request") >= 1


@pytest.mark.parametrize(
    "encoding",
    [b"gzip", b"deflate", b"br", b"identity\r\nContent-Encoding: gzip"],
    ids=["gzip", "deflate", "br", "two"],
)
async def test_a_compressed_body_is_415_not_a_500(stack: Stack, encoding: bytes) -> None:
    head = post_head(b"X-Hub-Signature-256: " + b"sha256=" + b"0" * 64, b"Content-Encoding: " + encoding, length=5)
    status, _ = await exchange(stack.port, head, b"abcde")
    assert status == 415
    assert "raised" not in stack.log_text()


async def test_a_broken_chunked_body_is_400(stack: Stack) -> None:
    head = post_head(b"X-Hub-Signature-256: " + GOOD, b"Transfer-Encoding: chunked")
    status, took = await exchange(stack.port, head, b"ZZ\r\nnot a chunk\r\n", wait=5)
    assert status == 400
    assert took < READ_TIMEOUT


async def test_slow_bodies_filling_the_cap_do_not_lock_out_a_signed_post(stack: Stack) -> None:
    cap = NOFILE - 64 - 128  # the file limit less the descriptors kept for Redis and the rest
    head = post_head(b"X-Hub-Signature-256: sha256=" + b"0" * 64, length=1000)
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(cap + 10):
            _, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(head + b"x")
            held.append(writer)
        await asyncio.sleep(1.3)  # each is now a body coming in slowly
        results = [await exchange(stack.port, post_head(b"X-Hub-Signature-256: " + GOOD, length=len(BODY)), BODY)
                   for _ in range(5)]  # fmt: skip
    finally:
        for writer in held:
            writer.close()
    assert [status for status, _ in results] == [200] * 5


async def test_bodies_announced_big_and_sent_slowly_do_not_spend_the_read_budget(stack: Stack) -> None:
    """Room is charged for bytes received: announcements adding up to the 16 MiB budget, each sending a byte, used
    to answer every signed POST 503 until their read timeout."""
    held: list[asyncio.StreamWriter] = []
    try:
        for size in [3 * 1024 * 1024] * 5 + [1024 * 1024]:
            _, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            writer.write(post_head(b"X-Hub-Signature-256: sha256=" + b"0" * 64, length=size) + b"x")
            held.append(writer)
        await asyncio.sleep(0.3)
        status, _ = await exchange(stack.port, post_head(b"X-Hub-Signature-256: " + GOOD, length=len(BODY)), BODY)
    finally:
        for writer in held:
            writer.close()
    assert status == 200


async def test_admin_endpoints_are_not_on_the_public_port(stack: Stack) -> None:
    for path in (b"/healthz", b"/metrics"):
        status, _ = await exchange(stack.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 404


async def test_a_frozen_redis_is_a_503_within_the_timeout_and_health_says_so(stack: Stack) -> None:
    head = post_head(b"X-Hub-Signature-256: " + GOOD, length=len(BODY))
    os.kill(stack.redis_proc.pid, signal.SIGSTOP)
    try:
        status, took = await exchange(stack.port, head, BODY, wait=REDIS_TIMEOUT + 10)
        assert status == 503
        assert took < REDIS_TIMEOUT + 1.0

        async def unhealthy() -> bool:
            health = f"http://127.0.0.1:{stack.admin}/healthz"
            async with aiohttp.ClientSession() as http, http.get(health, timeout=aiohttp.ClientTimeout(1)) as r:
                return r.status == 503

        frozen = time.monotonic()
        await eventually(unhealthy, within=REDIS_TIMEOUT + 3)
        assert time.monotonic() - frozen < REDIS_TIMEOUT + 3
    finally:
        os.kill(stack.redis_proc.pid, signal.SIGCONT)

    async def stored() -> bool:
        return (await exchange(stack.port, head, BODY))[0] == 200

    await eventually(stored, within=10)
    # the 503s while it was frozen: counted, and said in one line, not one each
    assert stack.log_text().count("could not store webhooks") <= 1


async def test_the_log_holds_no_traceback_and_a_line_per_burst_at_most(stack: Stack) -> None:
    text = stack.log_text()
    assert "Traceback" not in text
    assert SECRET not in text
    lines = text.splitlines()
    assert len(lines) < 60, text[-3000:]


async def eventually(check: Any, within: float = 6.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"not within {within} s"
        await asyncio.sleep(0.05)
