"""Configuration: read once from the environment into a frozen :class:`Settings`.

Every bad or missing variable is collected and reported together in one :class:`ConfigError`, so an
operator fixes a deployment in one round. Nothing else in the package reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import environs
import phonenumbers
from marshmallow.validate import OneOf, Range

from .errors import ConfigError

DEFAULT_API_URL = "https://app.chatgptbuilder.io/api"
TEMPLATE_PREFIX = "CGB_TEMPLATE_"
_NOT_TEMPLATES = frozenset({"CGB_TEMPLATE_CACHE_TIMEOUT"})


class Secret:
    """A value that never shows itself in a repr, str or log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not to be pickled")


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and reprs (``redis://:pw@host`` holds one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:********@{netloc}"))


MAX_RETRY_ATTEMPTS = 100


def job_deadline(job_timeout: float) -> float:
    """Seconds a try may run before it stops itself: a margin (30 s, or a quarter of a short timeout) below
    arq's ``job_timeout``, whose expiry arq never retries."""
    return job_timeout - min(30.0, job_timeout / 4)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """arq's own knobs. Tuned for a network-bound job; each one is a ``WORKER_*`` variable.

    * ``max_jobs`` 100: sends wait on CGB, not on the CPU, so many run at once (arq's 10 caps a worker at
      about 20 sends a second on a 100 ms API).
    * ``poll_delay`` 0.01 s: arq fills a free slot only on its next poll, so with 200 ms sends a 50 ms poll
      would leave each slot idle a tenth of the time. An idle worker pays one small Redis read per poll.
    * ``job_timeout`` 120 s: each try stops itself 30 s earlier and is retried, so arq's own timeout is not
      reached. It also bounds how long a killed worker's jobs stay locked: arq re-runs them after
      ``job_timeout + 10`` s.
    * ``health_check_interval`` 10 s: ``arq --check`` notices a dead worker within that (plus one).
    * ``job_completion_wait`` 40 s: on SIGTERM, running sends get this long to finish before being
      cancelled (and re-run elsewhere); above ``CGB_TIMEOUT``, below a container's stop grace period.
    * ``keep_result`` 86400 s: how long ``Job.result()`` can be read, and how long an enqueue with the
      same ``_job_id`` is refused.
    """

    max_jobs: int = 100
    poll_delay: float = 0.01
    job_timeout: int = 120
    health_check_interval: int = 10
    job_completion_wait: int = 40
    keep_result: int = 86400


WORKER_VARIABLES: dict[str, tuple[str, type, float, float | None]] = {
    "max_jobs": ("WORKER_MAX_JOBS", int, 1, 10000),
    "poll_delay": ("WORKER_POLL_DELAY", float, 0.001, 10),
    "job_timeout": ("WORKER_JOB_TIMEOUT", int, 5, None),
    "health_check_interval": ("WORKER_HEALTH_CHECK_INTERVAL", int, 1, 30),
    "job_completion_wait": ("WORKER_JOB_COMPLETION_WAIT", int, 0, None),
    "keep_result": ("WORKER_KEEP_RESULT", int, 0, None),
}
"""Each :class:`WorkerOptions` field: its variable, type and allowed range (None: no upper bound)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the worker is configured with. Build it with :func:`load_settings`."""

    api_key: Secret
    api_url: str = DEFAULT_API_URL
    timeout: float = 30.0
    """Per-request timeout to CGB in seconds (``CGB_TIMEOUT`` is in milliseconds)."""
    retry_attempts: int = 10
    retry_base_delay: float = 2.0
    retry_max_delay: float = 300.0
    cache_timeout: int = 3600
    template_cache_timeout: int = 86400
    templates: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Template name (lower case) to CGB flow id, from ``CGB_TEMPLATE_<NAME>``."""
    default_region: str | None = None
    redis_url: str = "redis://localhost:6379/0"
    unknown_outcome: str = "resend"
    """What a retry does when an earlier attempt's send may have gone out: ``resend`` or ``fail``."""
    dead_letter_max: int = 10000
    log_level: str = "INFO"
    log_json: bool = False
    rate_limit: float = 10.0
    """Requests per second to CGB across every worker on this Redis; 0: no limit."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (all interfaces); None: no metrics server."""
    worker: WorkerOptions = field(default_factory=WorkerOptions)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["redis_url"] = redact_url(self.redis_url)  # the key is a Secret already
        shown["templates"] = dict(self.templates)
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check every variable; raise one :class:`ConfigError` listing all problems.

    ``environ`` defaults to ``os.environ``; tests and the CLI pass their own mapping.
    """
    if environ is None:
        return _read(os.environ)
    source = dict(environ)
    saved = dict(os.environ)
    # environs reads os.environ only, so lend it the mapping for the duration of the read.
    os.environ.clear()
    os.environ.update(source)
    try:
        return _read(source)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _read(source: Mapping[str, str]) -> Settings:
    env = environs.Env(eager=False)
    positive = Range(min=0, min_inclusive=False)
    non_negative = Range(min=0)

    api_url = env.str("CGB_API_URL", DEFAULT_API_URL)
    api_key = env.str("CGB_API_KEY")
    timeout_ms = env.float("CGB_TIMEOUT", 30000.0, validate=positive)
    retry_attempts = env.int("CGB_RETRY_ATTEMPTS", 10, validate=Range(min=0, max=MAX_RETRY_ATTEMPTS))
    base_delay = env.float("CGB_RETRY_BASE_DELAY", 2.0, validate=positive)
    max_delay = env.float("CGB_RETRY_MAX_DELAY", 300.0, validate=positive)
    cache_timeout = env.int("CGB_CACHE_TIMEOUT", 3600, validate=positive)
    template_cache_timeout = env.int("CGB_TEMPLATE_CACHE_TIMEOUT", 86400, validate=positive)
    default_region = env.str("CGB_DEFAULT_REGION", None)
    redis_url = env.str("REDIS_URL", "redis://localhost:6379/0")
    unknown_outcome = env.str("CGB_UNKNOWN_OUTCOME", "resend", validate=OneOf(["resend", "fail"]))
    dead_letter_max = env.int("DEAD_LETTER_MAX", 10000, validate=positive)
    log_level = env.str("LOG_LEVEL", "INFO", validate=OneOf(["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"]))
    log_json = env.bool("LOG_JSON", False)
    metrics_port = env.int("METRICS_PORT", None, validate=Range(min=1, max=65535))
    rate_limit = env.float("CGB_RATE_LIMIT", 10.0, validate=non_negative)
    d = WorkerOptions()
    worker_values = {
        name: (env.int if cast is int else env.float)(var, getattr(d, name), validate=Range(min=low, max=high))
        for name, (var, cast, low, high) in WORKER_VARIABLES.items()
    }

    problems: list[str] = []
    try:
        env.seal()
    except environs.EnvValidationError as exc:
        errors = exc.error_messages
        for name, messages in errors.items() if isinstance(errors, Mapping) else [("?", errors)]:
            problems.extend(f"{name}: {m}" for m in _flatten(messages))

    if api_key is not None and not api_key.strip():
        problems.append("CGB_API_KEY: must not be empty.")
    if api_url is not None and urlsplit(api_url).scheme not in ("http", "https"):
        problems.append("CGB_API_URL: must be an http:// or https:// URL.")
    if redis_url is not None and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        problems.append("REDIS_URL: must be a redis://, rediss:// or unix:// URL.")
    if default_region is not None:
        default_region = default_region.strip().upper()
        if default_region not in phonenumbers.SUPPORTED_REGIONS:
            problems.append(f"CGB_DEFAULT_REGION: {default_region!r} is not an ISO 3166 region code.")
    if base_delay is not None and max_delay is not None and max_delay < base_delay:
        problems.append("CGB_RETRY_MAX_DELAY: must be at least CGB_RETRY_BASE_DELAY.")
    job_timeout = worker_values["job_timeout"]
    if timeout_ms is not None and job_timeout is not None and timeout_ms / 1000 >= job_deadline(job_timeout):
        problems.append(
            f"CGB_TIMEOUT: must be below {job_deadline(job_timeout):g} s (WORKER_JOB_TIMEOUT less its margin), "
            "or a slow CGB would become a job timeout that arq never retries."
        )

    templates: dict[str, str] = {}
    for name, value in sorted(source.items()):
        if not name.startswith(TEMPLATE_PREFIX) or name in _NOT_TEMPLATES:
            continue
        template = name[len(TEMPLATE_PREFIX) :].lower()
        flow_id = value.strip()
        if not template:
            problems.append(f"{name}: names no template.")
        elif not flow_id.isdigit():
            problems.append(f"{name}: flow id must be digits, got {value!r}.")
        else:
            templates[template] = flow_id

    if problems:
        raise ConfigError(problems)
    # environs returns None for a value it rejected; we only get here when it rejected none.
    assert api_key is not None
    assert api_url is not None
    assert redis_url is not None
    assert timeout_ms is not None
    assert retry_attempts is not None
    assert base_delay is not None
    assert max_delay is not None
    assert cache_timeout is not None
    assert template_cache_timeout is not None
    return Settings(
        api_key=Secret(api_key.strip()),
        api_url=api_url.rstrip("/"),
        timeout=timeout_ms / 1000,
        retry_attempts=retry_attempts,
        retry_base_delay=base_delay,
        retry_max_delay=max_delay,
        cache_timeout=cache_timeout,
        template_cache_timeout=template_cache_timeout,
        templates=MappingProxyType(templates),
        default_region=default_region or None,
        redis_url=redis_url,
        unknown_outcome=str(unknown_outcome),
        dead_letter_max=int(dead_letter_max or 0),
        log_level=str(log_level),
        log_json=bool(log_json),
        metrics_port=metrics_port,
        rate_limit=float(rate_limit or 0.0),
        worker=WorkerOptions(**worker_values),
    )


def _flatten(messages: Any) -> list[str]:
    if isinstance(messages, str):
        return [messages]
    if isinstance(messages, Mapping):
        return [m for v in messages.values() for m in _flatten(v)]
    return [m for v in messages for m in _flatten(v)]


def peek_worker_options(environ: Mapping[str, str] | None = None) -> tuple[str, WorkerOptions]:
    """``REDIS_URL`` and the ``WORKER_*`` knobs, read leniently when the worker module is imported.

    arq takes these from class attributes before ``on_startup`` runs, so they are read at import, with a
    default for anything missing or malformed; :func:`load_settings` at start-up reports those problems
    and refuses to start. A producer importing the package needs no worker configuration at all.
    """
    source = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, (var, cast, low, high) in WORKER_VARIABLES.items():
        try:
            value = cast(source[var])
        except (KeyError, ValueError):
            continue
        if low <= value and (high is None or value <= high):
            values[name] = value
    return source.get("REDIS_URL", "redis://localhost:6379/0"), WorkerOptions(**values)
