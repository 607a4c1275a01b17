"""``make container-test``: the image ``make image`` built, run for real with podman (or docker).

Each container shares the host's network, so it reaches the tests' throwaway Redis and the CGB simulator
(served from this test process) on 127.0.0.1, and the tests reach what it serves. Run after ``make test`` by
``.ci/run``; not part of ``make test`` (``tests/`` is its test path).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import PHONE_KEY, TOKEN, Sim, free_port, redis_client, redis_url, sim  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
A = "+972500000001"

if shutil.which("podman"):
    # as container/image.sh runs it: runc (crun refuses hybrid cgroups), and ulimits within the hard limits
    ENGINE = ["podman", "--runtime", "runc"]
    LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    IMAGE = os.environ.get("CGB_IMAGE", "localhost/cgb-worker:latest")
else:
    ENGINE, LIMITS = ["docker"], []
    IMAGE = os.environ.get("CGB_IMAGE", "cgb-worker:latest")


async def engine(*args: str, within: float = 120) -> tuple[int, str, str]:
    """Run the container engine without blocking the event loop the simulator is served from."""
    proc = await asyncio.create_subprocess_exec(
        *ENGINE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Containers:
    def __init__(self) -> None:
        self.names: list[str] = []

    async def start(self, env: dict[str, str], *command: str) -> str:
        name = f"cgb-test-{uuid.uuid4().hex[:10]}"
        flags = [f"--env={k}={v}" for k, v in env.items()]
        code, _, err = await engine("run", "-d", "--name", name, "--network", "host", *LIMITS, *flags, IMAGE, *command)
        assert code == 0, err
        self.names.append(name)
        return name

    async def logs(self, name: str) -> str:
        _, out, err = await engine("logs", name)
        return out + err


@pytest.fixture
async def containers() -> AsyncIterator[Containers]:
    made = Containers()
    try:
        yield made
    finally:
        for name in made.names:
            await engine("rm", "-f", "-t", "0", name)


def worker_env(redis_url: str, sim: Sim, **extra: str) -> dict[str, str]:
    return {
        "CGB_API_KEY": TOKEN,
        "PHONE_HASH_KEY": PHONE_KEY,
        "CGB_API_URL": sim.api_url,
        "REDIS_URL": redis_url,
        "WORKER_HEALTH_CHECK_INTERVAL": "1",
        **extra,
    }


async def until(check: Any, within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {within} s"
        await asyncio.sleep(0.1)


async def ready(containers: Containers, name: str) -> bool:
    return "cgb-worker ready" in await containers.logs(name)


async def pool(redis_url: str) -> Any:
    from cgb_worker import create_pool

    return await create_pool(redis_url)


async def test_the_image_sends_a_text_as_a_non_root_user(
    redis_url: str, redis_client: Any, sim: Sim, containers: Containers
) -> None:
    await known(sim, A)
    name = await containers.start(worker_env(redis_url, sim))
    await until(lambda: ready(containers, name))
    producer = await pool(redis_url)
    try:
        job = await producer.enqueue_job("whatsapp_send", {"to": A, "message": "Your visa is approved."})
        result = await job.result(timeout=30)
    finally:
        await producer.aclose()
    assert (result["success"], result["kind"], result["to"]) == (True, "text", A)
    [sent] = [r for r in sim.requests() if r["endpoint"] == "send_text"]
    assert sent["path"] == f"/api/contacts/{A.lstrip('+')}/send/text"
    assert sent["body"]["text"] == "Your visa is approved."
    code, out, _ = await engine("exec", name, "cat", "/proc/1/status")
    assert code == 0
    uids = next(line for line in out.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {"10001"}  # the worker itself, PID 1, real and effective
    code, out, _ = await engine("exec", name, "cat", "/proc/1/cmdline")
    assert out.split("\0")[:3] == ["/app/.venv/bin/python", "/app/.venv/bin/arq", "cgb_worker.WorkerSettings"]


async def test_the_healthcheck_checks_its_own_worker_not_any_worker_on_the_redis(
    redis_url: str, redis_client: Any, sim: Sim, containers: Containers
) -> None:
    """Two worker containers on one Redis and on the host's network (so one host name): the HEALTHCHECK of
    each answers for its own worker. Frozen (SIGSTOP), a worker's check fails while the other's, and ``arq
    --check``, still pass; thawed, it passes again; stopped, its heartbeat is gone."""
    code, out, _ = await engine("image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE)
    check = json.loads(out)
    assert check["Test"] == ["CMD", "cgb-worker", "health"]  # kept: the Docker format
    env = worker_env(redis_url, sim)
    frozen, other = await containers.start(env), await containers.start(env)
    for name in (frozen, other):
        await until(lambda name=name: ready(containers, name))

    async def runs(name: str, *command: str) -> tuple[int, str]:
        code, out, err = await engine("exec", name, *command)
        return code, out + err

    async def healthcheck_passes(name: str) -> bool:
        code, _, _ = await engine("healthcheck", "run", name)
        return code == 0

    for name in (frozen, other):
        await until(lambda name=name: healthcheck_passes(name))
    code, out = await runs(frozen, *check["Test"][1:])
    assert code == 0, out
    assert out.startswith("healthy: worker pid 1, 0 running, polled ")  # its own worker: PID 1 in its namespace

    _, pid, _ = await engine("inspect", "--format", "{{.State.Pid}}", frozen)
    os.kill(int(pid), signal.SIGSTOP)  # the worker stops refreshing its heartbeat and polling, without exiting
    try:

        async def fails() -> str | None:
            code, out = await runs(frozen, *check["Test"][1:])
            return out if code == 1 else None

        out = await until(fails)
        assert out.startswith("cgb-worker: unhealthy: ")
        assert len(out.splitlines()) == 1
        code, out = await runs(other, *check["Test"][1:])
        assert code == 0, out
        code, out = await runs(other, "arq", "--check", "cgb_worker.WorkerSettings")
        assert code == 0, out  # arq's one shared key: alive while any worker is
    finally:
        os.kill(int(pid), signal.SIGCONT)
    await until(lambda: healthcheck_passes(frozen))

    code, _, err = await engine("stop", "-t", "30", frozen)
    assert code == 0, err
    from cgb_worker.heartbeat import live_workers

    assert [s.beat.pid for s in await live_workers(redis_client)] == [1]  # the other's; the stopped one's is removed
    code, out = await runs(other, "cgb-worker", "workers")
    assert code == 0, out
    assert out.splitlines()[0] == "1 worker(s)"


async def test_sigterm_lets_an_in_flight_send_finish_and_nothing_is_sent_twice(
    redis_url: str, redis_client: Any, sim: Sim, containers: Containers
) -> None:
    await known(sim, A)
    sim.configure(latency=3.0)
    name = await containers.start(worker_env(redis_url, sim, LOG_JSON="true"))
    await until(lambda: ready(containers, name))
    producer = await pool(redis_url)
    try:
        job = await producer.enqueue_job("whatsapp_send", {"to": A, "message": "in flight"})

        async def arrived() -> bool:
            return any(r["endpoint"] == "send_text" for r in sim.requests())

        await until(arrived)  # the request is at CGB, which answers in 3 s
        stopping = time.monotonic()
        code, _, err = await engine("stop", "-t", "30", name)  # SIGTERM, then 30 s before SIGKILL
        stopped_in = time.monotonic() - stopping
        assert code == 0, err
        result = await job.result(timeout=5)
    finally:
        await producer.aclose()
    assert result["success"] is True
    assert 1.0 < stopped_in < 20  # it waited for the send (about 3 s), well inside WORKER_JOB_COMPLETION_WAIT
    assert [r["endpoint"] for r in sim.requests() if r["endpoint"].startswith("send")] == ["send_text"]
    assert len(sim.state.outbox) == 1
    code, out, _ = await engine("inspect", "--format", "{{.State.ExitCode}}", name)
    assert out.strip() == "0"
    # LOG_JSON=true: every line the container wrote, arq's own start-up lines included, is one JSON object
    lines = [line for line in (await containers.logs(name)).splitlines() if line.strip()]
    assert len(lines) >= 4
    events = [json.loads(line) for line in lines]
    assert any(e.get("event") == "job" and e.get("outcome") == "sent" for e in events)
    assert A.lstrip("+") not in "\n".join(lines)


async def test_the_simulator_and_the_webhook_receiver_run_from_the_image(
    redis_url: str, redis_client: Any, containers: Containers
) -> None:
    sim_port, hook_port, admin_port = free_port(), free_port(), free_port()
    await containers.start({}, "python", "-m", "cgb_worker.simulator", "--host", "127.0.0.1", "--port", str(sim_port))
    secret = "container-test-secret"
    await containers.start(
        {"REDIS_URL": redis_url, "WABA_APP_SECRET": secret, "PHONE_HASH_KEY": PHONE_KEY,
         "WEBHOOK_ADMIN_PORT": str(admin_port)},
        "cgb-worker", "webhooks", "--host", "127.0.0.1", "--port", str(hook_port),
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:

        async def answers(url: str, **kwargs: Any) -> int:
            try:
                async with http.get(url, **kwargs) as resp:
                    return resp.status
            except aiohttp.ClientConnectionError:
                return 0

        me = f"http://127.0.0.1:{sim_port}/api/accounts/me"
        assert await until(lambda: answers(me, headers={"X-ACCESS-TOKEN": "sim-token"})) == 200
        assert await until(lambda: answers(f"http://127.0.0.1:{admin_port}/healthz")) == 200
        body = b'{"object": "whatsapp_business_account", "entry": []}'
        sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        url = f"http://127.0.0.1:{hook_port}/webhooks/whatsapp"
        async with http.post(url, data=body, headers={"X-Hub-Signature-256": sig}) as resp:
            assert resp.status == 200
        async with http.post(url, data=body, headers={"X-Hub-Signature-256": "sha256=0"}) as resp:
            assert resp.status == 401
    assert await redis_client.xlen("cgb:webhooks:inbox") + await redis_client.xlen("cgb:webhooks:malformed") == 0
    assert await redis_client.exists("cgb:webhooks:since")  # the signed post was taken in


@pytest.mark.parametrize(
    ("command", "env", "missing"),
    [
        ((), {"REDIS_URL": "redis://127.0.0.1:6379/0"}, ["CGB_API_KEY", "PHONE_HASH_KEY"]),
        (
            ("cgb-worker", "webhooks"),
            {"PHONE_HASH_KEY": "", "WABA_APP_SECRET": ""},
            ["WABA_APP_SECRET", "PHONE_HASH_KEY"],
        ),
    ],
)
async def test_a_service_without_its_secrets_stops_at_once_naming_each(
    containers: Containers, command: tuple[str, ...], env: dict[str, str], missing: list[str]
) -> None:
    """As compose starts the production services when no secret is set: exit 2, one line per variable."""
    name = await containers.start(env, *command)
    code, out, err = await engine("wait", name, within=60)
    assert (code, out.strip()) == (0, "2"), err
    logs = await containers.logs(name)
    problems = [line.strip() for line in logs.splitlines() if line.strip().startswith("- ")]
    assert [p.split(":")[0] for p in problems] == [f"- {m}" for m in missing], logs
    assert "Traceback" not in logs


async def known(sim: Sim, phone: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(sim.api_url + "/contacts", json={"phone": phone}, headers={"X-ACCESS-TOKEN": TOKEN}) as resp,
    ):
        assert resp.status == 200
    sim.state.requests.clear()


async def test_a_fleet_of_three_worker_containers_shares_the_queue_and_sends_each_message_once(
    redis_url: str, redis_client: Any, sim: Sim, containers: Containers
) -> None:
    """The README's fleet commands: three `podman run -d` of the image on one Redis."""
    phones = [f"+120255501{i:02d}" for i in range(10)]
    for phone in phones:
        await known(sim, phone)
    names = [await containers.start(worker_env(redis_url, sim, CGB_RATE_LIMIT="20")) for _ in range(3)]
    for name in names:
        await until(lambda name=name: ready(containers, name))
    producer = await pool(redis_url)
    try:
        jobs = [
            await producer.enqueue_job("whatsapp_send", {"to": phones[i % 10], "message": f"fleet {i}"})
            for i in range(60)
        ]
        results = [await job.result(timeout=60) for job in jobs]
    finally:
        await producer.aclose()
    assert all(r["success"] for r in results)
    texts = sorted(r["body"]["text"] for r in sim.requests() if r["endpoint"] == "send_text")
    assert texts == sorted(f"fleet {i}" for i in range(60))  # every one, none twice
    per_container = [(await containers.logs(name)).count("sent text to") for name in names]
    assert sum(per_container) == 60
    assert sum(1 for n in per_container if n > 0) >= 2  # the queue was shared
