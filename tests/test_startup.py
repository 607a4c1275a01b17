"""Start-up checks (cgb_worker/preflight.py): every command, run as a real subprocess, under each failure, says
it in one final line naming the cause, never a traceback, and exits with the documented code.

The commands of one failure run at once (each mostly waits), against real redis-servers started here, a socket
that accepts and never answers, and the simulator.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from cgb_worker import keys
from cgb_worker.preflight import FORMAT_VERSION

from .conftest import PHONE_KEY, TOKEN, Sim, communicate, free_port

BIN = Path(sys.executable).parent
WAIT = "1.5"
"""REDIS_CONNECT_TIMEOUT in these tests: one "waiting" line (they come every 10 s), then the final one."""
MATRIX = pytest.mark.timeout(400)
"""For a test that runs every command at once: ten Python processes starting together on a shared machine."""

WORKERS = {
    "arq": [str(BIN / "arq"), "cgb_worker.WorkerSettings", "--burst"],
    "run": [str(BIN / "cgb-worker"), "run"],
}
CLI = {
    "status": ["status", "0123456789abcdef"],
    "dead-letters list": ["dead-letters", "list"],
    "send": ["send", "--to", "+12025550100", "--message", "hello"],
    "suppress list": ["suppress", "list"],
}
REDIS_COMMANDS = [*WORKERS, "webhooks", *CLI, "check"]


def _argv(name: str) -> list[str]:
    if name in WORKERS:
        return WORKERS[name]
    if name == "webhooks":
        return [str(BIN / "cgb-worker"), "webhooks", "--host", "127.0.0.1", "--port", str(free_port())]
    if name == "check":
        return [str(BIN / "cgb-worker"), "check"]
    return [str(BIN / "cgb-worker"), *CLI[name]]


def _env(redis_url: str, sim: Sim, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_", "WABA_"))}
    env.update(
        CGB_API_KEY=TOKEN,
        CGB_API_URL=sim.api_url,
        PHONE_HASH_KEY=PHONE_KEY,
        WABA_APP_SECRET="test-app-secret",
        WEBHOOK_ADMIN_PORT=str(free_port()),
        REDIS_URL=redis_url,
        REDIS_CONNECT_TIMEOUT=WAIT,
    )
    env.update(more)
    return env


async def run(name: str, env: dict[str, str]) -> tuple[int, list[str], list[str]]:
    """One command to its end: exit code, stdout lines, stderr lines."""
    proc = await asyncio.create_subprocess_exec(
        *_argv(name), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await communicate(proc, 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode().splitlines()


async def run_all(names: list[str], env: dict[str, str]) -> dict[str, tuple[int, list[str], list[str]]]:
    results = await asyncio.gather(*(run(name, env) for name in names))
    return dict(zip(names, results, strict=True))


def _told(name: str, out: list[str], err: list[str]) -> list[str]:
    """What a failed command said about its failure: the worker and receiver log on stderr; ``check`` reports on
    stdout as it goes and ends on stderr, which is what is counted for it."""
    lines = err if name == "check" else out + err
    assert not any("Traceback" in line for line in out + err), "\n".join(out + err)
    return lines


def assert_gave_up(results: dict[str, tuple[int, list[str], list[str]]], url: str, cause: str) -> None:
    """Each said at once that it waits for Redis at ``url`` (``cause``), then gave up with one line: exit 1."""
    for name, (code, out, err) in results.items():
        lines = _told(name, out, err)
        transcript = f"{name}: {lines}"
        assert code == 1, transcript
        assert len(lines) == 2, transcript
        assert f"waiting for Redis at {url}: {cause}" in lines[0], transcript
        assert f"Redis at {url} unreachable: {cause}" in lines[1], transcript
        assert "gave up after" in lines[1], transcript
        assert f"REDIS_CONNECT_TIMEOUT={WAIT}" in lines[1], transcript


def assert_refused(results: dict[str, tuple[int, list[str], list[str]]], code: int, *words: str) -> None:
    """Each stopped at once, in one line holding ``words``."""
    for name, (got, out, err) in results.items():
        lines = _told(name, out, err)
        transcript = f"{name}: {lines}"
        assert got == (1 if name == "check" else code), transcript  # check: 1, what it checked failed
        assert len(lines) == 1, transcript
        assert all(word in lines[0] for word in words), transcript


# -- servers ------------------------------------------------------------------------------------------------


class Server:
    """A redis-server of the test's own, with the given options."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="cgb-startup-redis-")
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, *self.options]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        password = self.options[self.options.index("--requirepass") + 1] if "--requirepass" in self.options else None
        client = redis.Redis(port=self.port, password=password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                assert self.proc.poll() is None, "redis-server exited"
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def server() -> Iterator[Any]:
    started: list[Server] = []

    def make(*options: str) -> Server:
        s = Server(*options)
        s.start()
        started.append(s)
        return s

    try:
        yield make
    finally:
        for s in started:
            s.stop()
            shutil.rmtree(s.dir, ignore_errors=True)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says a word: a host that times out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


# -- Redis unreachable ----------------------------------------------------------------------------------------


@MATRIX
async def test_redis_refused_is_awaited_out_loud_then_one_line(sim: Sim) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    results = await run_all(REDIS_COMMANDS, _env(url, sim))
    assert_gave_up(results, url, "connection refused")


@MATRIX
async def test_redis_that_never_answers_times_out(sim: Sim, silent_port: int) -> None:
    url = f"redis://127.0.0.1:{silent_port}/0"
    results = await run_all(REDIS_COMMANDS, _env(url, sim))
    assert_gave_up(results, url, "timed out")


@MATRIX
async def test_rediss_to_a_plain_port_is_named(sim: Sim, redis_url: str) -> None:
    url = redis_url.replace("redis://", "rediss://")
    results = await run_all(REDIS_COMMANDS, _env(url, sim))
    assert_gave_up(results, url, "timed out (rediss:// to a server that does not speak TLS")


async def test_the_waiting_is_said_again_every_ten_seconds(sim: Sim) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, out, err = await run("status", _env(url, sim, REDIS_CONNECT_TIMEOUT="10.5"))
    assert code == 1
    assert out == []
    assert len(err) == 3
    assert err[0].startswith(f"cgb-worker: waiting for Redis at {url}")
    assert err[1].startswith(err[0][:40])
    assert "connection refused (0 s of REDIS_CONNECT_TIMEOUT=10.5)" in err[0]
    assert "connection refused (10 s of REDIS_CONNECT_TIMEOUT=10.5)" in err[1]
    assert "gave up after 10 s" in err[2] or "gave up after 11 s" in err[2]


# -- Redis refuses -------------------------------------------------------------------------------------------


@MATRIX
async def test_a_wrong_redis_password_is_one_line_at_once(sim: Sim, server: Any) -> None:
    s = server("--requirepass", "right-password", "--save", "", "--appendonly", "no")
    url = f"redis://:wrong-password@127.0.0.1:{s.port}/0"
    results = await run_all(REDIS_COMMANDS, _env(url, sim))
    shown = f"redis://:********@127.0.0.1:{s.port}/0"
    assert_refused(results, 2, f"Redis at {shown} refused the credentials", "authentication failed")
    assert not any("wrong-password" in line for _, out, err in results.values() for line in out + err)
    # and none given where one is required
    results = await run_all(["arq", "status"], _env(s.url, sim))
    assert_refused(results, 2, f"Redis at {s.url} refused the credentials", "Authentication required")


@MATRIX
async def test_an_evicting_redis_is_refused_to_writers_and_warned_to_readers(sim: Sim, server: Any) -> None:
    s = server("--maxmemory-policy", "allkeys-lru", "--save", "", "--appendonly", "no")
    results = await run_all(["arq", "run", "webhooks"], _env(s.url, sim))
    assert_refused(results, 2, "maxmemory-policy allkeys-lru", "sent twice", "noeviction")
    code, out, err = await run("check", _env(s.url, sim))
    assert code == 1
    assert any(line.startswith("redis          FAILED:") and "allkeys-lru" in line for line in out)
    assert err == [f"cgb-worker: check failed: redis: Redis at {s.url} has maxmemory-policy allkeys-lru: it may evict "
                   "a send record, and the message is then sent twice; set it to noeviction"]  # fmt: skip
    code, out, err = await run("dead-letters list", _env(s.url, sim))
    assert (code, out) == (0, ["0 dead letter(s)"])
    assert len(err) == 1
    assert "warning: Redis at" in err[0]
    assert "allkeys-lru" in err[0]


@MATRIX
async def test_a_newer_data_format_is_refused_by_every_command(sim: Sim, redis_url: str, store: Any) -> None:
    await store.set(keys.FORMAT, FORMAT_VERSION + 1)
    results = await run_all(REDIS_COMMANDS, _env(redis_url, sim))
    assert_refused(results, 2, f"holds data format {FORMAT_VERSION + 1} ({keys.FORMAT})", "newer than the")
    assert await store.get(keys.FORMAT) == str(FORMAT_VERSION + 1).encode()  # left as the newer release wrote it
    assert await store.exists("arq:queue") == 0  # send enqueued nothing


async def test_a_missing_or_older_format_is_recorded_as_ours(sim: Sim, redis_url: str, store: Any) -> None:
    code, _, _ = await run("dead-letters list", _env(redis_url, sim))
    assert code == 0
    assert await store.get(keys.FORMAT) == str(FORMAT_VERSION).encode()
    await store.set(keys.FORMAT, FORMAT_VERSION - 1)
    code, _, _ = await run("suppress list", _env(redis_url, sim))
    assert code == 0
    assert await store.get(keys.FORMAT) == str(FORMAT_VERSION).encode()


async def test_a_format_key_that_is_no_format_number_is_left_as_found(sim: Sim, redis_url: str, store: Any) -> None:
    """``-1`` was overwritten by the first command that refused it, so the next one started on it in silence."""
    for bad in ("-1", "1.5", "garbage"):
        await store.set(keys.FORMAT, bad)
        for name in ("dead-letters list", "status"):
            code, _, err = await run(name, _env(redis_url, sim))
            assert code == 2, (bad, name, err)
            assert f"holds {keys.FORMAT} = {bad!r}, not a format number" in err[-1], (bad, name, err)
        assert await store.get(keys.FORMAT) == bad.encode()


# -- what starts, and what it warns about -----------------------------------------------------------------------


@MATRIX
async def test_the_receiver_warns_when_redis_persists_nothing(sim: Sim, redis_url: str, server: Any) -> None:
    """The tests' Redis runs with ``--save "" --appendonly no``; one with AOF on draws no warning."""
    for url, warned in ((redis_url, True), (server("--appendonly", "yes", "--save", "").url, False)):
        proc = await asyncio.create_subprocess_exec(
            *_argv("webhooks"), env=_env(url, sim), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        lines: list[str] = []
        try:
            while not any("webhook receiver (" in line for line in lines):
                line = await asyncio.wait_for(proc.stderr.readline(), 60)  # type: ignore[union-attr]
                assert line, lines
                lines.append(line.decode())
        finally:
            proc.send_signal(signal.SIGINT)
            await proc.wait()
        assert proc.returncode == 0
        said = [line for line in lines if "persists nothing" in line]
        assert len(said) == (1 if warned else 0), lines
        if warned:
            assert f"Redis at {url} persists nothing (no AOF, no RDB saves)" in said[0]


@MATRIX
async def test_a_refused_cgb_key_stops_the_worker_in_one_line(sim: Sim, redis_url: str, store: Any) -> None:
    env = _env(redis_url, sim, CGB_API_KEY="1000001.WrongWrongWrongWrongWrongWrong")
    results = await run_all(["arq", "run"], env)
    assert_refused(results, 2, f"CGB at {sim.api_url} refused CGB_API_KEY (401)")
    tried = sim.requests("account")
    assert len(tried) == 2
    assert not any("WrongWrong" in line for _, out, err in results.values() for line in out + err)
    code, out, err = await run("check", env)
    assert code == 1
    assert err == ["cgb-worker: check failed: cgb: CGBAuthError: " + out[-1].split("CGBAuthError: ", 1)[1]]


async def test_a_worker_says_it_waits_for_a_cgb_that_does_not_answer(
    sim: Sim, redis_url: str, store: Any, silent_port: int
) -> None:
    """CGB accepting and never answering: the key check says it waits (after 2 s), then starts with a warning."""
    env = _env(redis_url, sim, CGB_API_URL=f"http://127.0.0.1:{silent_port}/api", CGB_TIMEOUT="4s")
    code, _, err = await run("arq", env)
    assert code == 0, err
    waiting = [i for i, line in enumerate(err) if "waiting for CGB at" in line]
    warned = [i for i, line in enumerate(err) if "could not be checked" in line]
    assert len(waiting) == len(warned) == 1, err
    assert waiting[0] < warned[0]
    assert (
        f"waiting for CGB at http://127.0.0.1:{silent_port}/api to check CGB_API_KEY (at most 4 s)" in err[waiting[0]]
    )
    assert "CGBTimeoutError" in err[warned[0]], err


async def test_a_worker_starts_with_a_warning_when_cgb_is_away(sim: Sim, redis_url: str, store: Any) -> None:
    env = _env(redis_url, sim, CGB_API_URL=f"http://127.0.0.1:{free_port()}/api")
    code, out, err = await run("arq", env)  # --burst: the queue is empty, so it starts and ends
    assert code == 0, err
    assert not any("Traceback" in line for line in out + err)
    warned = [line for line in err if "could not be checked" in line]
    assert len(warned) == 1
    assert "starting anyway" in warned[0]
    assert "CGBConnectError" in warned[0]
    assert any("cgb-worker ready" in line for line in err)
    assert await store.get(keys.FORMAT) == str(FORMAT_VERSION).encode()


async def test_the_health_check_tries_redis_once_and_never_calls_cgb(sim: Sim, redis_url: str, store: Any) -> None:
    code, _, _ = await _exec([str(BIN / "arq"), "--check", "cgb_worker.WorkerSettings"], _env(redis_url, sim))
    assert code == 1  # no worker has written arq's health key
    assert sim.requests("account") == []
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _out, err = await _exec([str(BIN / "arq"), "--check", "cgb_worker.WorkerSettings"], _env(url, sim))
    assert code == 1
    assert len(err) == 1
    assert f"Redis at {url} unreachable: connection refused" in err[0]
    assert sim.requests("account") == []


async def _exec(argv: list[str], env: dict[str, str]) -> tuple[int, list[str], list[str]]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode().splitlines()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("REDIS_CONNECT_TIMEOUT", "soon"), ("REDIS_URL", "http://127.0.0.1:6379/0")],
)
@MATRIX
async def test_bad_configuration_is_named_by_every_command(sim: Sim, redis_url: str, variable: str, value: str) -> None:
    results = await run_all(REDIS_COMMANDS, _env(redis_url, sim, **{variable: value}))
    for name, (code, out, err) in results.items():
        transcript = f"{name}: {out + err}"
        assert code == 2, transcript
        assert not any("Traceback" in line for line in out + err), transcript
        assert any(variable in line for line in err), transcript
        assert not any("waiting for Redis" in line for line in err), transcript


