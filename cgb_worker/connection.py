"""How every component reaches Redis: :class:`RedisConfig` (``REDIS_URL``, ``REDIS_SENTINELS``,
``REDIS_SENTINEL_MASTER``) turned into an :class:`~arq.connections.ArqRedis` speaking the worker's serializer.

The worker, the webhook receiver, the command line and :func:`cgb_worker.create_pool` all connect here, so a
URL means the same to each of them:

* **The URL is redis-py's.** Every query option redis-py's own URL parsing knows is honoured (``ssl_ca_certs``,
  ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``, ``ssl_min_version``,
  ``socket_timeout``, ``socket_connect_timeout``, ``health_check_interval``, ``client_name``...), where arq's
  ``RedisSettings.from_dsn`` dropped them all. An option redis-py does not know, a file that is not there, or a
  value it cannot take is a configuration problem naming it, found before anything connects.
* **No endless connect.** ``socket_connect_timeout`` is :data:`CONNECT_TIMEOUT` unless the URL sets it: a
  ``rediss://`` URL to a plain-text port otherwise waits for a TLS handshake that never comes.
* **Outages are ridden out** (``ride_out_outages``): every command, arq's own included, is retried through a
  lost connection or a restarting Redis (:data:`REDIS_RETRY`), but never for more than about two minutes, and
  never when the server's certificate failed verification (that is a configuration error, not an outage).
* **Sentinel.** With ``REDIS_SENTINELS`` set, the sentinels say where the primary is; every new connection asks
  them, so after a failover the retried commands land on the new primary without a restart.
"""

from __future__ import annotations

import inspect
import math
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from arq.connections import ArqRedis, RedisSettings
from arq.constants import default_queue_name, expires_extra_ms
from loguru import logger
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ConfigError
from .serialization import deserialize, serialize

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_SENTINEL_MASTER = "mymaster"
SENTINEL_PORT = 26379
CONNECT_TIMEOUT = 5.0
"""Seconds a new connection (TCP and, for ``rediss://``, the TLS handshake) may take, unless the URL's
``socket_connect_timeout`` says otherwise."""
RETRY_WINDOW = 120.0
"""Seconds a command is retried through an outage, at most."""

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""What a lost or refused connection raises. ``OSError`` is there because a refused connection reaches
redis-py's retry as Python's own ``ConnectionRefusedError``, which is not redis-py's ``ConnectionError``."""

_T = TypeVar("_T")
_RETRYING: ContextVar[bool] = ContextVar("cgb_redis_retrying", default=False)


REPORT_EVERY = 10.0
"""Seconds between two lines about the same outage."""


