"""The configuration as the real processes meet it: .env.sample as shipped starts the worker and the receiver, the
warnings reach their logs, and a busy port is one line naming its variable (exit 2, no traceback)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cgb_worker.settings import PREFIXES

from .conftest import PHONE_KEY, TOKEN, Harness, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKER = [str(BIN / "arq"), "cgb_worker.WorkerSettings"]  # the image's command
RUN = [str(BIN / "cgb-worker"), "run"]
RECEIVER = [str(BIN / "cgb-worker"), "webhooks"]
WORKER_READY, RECEIVER_READY = "cgb-worker ready", "webhook receiver ("


def env_sample() -> dict[str, str]:
    """.env.sample as compose's ``env_file`` reads it: every KEY=VALUE line, an empty value kept as empty."""
    values: dict[str, str] = {}
    for line in (ROOT / ".env.sample").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value
    return values


def clean_env(**values: str) -> dict[str, str]:
    """The test process's environment without any of ours, and ``values``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}, **values}


class Started:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def until(self, marker: str, within: float = 60) -> bool:
        """Read stderr until a line holds ``marker`` (True) or the process closes it (False)."""
        assert self.proc.stderr is not None

        async def read() -> bool:
            assert self.proc.stderr is not None
            while line := await self.proc.stderr.readline():
                self.lines.append(line.decode().rstrip("\n"))
                if marker in self.lines[-1]:
                    return True
            return False

        return await asyncio.wait_for(read(), within)

    async def finish(self) -> int:
        """What is left of stderr, and the exit code."""
        assert self.proc.stderr is not None
        rest = await asyncio.wait_for(self.proc.stderr.read(), 60)
        self.lines += rest.decode().splitlines()
        return await asyncio.wait_for(self.proc.wait(), 60)


Start = Callable[[list[str], dict[str, str]], Awaitable[Started]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    started: list[Started] = []

    async def go(command: list[str], env: dict[str, str]) -> Started:
        proc = await asyncio.create_subprocess_exec(
            *command, env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        started.append(Started(proc))
        return started[-1]

    yield go
    for one in started:
        if one.proc.returncode is None:
            one.proc.terminate()
            await one.finish()


@contextmanager
def busy(host: str = "0.0.0.0") -> Iterator[int]:  # where the metrics server binds
    """A port another process holds: bound and listening."""
    with socket.socket() as holder:
        holder.bind((host, 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def sample_env(harness: Harness, **more: str) -> dict[str, str]:
    """.env.sample as shipped, its secrets filled in, pointed at the test Redis and the simulator; the receiver's two
    ports moved to free ones (the shipped 8090 and 9090 may be taken on a shared machine)."""
    secrets = {"CGB_API_KEY": TOKEN, "PHONE_HASH_KEY": PHONE_KEY, "WABA_APP_SECRET": "app-secret-for-tests"}
    here = {"REDIS_URL": harness.redis_url, "CGB_API_URL": harness.sim.api_url}
    ports = {"WEBHOOK_PORT": str(free_port()), "WEBHOOK_ADMIN_PORT": str(free_port())}
    return clean_env(**{**env_sample(), **secrets, **here, **ports, **more})


async def test_env_sample_as_shipped_with_only_the_secrets_starts_the_worker_and_the_receiver(
    harness: Harness, start: Start
) -> None:
    sample = env_sample()
    assert {"METRICS_PORT", "CGB_DEFAULT_REGION", "QUIET_HOURS", "WA_TEMPLATES_FILE"} <= {
        name for name, value in sample.items() if value == ""
    }  # it ships empty values, which compose passes on as empty strings
    env = sample_env(harness)
    worker = await start(WORKER, env)
    receiver = await start(RECEIVER, env)
    assert await worker.until(WORKER_READY), "\n".join(worker.lines)
    assert await receiver.until(RECEIVER_READY), "\n".join(receiver.lines)
    for process in (worker, receiver):
        assert not [line for line in process.lines if "not a setting" in line or "ERROR" in line], process.lines
    assert f"CGB at {harness.sim.api_url}" in worker.lines[-1]


async def test_warnings_reach_the_worker_s_and_the_receiver_s_log_once_and_they_start(
    harness: Harness, start: Start
) -> None:
    env = sample_env(harness, CGB_RATE_LIMT="5", WEBHOOK_PROT="8091", CGB_TIMEOUT="9")
    worker = await start(WORKER, env)
    receiver = await start(RECEIVER, env)
    assert await worker.until(WORKER_READY), "\n".join(worker.lines)
    assert await receiver.until(RECEIVER_READY), "\n".join(receiver.lines)
    for process, expected in (
        (
            worker,
            [
                "CGB_RATE_LIMT is not a setting; did you mean CGB_RATE_LIMIT?",
                "WEBHOOK_PROT is not a setting; did you mean WEBHOOK_PORT?",
                "CGB_TIMEOUT=9 is 9 ms; write 9s for seconds.",
            ],
        ),
        (
            receiver,
            [
                "CGB_RATE_LIMT is not a setting; did you mean CGB_RATE_LIMIT?",
                "WEBHOOK_PROT is not a setting; did you mean WEBHOOK_PORT?",
            ],
        ),
    ):
        warned = [line.split(" WARNING ", 1)[1].strip() for line in process.lines if " WARNING " in line]
        assert [w for w in warned if w in expected] == expected, process.lines
        assert not any("8091" in line for line in process.lines)  # names, never values


async def test_warnings_in_json_logs_are_json_lines(harness: Harness, start: Start) -> None:
    import json

    worker = await start(WORKER, sample_env(harness, LOG_JSON="true", CGB_RATE_LIMT="5"))
    assert await worker.until(WORKER_READY), "\n".join(worker.lines)
    records = [json.loads(line) for line in worker.lines]
    assert {"level": "WARNING", "message": "CGB_RATE_LIMT is not a setting; did you mean CGB_RATE_LIMIT?"}.items() <= (
        next(r for r in records if "CGB_RATE_LIMT" in r["message"]).items()
    )


def _one_line_exit_2(process: Started, code: int, expected: str) -> None:
    assert code == 2, process.lines
    assert not any("Traceback" in line for line in process.lines), process.lines
    naming = [line for line in process.lines if expected in line]
    assert len(naming) == 1, process.lines
    assert [line for line in process.lines if "ERROR" in line or "cannot" in line] == naming, process.lines


@pytest.mark.parametrize("command", [WORKER, RUN], ids=["arq", "cgb-worker run"])
async def test_a_busy_metrics_port_is_one_line_naming_it(harness: Harness, start: Start, command: list[str]) -> None:
    with busy() as port:
        worker = await start(command, sample_env(harness, METRICS_PORT=str(port)))
        code = await worker.finish()
    _one_line_exit_2(worker, code, f"cgb-worker cannot start: METRICS_PORT {port} is in use (0.0.0.0:{port}: ")
    assert not any(WORKER_READY in line for line in worker.lines)


@pytest.mark.parametrize("variable", ["WEBHOOK_PORT", "WEBHOOK_ADMIN_PORT"])
async def test_a_busy_receiver_port_is_one_line_naming_it(harness: Harness, start: Start, variable: str) -> None:
    with busy("127.0.0.1") as port:
        env = sample_env(harness, WEBHOOK_HOST="127.0.0.1", WEBHOOK_ADMIN_HOST="127.0.0.1", **{variable: str(port)})
        receiver = await start(RECEIVER, env)
        code = await receiver.finish()
    _one_line_exit_2(
        receiver, code, f"the webhook receiver cannot start: {variable} {port} is in use (127.0.0.1:{port}: "
    )


async def test_a_busy_receiver_port_given_on_the_command_line_names_the_option(harness: Harness, start: Start) -> None:
    with busy("127.0.0.1") as port:
        env = sample_env(harness, WEBHOOK_ADMIN_HOST="127.0.0.1")
        receiver = await start([*RECEIVER, "--host", "127.0.0.1", "--port", str(port)], env)
        code = await receiver.finish()
    _one_line_exit_2(receiver, code, f"cannot start: --port {port} is in use")


@pytest.mark.parametrize(
    "command",
    [[str(BIN / "cgb-worker"), "simulator"], [sys.executable, "-m", "cgb_worker.simulator"]],
    ids=["cgb-worker simulator", "python -m cgb_worker.simulator"],
)
async def test_a_busy_simulator_port_is_one_line(start: Start, command: list[str]) -> None:
    with busy("127.0.0.1") as port:
        simulator = await start([*command, "--port", str(port)], clean_env())
        code = await simulator.finish()
    assert code == 2
    assert simulator.lines == [
        f"cgb-simulator: --port {port} is in use (127.0.0.1:{port}: another process listens there)"
    ]


async def test_the_simulator_says_where_it_listens_once_it_does(start: Start) -> None:
    port = free_port()
    simulator = await start([str(BIN / "cgb-worker"), "simulator", "--port", str(port)], clean_env())
    assert await simulator.until("CGB simulator on")
    assert simulator.lines == [f"CGB simulator on http://127.0.0.1:{port}/api (token 'sim-token'); Ctrl-C stops it"]