# -- after start-up -------------------------------------------------------------------------------------------


async def _line_with(proc: Any, text: str, lines: list[str]) -> str:
    """The next line of ``proc``'s stderr that holds ``text``; every line read is kept in ``lines``."""
    while True:
        raw: bytes = await asyncio.wait_for(proc.stderr.readline(), 60)
        line = raw.decode()
        assert line, lines
        lines.append(line)
        if text in line:
            return line


async def test_a_running_worker_says_when_redis_goes_and_comes_back(sim: Sim, server: Any) -> None:
    s = server("--save", "", "--appendonly", "no")
    proc = await asyncio.create_subprocess_exec(
        *WORKERS["run"], env=_env(s.url, sim), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    lines: list[str] = []

    async def until(text: str) -> str:
        return await _line_with(proc, text, lines)

    try:
        await until("cgb-worker ready")
        s.stop()
        lost = await until("Redis at")
        assert f"Redis at {s.url} lost:" in lost
        assert "retrying" in lost
        s.start()
        back = await until("Redis is back")
        assert f"Redis is back at {s.url} after" in back
    finally:
        proc.send_signal(signal.SIGINT)
        await proc.wait()
    assert not any("Traceback" in line for line in lines)


ARQ_WITH_A_SHORT_WINDOW = """
import sys
from arq.cli import cli
from cgb_worker import connection
connection.REDIS_RETRY.window = 3.0  # the two minutes a running worker rides out, shortened for the test
sys.argv = ["arq", "cgb_worker.WorkerSettings"]
cli()
"""


async def test_a_worker_that_outlasts_the_outage_window_stops_in_one_line(sim: Sim, server: Any) -> None:
    """``arq cgb_worker.WorkerSettings`` (arq's own command) with Redis gone past the ride-out window: one line
    naming Redis and the cause, exit 1 for the supervisor to restart it; no traceback."""
    s = server("--save", "", "--appendonly", "no")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ARQ_WITH_A_SHORT_WINDOW,
        env=_env(s.url, sim), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []
    try:
        while not any("cgb-worker ready" in line for line in lines):
            raw: bytes = await asyncio.wait_for(proc.stdout.readline(), 60)  # type: ignore[union-attr]
            assert raw, lines
            lines.append(raw.decode())
        s.stop()
        rest, _ = await communicate(proc, 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines += rest.decode().splitlines(keepends=True)
    transcript = "".join(lines)
    assert proc.returncode == 1, transcript
    assert "Traceback" not in transcript
    assert lines[-1].rstrip().endswith("connection refused"), transcript
    assert f"cgb-worker stopped: Redis at {s.url} unreachable for " in lines[-1], transcript
    assert any(f"Redis at {s.url} lost: " in line and line.rstrip().endswith("; retrying") for line in lines)


async def test_a_running_receiver_says_when_redis_goes_and_comes_back(sim: Sim, server: Any) -> None:
    """The receiver's processor: the outage at once with the redacted URL and the cause, then every 10 s, and
    "Redis is back" when it is."""
    s = server("--save", "", "--appendonly", "no")
    proc = await asyncio.create_subprocess_exec(
        *_argv("webhooks"), env=_env(s.url, sim), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    lines: list[str] = []

    async def until(text: str) -> str:
        return await _line_with(proc, text, lines)

    try:
        await until("webhook receiver (answering and processing)")
        s.stop()
        lost = await until("webhook processor: Redis at")
        assert f"webhook processor: Redis at {s.url} failed (1 " in lost
        again = await until("webhook processor: Redis at")  # ten seconds later, still down
        assert "connection refused" in again, lines
        s.start()
        back = await until("Redis is back")
        assert f"webhook processor: Redis is back at {s.url} after" in back
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    assert not any("Traceback" in line for line in lines)


def test_a_refused_certificate_is_not_an_outage() -> None:
    """Waiting does not fix a certificate refused either way: wait_for_redis stops at once (exit 2) on these."""
    from cgb_worker.preflight import _certificate_refused

    required = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    wrapped = redis.exceptions.ConnectionError("Error 1 connecting to 127.0.0.1:6487.")
    wrapped.__cause__ = required
    assert _certificate_refused(wrapped)
    assert _certificate_refused(ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] unable to get"))
    assert not _certificate_refused(ConnectionRefusedError(111, "Connection refused"))
    assert not _certificate_refused(redis.exceptions.TimeoutError("Timeout connecting to server"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_worker_told_to_stop_during_an_outage_stops_at_once(sim: Sim, server: Any, sig: signal.Signals) -> None:
    """SIGTERM (or Ctrl-C) while Redis is away: arq's clean-up tries each Redis command once instead of riding
    out two minutes per command, so the worker leaves within the 60 s bound here (a supervisor's kill timeout
    is typically 30 s); it says why in one line, no traceback."""
    s = server("--save", "", "--appendonly", "no")
    proc = await asyncio.create_subprocess_exec(
        *WORKERS["run"], env=_env(s.url, sim), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    lines: list[str] = []
    try:
        await _line_with(proc, "cgb-worker ready", lines)
        s.stop()
        await _line_with(proc, f"Redis at {s.url} lost", lines)
        proc.send_signal(sig)
        _, rest = await communicate(proc, 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines += rest.decode().splitlines(keepends=True)
    transcript = "".join(lines)
    assert "Traceback" not in transcript
    assert proc.returncode == 1, transcript
    assert f"cgb-worker stopped: Redis at {s.url} unreachable" in lines[-1], transcript