def cause(exc: BaseException, url: str = "") -> str:
    """What went wrong connecting, in a few words: the first recognised error in ``exc``'s chain."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
            return f"authentication failed ({text.strip() or type(seen).__name__})"
        if isinstance(seen, ssl.SSLError) or "SSL" in text or "TLS" in text:
            return f"TLS handshake failed ({getattr(seen, 'reason', None) or text})"
        if isinstance(seen, socket.gaierror) or "Name or service not known" in text or "name resolution" in text:
            return "DNS: the host name does not resolve"
        if isinstance(seen, ConnectionRefusedError) or "Connection refused" in text or "Connect call failed" in text:
            return "connection refused"
        if isinstance(seen, FileNotFoundError) or "No such file" in text:
            return "no such socket"
        if isinstance(seen, ConnectionResetError) or "reset by peer" in text or "Connection closed" in text:
            return "the server closed the connection"
        if isinstance(seen, TimeoutError) or "Timeout" in text or "timed out" in text:
            hint = (
                " (rediss:// to a server that does not speak TLS looks like this)" if url.startswith("rediss:") else ""
            )
            return f"timed out{hint}"
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"


class Outage:
    """One process's view of its Redis: down since when, and when that was last said. Shared, not copied, by
    every connection's copy of the retry (redis-py deep-copies it per connection)."""

    def __init__(self, url: str = "") -> None:
        self.url = url
        self.down_since: float | None = None
        self.last_failed = 0.0
        self._said_at = 0.0
        self.stopping = False
        """Set when the process is told to stop (SIGTERM, SIGINT): from then on every command tries once, so
        that a worker stopped during an outage leaves at once instead of waiting out a window per clean-up
        command. Kept here because redis-py deep-copies the retry into each connection, and the copies share
        this :class:`Outage`."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Outage:
        return self

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        if self.down_since is not None and now - self.last_failed > 2 * REPORT_EVERY:
            self.down_since = None  # nothing failed for a while (its clients closed): this is another outage
        self.last_failed = now
        if self.down_since is None:
            self.down_since = self._said_at = now
            logger.warning("Redis at {} lost: {}; retrying", self.url or "REDIS_URL", cause(error, self.url))
        elif now - self._said_at >= REPORT_EVERY:
            self._said_at = now
            logger.warning(
                "Redis at {} still unreachable after {:.0f} s: {}",
                self.url or "REDIS_URL",
                now - self.down_since,
                cause(error, self.url),
            )

    def ok(self) -> None:
        if self.down_since is not None:
            logger.info(
                "Redis is back at {} after {:.1f} s", self.url or "REDIS_URL", time.monotonic() - self.down_since
            )
            self.down_since = None


class _GiveUp(Exception):
    """Carries an error out of :class:`OutageRetry`'s loop unretried (it is not one the loop retries)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class OutageRetry(Retry):
    """redis-py's retry, bounded in time as well as in tries (:data:`RETRY_WINDOW`), since one try can take a
    whole connect timeout, and never retrying a certificate the server failed verification with: that error
    is an ``OSError`` like a refused connection, but waiting does not fix it."""

    def __init__(self, backoff: ExponentialBackoff, retries: int, window: float, supported_errors: Any) -> None:
        super().__init__(backoff, retries, supported_errors=supported_errors)
        self.window = window
        self.outage = Outage()

    def given_up(self) -> bool:
        """Whether the current outage has outlasted the window, or the process is stopping: then every command
        tries once, so that the process's way out (arq's own clean-up included) does not wait a window per
        command."""
        if self.outage.stopping:
            return True
        down_since, now = self.outage.down_since, time.monotonic()
        # still failing (within the last 20 s): an outage whose clients all closed before a success is over
        return down_since is not None and now - down_since > self.window and now - self.outage.last_failed < 20

    async def call_with_retry(self, do: Callable[[], Awaitable[_T]], fail: Callable[[Any], Any]) -> _T:
        if self.given_up() and not _RETRYING.get():
            result = await do()  # raises at once while Redis stays away
            self.outage.ok()
            return result
        if _RETRYING.get():
            # Already inside a retry (redis-py nests them: a command's retry reconnects through the connection's,
            # and a Sentinel connection's retry connects through the plain one): try once and let the outer loop
            # retry from the top, which for Sentinel means asking the sentinels again where the primary is
            # rather than knocking for two minutes at a dead one.
            try:
                return await do()
            except REDIS_ERRORS as exc:
                await fail(exc)
                raise
        outage = self.outage

        async def failed(error: Any) -> None:
            outage.failed(error)
            await fail(error)

        token = _RETRYING.set(True)
        try:
            result = await self._retried(do, failed)
        finally:
            _RETRYING.reset(token)
        outage.ok()
        return result

    async def _retried(self, do: Callable[[], Awaitable[_T]], fail: Callable[[Any], Any]) -> _T:
        started = time.monotonic()

        async def once() -> _T:
            try:
                return await do()
            except REDIS_ERRORS as exc:
                # redis-py turns the handshake's error into its ConnectionError when a connect inside a
                # command's retry fails, so the certificate's error may be the context of the one seen here.
                if time.monotonic() - started > self.window or isinstance(
                    exc if isinstance(exc, ssl.SSLError) else exc.__context__, ssl.SSLCertVerificationError
                ):
                    raise _GiveUp(exc) from exc
                raise

        try:
            return await super().call_with_retry(once, fail)
        except _GiveUp as given_up:
            raise given_up.error from None


