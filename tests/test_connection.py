"""Every component reaches Redis through :mod:`cgb_worker.connection`: the URL's options as redis-py reads them,
checked before anything connects, over a real TLS ``redis-server`` with a CA this test makes, and Sentinel."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cgb_worker import create_pool, keys, load_receiver_settings, load_settings
from cgb_worker.connection import (
    CONNECT_TIMEOUT,
    RedisConfig,
    connection_options,
    parse_redis_url,
    parse_sentinels,
    redact_url,
    redis_client,
)
from cgb_worker.errors import ConfigError
from cgb_worker.tasks import cancel_and_wait

from .conftest import PHONE_KEY, TOKEN, Harness, Sim, communicate, free_port

BIN = Path(sys.executable).parent
PHONE = "+12025550100"


# -- a CA, a server certificate, and a TLS-only redis-server ---------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_ca_and_server_cert(workdir: Path) -> tuple[Path, Path, Path]:
    """A private CA (``ca.pem``) and a certificate it signs for 127.0.0.1 and localhost (``server.pem``,
    ``server.key``)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("cgb-worker test CA"))
        .issuer_name(_name("cgb-worker test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = workdir / "ca.pem", workdir / "server.pem", workdir / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return ca_path, cert_path, key_path


class TLSRedis:
    def __init__(self, port: int, ca: Path, plain_port: int) -> None:
        self.port, self.ca, self.plain_port = port, ca, plain_port

    @property
    def url(self) -> str:
        """The URL a client with the CA uses (the certificate names 127.0.0.1: its host name checks out)."""
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"  # the host name is checked by default

    @property
    def url_without_ca(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"


def _wait_for(url: str, proc: subprocess.Popen[bytes]) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                client.ping()
                return
            except sync_redis.ConnectionError:
                if proc.poll() is not None:
                    break
                asyncio.run(asyncio.sleep(0.05))
        proc.kill()
        pytest.fail(f"redis-server did not start: {proc.stdout.read().decode() if proc.stdout else ''}")
    finally:
        client.close()


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TLSRedis]:
    workdir = Path(tempfile.mkdtemp(prefix="cgb-test-tls-"))
    ca, cert, key = make_ca_and_server_cert(workdir)
    port, plain = free_port(), free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(plain), "--tls-port", str(port),
         "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = TLSRedis(port, ca, plain)
    try:
        _wait_for(server.url, proc)
        yield server
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def tls_client(tls_redis: TLSRedis) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain redis-py client of the TLS server (through its plain port), to see what was stored."""
    client: redis.asyncio.Redis = redis.asyncio.Redis(port=tls_redis.plain_port)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


def _env(**values: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_", "WEBHOOK_"))}
    return {**base, "PHONE_HASH_KEY": PHONE_KEY, **values}


async def _run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """A cgb-worker command, to its end (the 60 s are a guard against a hang, not a measurement)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "cgb-worker"), *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await communicate(proc, 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"cgb-worker {' '.join(args)} hung")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- the URL's options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:6379/0?sslcacerts=/x", "'sslcacerts' is not a connection option redis-py knows."),
        ("redis://127.0.0.1:6379/0?ssl_ca_certs=/x", "ssl_ca_certs is a TLS option: it needs a rediss:// URL."),
        ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs: there is no file '/no/such/ca.pem'."),
        ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=always", "Invalid SSL Certificate Requirements Flag: always"),
        ("rediss://127.0.0.1:6379/0?ssl_min_version=TLSv9", "ssl_min_version: must be one of"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout' in connection URL."),
        ("redis://127.0.0.1:6379/0?decode_responses=true", "decode_responses cannot be set in the URL"),
    ],
)
def test_a_url_option_redis_py_cannot_use_is_a_configuration_problem_naming_it(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CGB_API_KEY": TOKEN, "PHONE_HASH_KEY": PHONE_KEY, "REDIS_URL": url})
    [line] = caught.value.problems
    assert line.startswith("REDIS_URL: ")
    assert problem in line
    with pytest.raises(ConfigError):
        load_receiver_settings({"WABA_APP_SECRET": "s", "PHONE_HASH_KEY": PHONE_KEY, "REDIS_URL": url})


def test_the_urls_options_reach_the_connections_with_a_connect_timeout_by_default(tls_redis: TLSRedis) -> None:
    options = connection_options(
        f"rediss://u:pw@127.0.0.1:{tls_redis.port}/2?ssl_ca_certs={tls_redis.ca}&ssl_min_version=TLSv1_2"
        "&socket_timeout=7&health_check_interval=15&client_name=cgb"
    )
    assert options["ssl_ca_certs"] == str(tls_redis.ca)
    assert options["ssl_min_version"].name == "TLSv1_2"
    assert (options["db"], options["username"], options["password"]) == (2, "u", "pw")
    assert (options["socket_timeout"], options["health_check_interval"], options["client_name"]) == (7.0, 15, "cgb")
    assert options["socket_connect_timeout"] == CONNECT_TIMEOUT
    assert connection_options("redis://h/0?socket_connect_timeout=1.5")["socket_connect_timeout"] == 1.5
    client = redis_client(RedisConfig(f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.ca}"))
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(tls_redis.ca)


# -- TLS: every component -----------------------------------------------------------------------------------


async def test_create_pool_speaks_tls_with_a_private_ca(tls_redis: TLSRedis, tls_client: Any) -> None:
    pool = await create_pool(tls_redis.url)
    try:
        job = await pool.enqueue_job("whatsapp_send", {"to": PHONE, "message": "hi"})
        assert job is not None
    finally:
        await pool.aclose()
    assert await tls_client.zcard("arq:queue") == 1  # what went over TLS is in the server


async def test_the_worker_sends_over_tls(tls_redis: TLSRedis, tls_client: Any, sim: Sim) -> None:
    harness = Harness(tls_redis.url, sim, pytest.MonkeyPatch())
    try:
        await harness.known(PHONE)
        [job] = await harness.enqueue({"to": PHONE, "message": "over tls"})
        await harness.run()
        outcome = await harness.outcome(job)
        assert not isinstance(outcome, Exception), outcome
    finally:
        await harness.close()
    [sent] = sim.requests("send_text")
    assert "over tls" in str(sent)


async def test_the_cli_and_the_receiver_speak_tls(tls_redis: TLSRedis, tls_client: Any) -> None:
    code, out, err = await _run("dead-letters", "list", env=_env(REDIS_URL=tls_redis.url))
    assert (code, err) == (0, ""), err
    assert out.startswith("0 dead letter(s)"), out
    admin = free_port()
    env = _env(REDIS_URL=tls_redis.url, WABA_APP_SECRET="s" * 32, WEBHOOK_PORT=str(free_port()),
               WEBHOOK_ADMIN_PORT=str(admin))  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "cgb-worker"), "webhooks", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        while b"webhook receiver (" not in (line := await asyncio.wait_for(proc.stderr.readline(), 60)):
            assert line, "the receiver exited"
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # the processor's monitor samples Redis every second
                async with http.get(f"http://127.0.0.1:{admin}/healthz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.1)
            assert resp.status == 200, await resp.text()
    finally:
        proc.terminate()
        await proc.wait()
    groups = await tls_client.xinfo_groups(keys.INBOX)  # made by the receiver, over TLS
    assert [g["name"] for g in groups] == [keys.INBOX_GROUP.encode()]


def test_arq_check_reads_the_tls_options_too(tls_redis: TLSRedis, sim: Sim) -> None:
    """``arq --check`` connects by arq's own settings, which carry the URL's TLS files: it reaches the server
    (and finds no worker's health key), where without them the handshake would fail."""
    env = _env(REDIS_URL=tls_redis.url, CGB_API_KEY=TOKEN, CGB_API_URL=sim.api_url)
    proc = subprocess.run(
        [str(BIN / "arq"), "cgb_worker.WorkerSettings", "--check"], env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == 1, proc.stderr
    assert b"Health check failed: no health check sentinel value found" in proc.stderr + proc.stdout


async def test_without_the_ca_every_component_fails_at_once_in_one_line(tls_redis: TLSRedis, sim: Sim) -> None:
    url = tls_redis.url_without_ca
    with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await create_pool(url)  # rides out outages, but a certificate is not an outage: not retried
    worker_env = _env(REDIS_URL=url, CGB_API_KEY=TOKEN, CGB_API_URL=sim.api_url)
    receiver_env = _env(REDIS_URL=url, WABA_APP_SECRET="s" * 32, WEBHOOK_PORT=str(free_port()),
                        WEBHOOK_ADMIN_PORT=str(free_port()))  # fmt: skip
    for args, env in ((("dead-letters", "list"), worker_env), (("run",), worker_env), (("webhooks",), receiver_env)):
        code, out, err = await _run(*args, env=env)
        assert code != 0, (args, err)
        assert "Traceback" not in out + err, (args, err)
        assert len([line for line in err.splitlines() if "CERTIFICATE_VERIFY_FAILED" in line]) == 1, (args, err)


async def test_rediss_to_a_plain_port_gives_up_after_the_connect_timeout(tls_redis: TLSRedis) -> None:
    url = f"rediss://127.0.0.1:{tls_redis.plain_port}/0?ssl_ca_certs={tls_redis.ca}&socket_connect_timeout=0.5"
    with pytest.raises((RedisTimeoutError, RedisConnectionError)):
        await create_pool(url, ride_out_outages=False)


# -- Sentinel's variables --------------------------------------------------------------------------------------


def test_sentinels_are_read_as_host_port_lists() -> None:
    assert parse_sentinels("10.0.0.1:26379, sentinel-b:26380,[::1]:5000,sentinel-c") == (
        (("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 5000), ("sentinel-c", 26379)),
        None,
    )
    settings = load_settings(
        {"CGB_API_KEY": TOKEN, "PHONE_HASH_KEY": PHONE_KEY, "REDIS_URL": "redis://:pw@ignored:1/3",
         "REDIS_SENTINELS": "s1:26379,s2:26379", "REDIS_SENTINEL_MASTER": "queue"}
    )  # fmt: skip
    assert settings.redis == RedisConfig("redis://:pw@ignored:1/3", (("s1", 26379), ("s2", 26379)), "queue")
    assert "pw" not in repr(settings)
    assert "pw" not in str(settings.redis)
    assert load_receiver_settings(
        {"WABA_APP_SECRET": "s", "PHONE_HASH_KEY": PHONE_KEY, "REDIS_SENTINELS": "s1"}
    ).redis == RedisConfig(sentinels=(("s1", 26379),))


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        ({"REDIS_SENTINELS": "s1:263x9"}, "REDIS_SENTINELS: 's1:263x9' is not host:port."),
        ({"REDIS_SENTINELS": " , "}, "REDIS_SENTINELS: names no sentinel (host:port, comma separated)."),
        ({"REDIS_SENTINELS": "s1", "REDIS_URL": "unix:///tmp/r.sock"}, "REDIS_SENTINELS: REDIS_URL must be a redis"),
        ({"REDIS_SENTINELS": "s1", "REDIS_SENTINEL_MASTER": "my master"}, "REDIS_SENTINEL_MASTER: must be a name"),
    ],
)
def test_a_malformed_sentinel_variable_is_a_configuration_problem(variables: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CGB_API_KEY": TOKEN, "PHONE_HASH_KEY": PHONE_KEY, **variables})
    [line] = caught.value.problems
    assert line.startswith(problem)


# -- Sentinel: a real primary, a replica and a sentinel; the primary killed under a backlog ----------------------


class Failover:
    """A primary, its replica and one sentinel (quorum 1, down after 1 s), each its own ``redis-server``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.primary_port, self.replica_port, self.sentinel_port = free_port(), free_port(), free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.config = RedisConfig("redis://127.0.0.1/0", (("127.0.0.1", self.sentinel_port),), "mymaster")

    def _start(self, name: str, *args: str) -> None:
        (self.workdir / name).mkdir()
        with (self.workdir / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [shutil.which("redis-server") or "redis-server", *args, "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir / name)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def start(self) -> None:
        self._start("primary", "--port", str(self.primary_port))
        self._start("replica", "--port", str(self.replica_port), "--replicaof", "127.0.0.1", str(self.primary_port))
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"sentinel monitor mymaster 127.0.0.1 {self.primary_port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 2000\n"
        )
        self._start("sentinel", str(conf), "--sentinel", "--port", str(self.sentinel_port))
        sentinel = redis.asyncio.Redis(port=self.sentinel_port)
        try:
            for _ in range(300):  # the sentinel must know the replica, in sync, before the primary can fail over
                try:
                    replicas = await sentinel.sentinel_slaves("mymaster")  # type: ignore[no-untyped-call]
                    if replicas and replicas[0].get("master-link-status") == "ok":
                        return
                except (RedisConnectionError, OSError):
                    pass
                await asyncio.sleep(0.1)
            pytest.fail("the sentinel never saw the replica in sync")
        finally:
            await sentinel.aclose()

    async def primary(self) -> int:
        sentinel = redis.asyncio.Redis(port=self.sentinel_port)
        try:
            _host, port = await sentinel.sentinel_get_master_addr_by_name("mymaster")  # type: ignore[no-untyped-call]
            return int(port)
        finally:
            await sentinel.aclose()

    def kill_primary(self) -> None:
        self.procs["primary"].kill()  # SIGKILL: no goodbye to the replica or the clients
        self.procs["primary"].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


@pytest.fixture
async def failover() -> AsyncIterator[Failover]:
    workdir = Path(tempfile.mkdtemp(prefix="cgb-test-sentinel-"))
    f = Failover(workdir)
    try:
        await f.start()
        yield f
    finally:
        f.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _until(check: Any, what: str, within: float = 30) -> None:
    """Polls ``check()`` until it is true; ``within`` seconds is the bound the issue sets, a failure past it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, f"not within {within:g} s: {what}"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_workers_the_receiver_and_the_cli_follow_a_failover(failover: Failover, sim: Sim) -> None:
    from arq.worker import create_worker

    from cgb_worker import worker_settings

    sentinel_env = {"REDIS_URL": "redis://127.0.0.1/0", "REDIS_SENTINELS": f"127.0.0.1:{failover.sentinel_port}"}
    env = {"CGB_API_KEY": TOKEN, "PHONE_HASH_KEY": PHONE_KEY, "CGB_API_URL": sim.api_url, "CGB_RATE_LIMIT": "20",
           "CGB_RETRY_BASE_DELAY": "0.05", "CGB_RETRY_MAX_DELAY": "0.2", **sentinel_env}  # fmt: skip
    workers = [create_worker(worker_settings(env), poll_delay=0.01, handle_signals=False) for _ in range(2)]
    running = [asyncio.create_task(w.main()) for w in workers]
    admin, port = free_port(), free_port()
    receiver = await asyncio.create_subprocess_exec(
        str(BIN / "cgb-worker"), "webhooks", "--host", "127.0.0.1",
        env=_env(WABA_APP_SECRET="s3cret-for-tests", WEBHOOK_PORT=str(port), WEBHOOK_ADMIN_PORT=str(admin),
                 **sentinel_env),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    producer = await create_pool(failover.config)
    body = b'{"object": "whatsapp_business_account", "entry": []}'
    signed = {"X-Hub-Signature-256": "sha256=" + hmac.new(b"s3cret-for-tests", body, hashlib.sha256).hexdigest()}

    async def stored_by_receiver() -> bool:
        try:
            async with http.post(f"http://127.0.0.1:{port}/webhooks/whatsapp", data=body, headers=signed) as r:
                return r.status == 200  # 200 only once the webhook is stored in Redis (503 otherwise)
        except aiohttp.ClientConnectionError:
            return False

    try:
        async with aiohttp.ClientSession() as http:
            await _until(stored_by_receiver, "the receiver answers")
            # A backlog: 60 jobs at 20/s, three seconds of them, the primary killed in the middle.
            for i in range(60):
                await producer.enqueue_job("whatsapp_send", {"to": f"+97250000{i:04d}", "message": f"before-{i:03d}"})
            await _until(lambda: _sent(sim, "before-"), "the backlog starts")
            failover.kill_primary()

            async def promoted() -> bool:
                return await failover.primary() == failover.replica_port

            await _until(promoted, "the sentinel promotes the replica")
            after = [f"after-{i:03d}" for i in range(20)]
            for i, text in enumerate(after):
                await producer.enqueue_job("whatsapp_send", {"to": f"+97250001{i:04d}", "message": text})

            async def all_sent() -> bool:
                return all([await _sent(sim, text) for text in after])

            await _until(all_sent, "the workers send the jobs enqueued after the failover")
            await _until(stored_by_receiver, "the receiver stores a webhook on the new primary")
        code, out, err = await _run("dead-letters", "list", env=_env(**sentinel_env))
        assert (code, err) == (0, ""), err
        assert out.startswith("0 dead letter(s)"), out
        texts = [str((r["body"] or {}).get("text", r["body"])) for r in sim.requests("send_text")]
        assert {text: sum(text in t for t in texts) for text in after} == dict.fromkeys(after, 1)  # each once
        assert all(not t.done() for t in running)  # no worker stopped: they followed the failover
    finally:
        for task in running:
            await cancel_and_wait(task)
        for w in workers:
            await w.close()
        await producer.aclose()
        receiver.terminate()
        await receiver.wait()


async def _sent(sim: Sim, text: str) -> bool:
    return any(text in str(r["body"]) for r in sim.requests("send_text"))


async def test_a_retry_inside_a_retry_tries_once_and_leaves_the_retrying_to_the_outer_one() -> None:
    """redis-py nests retries (a Sentinel connection's connect retries a plain connect that retries too): the
    inner one must not spend the whole outage knocking at an address the outer one would ask the sentinels
    about again."""
    from cgb_worker.connection import REDIS_RETRY

    calls: list[str] = []

    async def fail(error: Exception) -> None:
        calls.append("fail")

    async def inner_attempt() -> str:
        calls.append("inner")
        if calls.count("inner") < 3:
            raise RedisConnectionError("refused")
        return "connected"

    async def outer_attempt() -> str:
        calls.append("outer")
        return await REDIS_RETRY.call_with_retry(inner_attempt, fail)

    assert await REDIS_RETRY.call_with_retry(outer_attempt, fail) == "connected"
    # each outer try reached the inner attempt once: its failure went straight back out
    assert calls == ["outer", "inner", "fail", "fail", "outer", "inner", "fail", "fail", "outer", "inner"]


# -- what the attack found ------------------------------------------------------------------------------------


def test_a_password_in_the_query_is_redacted_too() -> None:
    """redis-py takes ``?password=``: it was shown in clear in every "waiting for Redis" line."""
    assert redact_url("redis://127.0.0.1:6481/0?password=S3cret%21") == "redis://127.0.0.1:6481/0?password=********"
    assert redact_url("rediss://u:pw@h:1/0?ssl_cert_reqs=required&Password=zz") == (
        "rediss://u:********@h:1/0?ssl_cert_reqs=required&Password=********"
    )
    assert "S3cret" not in str(RedisConfig("redis://h/0?password=S3cret"))
    assert redact_url("redis://[::1") == "(a Redis URL that cannot be parsed)"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://[::1", "cannot be parsed as a URL (Invalid IPv6 URL)."),
        ("redis://h/0?socket_connect_timeout=nan", "socket_connect_timeout: must be a number of seconds, more than 0."),
        ("redis://h/0?socket_timeout=0", "socket_timeout: must be a number of seconds, more than 0."),
        ("redis://h/0?socket_timeout=-1", "socket_timeout: must be a number of seconds, more than 0."),
        ("redis://h/0?health_check_interval=-1", "health_check_interval: must be a number of seconds, 0 or more."),
    ],
)
def test_urls_that_crashed_or_waited_are_configuration_problems(url: str, problem: str) -> None:
    assert parse_redis_url(url) == problem
    with pytest.raises(ConfigError) as caught:
        load_settings({"CGB_API_KEY": TOKEN, "PHONE_HASH_KEY": PHONE_KEY, "REDIS_URL": url})
    assert caught.value.problems == [f"REDIS_URL: {problem}"]


def test_rediss_checks_the_host_name_unless_told_not_to(tls_redis: TLSRedis) -> None:
    """redis-py leaves ``ssl_check_hostname`` off: any certificate the CA signed, for any host, would do."""
    base = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.ca}"
    assert connection_options(base)["ssl_check_hostname"] is True
    assert connection_options(base + "&ssl_check_hostname=false")["ssl_check_hostname"] is False
    assert "ssl_check_hostname" not in connection_options(base + "&ssl_cert_reqs=none")  # nothing verified at all
    assert "ssl_check_hostname" not in connection_options(f"redis://127.0.0.1:{tls_redis.port}/0")


async def test_a_url_that_cannot_be_parsed_is_one_line_under_arq(harness: Harness) -> None:
    env = _env(REDIS_URL="redis://[::1", CGB_API_KEY=TOKEN)
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "arq"), "cgb_worker.WorkerSettings", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await communicate(proc, 60)
    text = (out + err).decode()
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    lines = text.strip().splitlines()  # the configuration error's head, then one line per problem
    assert lines[1:] == ["  - REDIS_URL: cannot be parsed as a URL (Invalid IPv6 URL)."], text
    assert lines[0].endswith("cgb-worker cannot start: invalid configuration:"), text
