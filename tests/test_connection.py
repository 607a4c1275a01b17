"""Every component reaches Redis through :mod:`cgb_worker.connection`: the URL's options as redis-py reads them,
checked before anything connects, over a real TLS ``redis-server`` with a CA this test makes, and Sentinel."""

from __future__ import annotations

import asyncio
import datetime
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
from cgb_worker.connection import CONNECT_TIMEOUT, RedisConfig, connection_options, parse_sentinels, redis_client
from cgb_worker.errors import ConfigError

from .conftest import PHONE_KEY, TOKEN, Harness, Sim, free_port

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
        """The URL a client with the CA uses (check the host name too: the certificate names 127.0.0.1)."""
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}&ssl_check_hostname=true"

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
        out, err = await asyncio.wait_for(proc.communicate(), 60)
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