REDIS_RETRY = OutageRetry(ExponentialBackoff(cap=1.0, base=0.05), 125, RETRY_WINDOW, REDIS_ERRORS)
"""About two minutes of retries per command (backoff doubling from 50 ms, at most 1 s apart), each outage said
at once, every :data:`REPORT_EVERY` seconds while it lasts, and when it ends (:class:`Outage`)."""


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Where Redis is: ``REDIS_URL`` alone, or with ``REDIS_SENTINELS`` the sentinels that name the primary
    ``master``, the URL then giving the database, the username and password, and the TLS and socket options (its
    host and port are not used)."""

    url: str = DEFAULT_REDIS_URL
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = DEFAULT_SENTINEL_MASTER

    def __repr__(self) -> str:
        return f"RedisConfig(url={redact_url(self.url)!r}, sentinels={self.sentinels!r}, master={self.master!r})"

    def __str__(self) -> str:
        """For logs: the redacted URL, or the sentinels and the master's name."""
        if not self.sentinels:
            return redact_url(self.url)
        where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"Sentinel primary {self.master!r} via {where} ({redact_url(self.url)})"


_SECRET_QUERY = re.compile(r"(?i)((?:^|&)(?:password|sentinel_password)=)[^&]*")


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and reprs: ``redis://:pw@host`` holds one, and redis-py
    also takes one from the query (``?password=pw``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a Redis URL that cannot be parsed)"
    if parts.query:
        parts = parts._replace(query=_SECRET_QUERY.sub(r"\1********", parts.query))
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:********@{netloc}")
    return urlunsplit(parts)


def parse_redis_url(url: str) -> str | None:
    """What is wrong with a Redis URL, or None: arq and redis-py fall back to localhost on some malformed
    URLs (``redis://host:63790x/0``) instead of refusing them; the query's options are checked as well."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # an unclosed IPv6 bracket
        return f"cannot be parsed as a URL ({exc})."
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "must be a redis://, rediss:// or unix:// URL."
    try:
        port = parts.port
    except ValueError:
        return f"the port in {redact_url(url)!r} is not a number from 0 to 65535."
    if parts.scheme == "unix":
        return None if parts.path else "a unix:// URL needs the socket's path."
    if not parts.hostname:
        return f"{redact_url(url)!r} names no host."
    if port == 0:
        return "the port must not be 0."
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        return f"the database in {redact_url(url)!r} must be a number (redis://host:6379/0)."
    try:
        connection_options(url.strip())
    except ConfigError as exc:
        return exc.problems[0]
    return None


# -- the URL's options ---------------------------------------------------------------------------------------

_NOT_FROM_A_URL = {
    "decode_responses": "arq and the worker read Redis's replies as bytes",
    "protocol": "the worker speaks RESP2, as arq does",
    "retry": "the retries are the worker's own",
    "retry_on_error": "the retries are the worker's own",
    "connection_class": "the scheme chooses it",
    "parser_class": "not a value a URL can hold",
    "encoder_class": "not a value a URL can hold",
    "redis_connect_func": "not a value a URL can hold",
    "credential_provider": "not a value a URL can hold",
    "event_dispatcher": "not a value a URL can hold",
    "socket_keepalive_options": "not a value a URL can hold",
}
_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _accepted(connection_class: type) -> frozenset[str]:
    """The keyword arguments a redis-py connection class (and its bases) takes, and the pool's own."""
    names = {"max_connections"}
    for klass in connection_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(
                p.name
                for p in inspect.signature(init).parameters.values()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
            )
    return frozenset(names)


def _converted(name: str, value: Any) -> Any:
    """The few options redis-py's URL parsing leaves as text that its connections need as something else."""
    if name in ("socket_read_size", "socket_type") and isinstance(value, str):
        return int(value)
    if name in ("socket_timeout", "socket_connect_timeout", "health_check_interval") and value is not None:
        seconds = float(value)
        least = 0.0 if name == "health_check_interval" else 0.001
        if not math.isfinite(seconds) or seconds < least:
            raise ValueError("a number of seconds" + (", 0 or more" if least == 0 else ", more than 0"))
        return seconds
    if name == "ssl_min_version" and isinstance(value, str):
        try:
            return ssl.TLSVersion[value]
        except KeyError:
            raise ValueError(f"one of {', '.join(v.name for v in ssl.TLSVersion)}") from None
    return value


def connection_options(url: str) -> dict[str, Any]:
    """redis-py's connection-pool arguments for ``url`` (its own URL parsing, then checked: an option it does
    not take, a value it cannot use, a TLS file that is not there); :class:`ConfigError` names the first
    problem."""
    try:
        options: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    connection_class = options.get("connection_class", Connection)
    tls = connection_class is SSLConnection
    accepted = _accepted(connection_class)
    for name in sorted(set(options) - {"connection_class", "host", "port", "path", "username", "password"}):
        if name in _NOT_FROM_A_URL:
            raise ConfigError([f"{name} cannot be set in the URL: {_NOT_FROM_A_URL[name]}."])
        if name.startswith("ssl_") and not tls:
            raise ConfigError([f"{name} is a TLS option: it needs a rediss:// URL."])
        if name not in accepted:
            raise ConfigError([f"{name!r} is not a connection option redis-py knows."])
        try:
            options[name] = _converted(name, options[name])
        except ValueError as exc:
            raise ConfigError([f"{name}: must be {exc}."]) from None
    for name in _FILES:
        if name in options and not Path(options[name]).is_file():
            raise ConfigError([f"{name}: there is no file {options[name]!r}."])
    if (
        tls
        and "ssl_check_hostname" not in options
        and str(options.get("ssl_cert_reqs", "required")).lower()
        not in (
            "none",
            "cert_none",
            "0",
        )
    ):
        # redis-py does not check the server's name by default: any certificate the CA signed, for any host,
        # would do. Checked unless the URL says ssl_check_hostname=false (or turns verification off).
        options["ssl_check_hostname"] = True
    if tls:
        try:  # builds the TLS context as each connection will, so a bad certificate or key is named now
            SSLConnection(**{k: v for k, v in options.items() if k.startswith("ssl_")}).ssl_context.get()
        except (OSError, ssl.SSLError, RedisError, ValueError) as exc:
            raise ConfigError([f"the TLS options cannot be used: {exc}"]) from None
    options.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    return options


def _retry_options(ride_out_outages: bool) -> dict[str, Any]:
    if not ride_out_outages:
        return {}
    return {"retry": REDIS_RETRY, "retry_on_error": list(REDIS_ERRORS)}


# -- clients -------------------------------------------------------------------------------------------------


class SentinelArqRedis(ArqRedis):
    """An :class:`ArqRedis` on a Sentinel-managed primary; closing it closes its clients of the sentinels too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for client in self.sentinel_manager.sentinels:
                await client.aclose()


def redis_client(
    config: RedisConfig,
    *,
    ride_out_outages: bool = True,
    default_queue: str = default_queue_name,
    expires_extra: int = expires_extra_ms,
) -> ArqRedis:
    """The client for ``config`` (checked by :func:`parse_redis_url` or :func:`read_redis_config`), with the
    worker's serializer; it connects on its first command. ``ride_out_outages`` retries every command through an
    outage (:data:`REDIS_RETRY`); a command line that should fail fast passes False."""
    options = connection_options(config.url)
    options.update(_retry_options(ride_out_outages))
    if ride_out_outages:
        REDIS_RETRY.outage.url = str(config)  # one Redis per process: its outages are said with its name
    client: ArqRedis
    if config.sentinels:
        for name in ("host", "port", "connection_class"):
            options.pop(name, None)
        tls = {k: v for k, v in options.items() if k.startswith("ssl_")}
        if urlsplit(config.url).scheme == "rediss":
            options["ssl"] = True
            tls["ssl"] = True
        # The sentinels are spoken to as the primary is (TLS, its files, the timeouts), without its password.
        sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")} | tls
        sentinel = Sentinel(list(config.sentinels), sentinel_kwargs=sentinel_options, **options)  # type: ignore[no-untyped-call]
        on_primary = sentinel.master_for(config.master, redis_class=SentinelArqRedis)
        assert isinstance(on_primary, SentinelArqRedis)
        on_primary.sentinel_manager = sentinel
        client = on_primary
    else:
        client = ArqRedis(ConnectionPool(**options))
        client.auto_close_connection_pool = True  # it owns its pool: closing the client closes the pool
    client.job_serializer = serialize
    client.job_deserializer = deserialize
    client.default_queue_name = default_queue
    client.expires_extra_ms = expires_extra
    return client


async def connect(config: RedisConfig, *, ride_out_outages: bool = True, **kwargs: Any) -> ArqRedis:
    """:func:`redis_client`, connected (one PING); closed again when that fails."""
    client = redis_client(config, ride_out_outages=ride_out_outages, **kwargs)
    try:
        await client.ping()
    except BaseException:
        await client.aclose()
        raise
    return client


def arq_redis_settings(config: RedisConfig) -> RedisSettings:
    """arq's own settings for ``config``, for what arq connects to by itself (``arq --check``): the host, the
    database, the credentials and the TLS files, which are what its settings can hold."""
    options = connection_options(config.url)
    fields: dict[str, Any] = {
        k: options[k]
        for k in ("ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data", "ssl_check_hostname")
        if k in options
    }
    return RedisSettings(
        host=list(config.sentinels) if config.sentinels else options.get("host", "localhost"),
        port=int(options.get("port", 6379)),
        unix_socket_path=options.get("path"),
        database=int(options.get("db", 0)),
        username=options.get("username"),
        password=options.get("password"),
        ssl=urlsplit(config.url).scheme == "rediss",
        conn_timeout=max(1, round(float(options["socket_connect_timeout"]))),
        conn_retries=0,
        sentinel=bool(config.sentinels),
        sentinel_master=config.master,
        **fields,
    )


# -- the variables -------------------------------------------------------------------------------------------


def parse_sentinels(text: str) -> tuple[tuple[tuple[str, int], ...], str | None]:
    """``REDIS_SENTINELS``: a comma list of ``host:port`` (the port defaults to 26379; ``[::1]:26379`` for
    IPv6), and what is wrong with it, or None."""
    found: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            parts = urlsplit(f"//{item}")
            host, port = parts.hostname, parts.port
        except ValueError:
            host, port = None, None
        if not host or parts.path or parts.username is not None or (port is None and item.rstrip("]").count(":")):
            return (), f"{item[:60]!r} is not host:port."
        found.append((host, port or SENTINEL_PORT))
    if not found:
        return (), "names no sentinel (host:port, comma separated)."
    return tuple(found), None


def read_redis_config(source: Mapping[str, str]) -> tuple[RedisConfig | None, list[str]]:
    """``REDIS_URL``, ``REDIS_SENTINELS`` and ``REDIS_SENTINEL_MASTER`` from ``source`` (empty is unset), and one
    line per problem."""
    url = (source.get("REDIS_URL") or "").strip() or DEFAULT_REDIS_URL
    sentinels_text = (source.get("REDIS_SENTINELS") or "").strip()
    master = (source.get("REDIS_SENTINEL_MASTER") or "").strip() or DEFAULT_SENTINEL_MASTER
    problems: list[str] = []
    if problem := parse_redis_url(url):
        problems.append(f"REDIS_URL: {problem}")
    sentinels: tuple[tuple[str, int], ...] = ()
    if sentinels_text:
        sentinels, problem = parse_sentinels(sentinels_text)
        if problem:
            problems.append(f"REDIS_SENTINELS: {problem}")
        elif urlsplit(url).scheme == "unix":
            problems.append("REDIS_SENTINELS: REDIS_URL must be a redis:// or rediss:// URL with Sentinel.")
    if not master.isprintable() or " " in master or len(master) > 200:
        problems.append("REDIS_SENTINEL_MASTER: must be a name without spaces.")
    if problems:
        return None, problems
    return RedisConfig(url=url, sentinels=sentinels, master=master), []


def load_redis_config(source: Mapping[str, str]) -> RedisConfig:
    """:func:`read_redis_config` for a command that needs only Redis; :class:`ConfigError` lists the problems."""
    config, problems = read_redis_config(source)
    if config is None:
        raise ConfigError(problems)
    return config


__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_REDIS_URL",
    "REDIS_ERRORS",
    "REDIS_RETRY",
    "RedisConfig",
    "arq_redis_settings",
    "connect",
    "connection_options",
    "load_redis_config",
    "parse_redis_url",
    "parse_sentinels",
    "read_redis_config",
    "redact_url",
    "redis_client",
]
