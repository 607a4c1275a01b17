"""Configuration: read once from a mapping of variables (the process environment) into a frozen :class:`Settings`.

Every bad or missing variable is collected and reported together in one :class:`ConfigError`, so an
operator fixes a deployment in one round. The mapping is read as given: ``os.environ`` is never replaced
or written, so a caller reading another mapping leaves the process, and its threads, alone.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import urlsplit

import environs
import phonenumbers
from marshmallow.validate import OneOf, Range

from .catalog import TemplateCatalog, load_catalog
from .connection import DEFAULT_REDIS_URL as DEFAULT_REDIS_URL
from .connection import RedisConfig, read_redis_config
from .connection import parse_redis_url as parse_redis_url
from .connection import redact_url as redact_url
from .errors import ConfigError
from .keys import PHONE_KEY_MIN
from .models import CATEGORIES, Category
from .quiet import QuietHours, parse_quiet_hours
from .suppression import DEFAULT_OPT_IN, DEFAULT_OPT_OUT, parse_keywords

DEFAULT_API_URL = "https://app.chatgptbuilder.io/api"
DEFAULT_REDIS_CONNECT_TIMEOUT = 60.0
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


VARIABLES: Mapping[str, str] = MappingProxyType(
    {
        # the worker (load_settings); the CLI reads the same ones
        "CGB_API_URL": "worker",
        "CGB_API_KEY": "worker",
        "CGB_TIMEOUT": "worker",
        "CGB_RETRY_ATTEMPTS": "worker",
        "CGB_RETRY_BASE_DELAY": "worker",
        "CGB_RETRY_MAX_DELAY": "worker",
        "CGB_CACHE_TIMEOUT": "worker",
        "CGB_TEMPLATE_CACHE_TIMEOUT": "worker",
        "CGB_DEFAULT_REGION": "worker, cli, console",
        "CGB_UNKNOWN_OUTCOME": "worker",
        "CGB_OUTSIDE_WINDOW": "worker",
        "CGB_RATE_LIMIT": "worker",
        "DEAD_LETTER_MAX": "worker",
        "STATUS_TURN_WAIT": "worker",
        "LOG_DIAGNOSE": "worker",
        "METRICS_PORT": "worker",
        "WA_TEMPLATES_FILE": "worker, cli",
        "QUIET_HOURS": "worker",
        "QUIET_HOURS_CATEGORIES": "worker",
        "WORKER_MAX_JOBS": "worker",
        "WORKER_POLL_DELAY": "worker",
        "WORKER_JOB_TIMEOUT": "worker",
        "WORKER_HEALTH_CHECK_INTERVAL": "worker",
        "WORKER_JOB_COMPLETION_WAIT": "worker",
        "WORKER_KEEP_RESULT": "worker",
        # both, and the CLI
        "PHONE_HASH_KEY": "worker, receiver, cli",
        "REDIS_URL": "worker, receiver, cli",
        "REDIS_CONNECT_TIMEOUT": "worker, receiver, cli",
        "REDIS_SENTINELS": "worker, receiver, cli",
        "REDIS_SENTINEL_MASTER": "worker, receiver, cli",
        "STATUS_CLOCK_SKEW": "worker, receiver",
        "LOG_LEVEL": "worker, receiver",
        "LOG_JSON": "worker, receiver",
        # the webhook receiver (load_receiver_settings)
        "WABA_APP_SECRET": "receiver",
        "WABA_VERIFY_TOKEN": "receiver",
        "WEBHOOK_HOST": "receiver",
        "WEBHOOK_PORT": "receiver",
        "WEBHOOK_ADMIN_HOST": "receiver",
        "WEBHOOK_ADMIN_PORT": "receiver",
        "WEBHOOK_ROLE": "receiver",
        "WEBHOOK_CONSUMER": "receiver",
        "WEBHOOK_MAX_BODY": "receiver",
        "WEBHOOK_REDIS_TIMEOUT": "receiver",
        "WEBHOOK_READ_TIMEOUT": "receiver",
        "WEBHOOK_MAX_CONNECTIONS": "receiver",
        "WEBHOOK_READ_MEMORY": "receiver",
        "WEBHOOK_INBOX_MAX": "receiver",
        "WEBHOOK_MAX_LAG": "receiver",
        "WEBHOOK_DIAGNOSTICS_TTL": "receiver",
        "STATUS_MATCH_WINDOW": "receiver",
        "STATUS_UNCONFIRMED_AFTER": "receiver, cli",
        "STATUS_HOLD": "receiver",
        "DELIVERY_STREAM_MAX": "receiver",
        "WA_RESEND_DELAY": "receiver",
        "WA_RESEND_FACTOR": "receiver",
        "WA_RESEND_MAX": "receiver",
        "MARKETING_CAP_RETRY_AFTER": "receiver",
        "UNDELIVERABLE_TTL": "receiver",
        "OPT_OUT_KEYWORDS": "receiver",
        "OPT_IN_KEYWORDS": "receiver",
        # the operations console (load_console_settings)
        "CONSOLE_HOST": "console",
        "CONSOLE_PORT": "console",
        "CONSOLE_TOKEN": "console",
        # the tests' own (tests/conftest.py, container/test_image.py); known, so a developer's shell is not warned
        "CGB_TEST_REDIS_URL": "tests",
        "CGB_IMAGE": "tests",
        "CONSOLE_SCREENSHOTS": "tests",
    }
)
"""Every variable cgb-worker reads, and which processes read it (the simulator reads none: it takes options).
``CGB_TEMPLATE_<NAME>`` is the one family beyond these. A test records every name the loaders ask for and
fails on one missing here; a variable under one of :data:`PREFIXES` that is not here is warned about."""

PREFIXES = tuple(sorted({name.split("_")[0] + "_" for name in VARIABLES}))
"""The first word of every known variable: a name under one of these that is not known is likely a typo."""

_CLUSTER_LINK = re.compile(r"_SERVICE_(HOST|PORT)(_|$)|_PORT_\d+_(TCP|UDP|SCTP)(_|$)")
"""What Kubernetes (and docker's old links) put in a container's environment for a service named ``redis`` or
``worker``: ``REDIS_SERVICE_HOST``, ``REDIS_PORT_6379_TCP_ADDR``, and ``REDIS_PORT=tcp://...`` (checked apart)."""

_REDIS_PARTS = ("HOST", "PORT", "PASSWORD", "USER", "USERNAME", "DB", "DATABASE", "SSL", "TLS")


def unknown_variables(source: Mapping[str, str]) -> list[str]:
    """A warning for each variable under :data:`PREFIXES` that cgb-worker does not read, naming the closest known
    one. Only names are shown: a value may be a secret."""
    warnings = []
    for name in sorted(source):
        if name in VARIABLES or not name.startswith(PREFIXES) or name.startswith(TEMPLATE_PREFIX):
            continue
        if _CLUSTER_LINK.search(name) or (name.endswith("_PORT") and source[name].startswith(("tcp://", "udp://"))):
            continue
        close = difflib.get_close_matches(name, VARIABLES, n=1, cutoff=0.8)
        if close:
            warnings.append(f"{name} is not a setting; did you mean {close[0]}?")
        elif name.startswith("REDIS_") and name[len("REDIS_") :] in _REDIS_PARTS:
            warnings.append(
                f"{name} is not a setting; Redis's host, port, database, user, password and TLS all go in "
                "REDIS_URL (rediss://user:password@host:6380/0)."
            )
        else:
            warnings.append(f"{name} is not a setting (.env.sample lists every variable); it is ignored.")
    return warnings


def _setting_like(name: str) -> str | None:
    """The known variable a ``CGB_TEMPLATE_<NAME>`` was probably meant to be, or None: the whole name is close to
    one (``CGB_TEMPLATE_CACHE_TIMOUT``), or its template name is one's own (``CGB_TEMPLATE_RATE_LIMIT``)."""
    tail = name[len(TEMPLATE_PREFIX) :]
    best, best_ratio = None, 0.0
    for known in VARIABLES:
        own = known.removeprefix(TEMPLATE_PREFIX).removeprefix("CGB_")
        for a, b in ((name, known), (tail, own)):
            ratio = difflib.SequenceMatcher(None, a, b).ratio()
            if ratio > best_ratio:
                best, best_ratio = known, ratio
    return best if best_ratio >= 0.85 else None


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_UNIT_NAMES = {"ms": "milliseconds", "s": "seconds", "d": "days"}


def parse_duration(text: str, unit: str = "s") -> float:
    """``text`` as a number of ``unit``: a bare number is already in it (``CGB_TIMEOUT`` in milliseconds, most
    others in seconds), one with a unit (``500ms``, ``30s``, ``1.5s``, ``5m``, ``1h``, ``7d``) is converted.
    Raises ValueError, saying what is accepted."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"Not a valid duration: a number of {_UNIT_NAMES[unit]}, or one with a unit (500ms, 30s, 5m, 1h, 1d)."
        )
    number, given = float(match.group(1)), (match.group(2) or unit).lower()
    return number * DURATION_UNITS[given] / DURATION_UNITS[unit]


def _duration(value: Any, *, unit: str = "s", whole: bool = False, validate: Any = None) -> float | int:
    """environs' parser for a duration variable (``env.duration``); a default passes through as it is."""
    if not isinstance(value, str):
        return cast("float | int", value)
    try:
        parsed = parse_duration(value, unit)
    except ValueError as exc:
        raise environs.EnvError(str(exc)) from None
    result: float | int = parsed
    if whole:
        if not parsed.is_integer():
            raise environs.EnvError(f"Not a whole number of {_UNIT_NAMES[unit]}.")
        result = int(parsed)
    if validate is not None:
        validate(result)
    return result


def listen_problem(what: str, host: str, port: int, exc: OSError) -> str:
    """One line for a port that cannot be listened on, naming the variable (or option) that chose it."""
    if exc.errno == errno.EADDRINUSE:
        return f"{what} {port} is in use ({host}:{port}: another process listens there)"
    return f"{what} {port} cannot be listened on ({host}:{port}: {exc.strerror or exc})"


MAX_RETRY_ATTEMPTS = 100


def job_deadline(job_timeout: float) -> float:
    """Seconds a try may run before it stops itself: a margin (30 s, or a quarter of a short timeout) below
    arq's ``job_timeout``, whose expiry arq never retries."""
    return job_timeout - min(30.0, job_timeout / 4)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """arq's own knobs, for a network-bound job under a fleet-wide rate limit; each is a ``WORKER_*`` variable.

    * ``max_jobs``: jobs at once per worker. With the rate limit on, a job waits in its slot for its turn,
      so more slots than the rate can use only wait, and arq's every poll re-checks each running job in
      Redis (four commands apiece): the default is twice ``CGB_RATE_LIMIT`` (two seconds of turns), from 10
      to 100; 100 with the limit off (arq's 10 caps a worker at about 20 sends a second on a 100 ms API).
    * ``poll_delay`` 0.02 s: arq fills a free slot only on its next poll, so this bounds the wait from
      enqueue to start on an idle queue. An idle worker pays one small Redis read per poll.
    * ``job_timeout`` 15 s: arq locks a running job for this plus 10 s and never renews the lock, so a
      killed worker's jobs run again elsewhere within 25 s. Each try stops itself earlier (its deadline,
      :func:`job_deadline`) and is retried, so arq's own timeout, which arq never retries, is not reached.
    * ``health_check_interval`` 10 s: the worker's heartbeat is rewritten this often and lives three times as
      long (:mod:`cgb_worker.heartbeat`); ``arq --check`` notices a dead worker within that (plus one).
    * ``job_completion_wait`` 20 s: on SIGTERM, running jobs get this long to finish before being
      cancelled (and re-run elsewhere); above ``job_timeout``, below a container's stop grace period.
    * ``keep_result`` 86400 s: how long ``Job.result()`` can be read, and how long an enqueue with the
      same ``_job_id`` is refused.
    """

    max_jobs: int = 100
    poll_delay: float = 0.02
    job_timeout: int = 15
    health_check_interval: int = 10
    job_completion_wait: int = 20
    keep_result: int = 86400


def default_max_jobs(rate_limit: float) -> int:
    """``WORKER_MAX_JOBS`` when it is not set: two seconds of the rate limit's turns, from 10 to 100."""
    if rate_limit <= 0:
        return 100
    return max(10, min(100, math.ceil(rate_limit * 2)))


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
    phone_hash_key: Secret
    """``PHONE_HASH_KEY``: what phones are hashed under in Redis (:func:`cgb_worker.keys.who`); as the receiver's."""
    api_url: str = DEFAULT_API_URL
    timeout: float = 5.0
    """Per-request timeout to CGB in seconds (``CGB_TIMEOUT`` is in milliseconds)."""
    retry_attempts: int = 10
    retry_base_delay: float = 2.0
    retry_max_delay: float = 300.0
    cache_timeout: int = 3600
    template_cache_timeout: int = 86400
    templates: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Template name (lower case) to CGB flow id, from ``CGB_TEMPLATE_<NAME>``."""
    default_region: str | None = None
    redis: RedisConfig = field(default_factory=RedisConfig)
    """``REDIS_URL``, ``REDIS_SENTINELS``, ``REDIS_SENTINEL_MASTER`` (:mod:`cgb_worker.connection`)."""
    redis_connect_timeout: float = DEFAULT_REDIS_CONNECT_TIMEOUT
    """``REDIS_CONNECT_TIMEOUT``: seconds a starting process waits for Redis, saying so, before it gives up."""
    unknown_outcome: str = "resend"
    """What a retry does when an earlier attempt's send may have gone out: ``resend`` or ``fail``."""
    outside_window: str = "send"
    """Free text or a file to a contact whose 24-hour window is known to be closed: ``send`` it anyway (CGB
    says success, WhatsApp drops it with 131047), or ``fail`` at once with ``OutsideWindowError``."""
    dead_letter_max: int = 10000
    turn_wait: float = 10.0
    """``STATUS_TURN_WAIT``: seconds after CGB's answer (past ``CGB_TIMEOUT`` from the request) that a send keeps
    its person's turn when no status places it; a flow keeps it that long in any case (:mod:`cgb_worker.sends`)."""
    clock_skew: float = 2.0
    """``STATUS_CLOCK_SKEW``, as the receiver has it: a flow keeps its person's turn twice this long past the
    time its messages may be matched, so that the next message's statuses cannot be confused with its own."""
    log_level: str = "INFO"
    log_json: bool = False
    log_diagnose: bool = False
    rate_limit: float = 10.0
    """Requests per second to CGB across every worker on this Redis; 0: no limit."""
    wa_templates: TemplateCatalog | None = None
    """The account's approved WhatsApp templates, from ``WA_TEMPLATES_FILE``; None: sent unchecked."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (all interfaces); None: no metrics server."""
    quiet_hours: QuietHours | None = None
    """``QUIET_HOURS``: the recipient's local hours in which jobs of ``quiet_categories`` wait; None: off."""
    quiet_categories: frozenset[Category] = frozenset({"marketing"})
    """``QUIET_HOURS_CATEGORIES``: the categories quiet hours apply to."""
    worker: WorkerOptions = field(default_factory=WorkerOptions)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """What in the configuration is suspect but not wrong (an unknown variable, ``CGB_TIMEOUT=5``), one line each;
    logged once logging is set up. Names only: no value that could be a secret."""

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "warnings"}
        shown["templates"] = dict(self.templates)  # the key is a Secret, and RedisConfig hides its password
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def redis_url(self) -> str:
        return self.redis.url


EMPTY_IS_A_VALUE = frozenset({"OPT_OUT_KEYWORDS", "OPT_IN_KEYWORDS", "CGB_API_KEY", "WABA_APP_SECRET"})
"""Variables an empty value means something for (no keywords: that feed off; an empty secret is named as such);
every other empty one is unset."""


class _MappingEnv(environs.Env):
    """environs, reading the given mapping instead of ``os.environ`` (its one lookup, ``_get_value``; a
    test pins that nothing else is read)."""

    def __init__(self, source: Mapping[str, str]) -> None:
        super().__init__(eager=False)
        self._source = source
        self.add_parser("duration_value", _duration)

    def duration(self, name: str, default: float, *, unit: str = "s", whole: bool = False, validate: Any = None) -> Any:
        """A duration (:func:`parse_duration`): a bare number in ``unit``, or one with its own unit; ``whole``
        for a value that must be a whole number of ``unit``."""
        return self.__custom_parsers__["duration_value"](self, name, default, unit=unit, whole=whole, validate=validate)

    def _get_value(self, env_key: str, default: Any) -> Any:
        value = self._source.get(env_key, default)
        if isinstance(value, str) and not value.strip() and env_key not in EMPTY_IS_A_VALUE:
            return default  # `METRICS_PORT=` (as .env.sample ships it, or compose passes it) is not set
        return value


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check every variable in ``environ`` (default: ``os.environ``, read, never changed); raise
    one :class:`ConfigError` listing all problems."""
    return _read(os.environ if environ is None else environ)


def phone_key_problem(value: str | None) -> str | None:
    """What is wrong with ``PHONE_HASH_KEY``, as one configuration line, or None."""
    if value is None or not value.strip():
        return "PHONE_HASH_KEY: required (a random secret shared by workers and receivers: openssl rand -hex 32)."
    if len(value.strip()) < PHONE_KEY_MIN:
        return f"PHONE_HASH_KEY: must have at least {PHONE_KEY_MIN} characters."
    return None


def load_phone_key(environ: Mapping[str, str] | None = None) -> Secret:
    """``PHONE_HASH_KEY`` alone, for a command that hashes phones without the rest of the configuration."""
    value = (os.environ if environ is None else environ).get("PHONE_HASH_KEY")
    if problem := phone_key_problem(value):
        raise ConfigError([problem])
    assert value is not None
    return Secret(value.strip())


def _read(source: Mapping[str, str]) -> Settings:
    env = _MappingEnv(source)
    positive = Range(min=0, min_inclusive=False)
    non_negative = Range(min=0)

    api_url = env.str("CGB_API_URL", DEFAULT_API_URL)
    api_key = env.str("CGB_API_KEY")
    timeout_ms = env.duration("CGB_TIMEOUT", 5000.0, unit="ms", validate=positive)
    retry_attempts = env.int("CGB_RETRY_ATTEMPTS", 10, validate=Range(min=0, max=MAX_RETRY_ATTEMPTS))
    base_delay = env.duration("CGB_RETRY_BASE_DELAY", 2.0, validate=positive)
    max_delay = env.duration("CGB_RETRY_MAX_DELAY", 300.0, validate=positive)
    cache_timeout = env.duration("CGB_CACHE_TIMEOUT", 3600, whole=True, validate=positive)
    template_cache_timeout = env.duration("CGB_TEMPLATE_CACHE_TIMEOUT", 86400, whole=True, validate=positive)
    default_region = env.str("CGB_DEFAULT_REGION", None)
    connect_timeout = _connect_timeout(env)
    unknown_outcome = env.str("CGB_UNKNOWN_OUTCOME", "resend", validate=OneOf(["resend", "fail"]))
    outside_window = env.str("CGB_OUTSIDE_WINDOW", "send", validate=OneOf(["send", "fail"]))
    dead_letter_max = env.int("DEAD_LETTER_MAX", 10000, validate=positive)
    turn_wait = env.duration("STATUS_TURN_WAIT", 10.0, validate=Range(min=0, max=3600))
    clock_skew = env.duration("STATUS_CLOCK_SKEW", 2.0, validate=Range(min=0, max=600))
    log_level = _log_level(env)
    log_json = env.bool("LOG_JSON", False)
    log_diagnose = env.bool("LOG_DIAGNOSE", False)
    metrics_port = env.int("METRICS_PORT", None, validate=Range(min=1, max=65535))
    rate_limit = env.float("CGB_RATE_LIMIT", 10.0, validate=non_negative)
    wa_templates_file = env.str("WA_TEMPLATES_FILE", None)
    quiet_text = env.str("QUIET_HOURS", "")
    quiet_categories_text = env.str("QUIET_HOURS_CATEGORIES", "marketing")
    d = WorkerOptions()
    worker_values = {
        name: env.int(var, getattr(d, name), validate=Range(min=low, max=high))
        if name == "max_jobs"
        else env.duration(var, getattr(d, name), whole=cast is int, validate=Range(min=low, max=high))
        for name, (var, cast, low, high) in WORKER_VARIABLES.items()
    }
    if "WORKER_MAX_JOBS" not in source and rate_limit is not None:
        worker_values["max_jobs"] = default_max_jobs(rate_limit)

    problems = _sealed(env)
    warnings = unknown_variables(source)
    bare_timeout = (source.get("CGB_TIMEOUT") or "").strip()
    if (bare := _DURATION.fullmatch(bare_timeout)) and bare.group(2) is None and float(bare.group(1)) < 100:
        warnings.append(f"CGB_TIMEOUT={bare_timeout} is {bare_timeout} ms; write {bare_timeout}s for seconds.")

    if api_key is not None and not api_key.strip():
        problems.append("CGB_API_KEY: must not be empty.")
    if problem := phone_key_problem(source.get("PHONE_HASH_KEY")):
        problems.append(problem)
    if api_url is not None and urlsplit(api_url).scheme not in ("http", "https"):
        problems.append("CGB_API_URL: must be an http:// or https:// URL.")
    redis, redis_problems = read_redis_config(source)
    problems.extend(redis_problems)
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

    quiet_hours: QuietHours | None = None
    if quiet_text and quiet_text.strip():
        try:
            quiet_hours = parse_quiet_hours(quiet_text)
        except ValueError as exc:
            problems.append(f"QUIET_HOURS: {exc}")
    quiet_categories, problem = parse_categories(quiet_categories_text or "")
    if problem:
        problems.append(f"QUIET_HOURS_CATEGORIES: {problem}")

    wa_templates: TemplateCatalog | None = None
    if wa_templates_file:
        try:
            wa_templates = load_catalog(wa_templates_file)
        except ConfigError as exc:
            problems.extend(exc.problems)

    templates: dict[str, str] = {}
    for name, value in sorted(source.items()):
        if not name.startswith(TEMPLATE_PREFIX) or name in _NOT_TEMPLATES:
            continue
        template = name[len(TEMPLATE_PREFIX) :].lower()
        flow_id = value.strip()
        meant = _setting_like(name) if template else None
        if not template:
            problems.append(f"{name}: names no template.")
        elif not flow_id.isdigit():
            looks = "; that looks like a duration, not a flow id" if _DURATION.fullmatch(flow_id) else ""
            guess = f"; did you mean {meant}?" if meant else "."
            problems.append(
                f"{name}: flow id must be digits (CGB_TEMPLATE_<NAME> maps a template to a flow){looks}{guess}"
            )
        else:
            templates[template] = flow_id
            if meant:
                warnings.append(f"{name} maps a template named {template!r} to a CGB flow; did you mean {meant}?")

    if problems:
        raise ConfigError(problems)
    # environs returns None for a value it rejected; we only get here when it rejected none.
    assert api_key is not None
    assert api_url is not None
    assert redis is not None
    assert timeout_ms is not None
    assert retry_attempts is not None
    assert base_delay is not None
    assert max_delay is not None
    assert cache_timeout is not None
    assert template_cache_timeout is not None
    return Settings(
        api_key=Secret(api_key.strip()),
        phone_hash_key=Secret(source["PHONE_HASH_KEY"].strip()),
        api_url=api_url.rstrip("/"),
        timeout=timeout_ms / 1000,
        retry_attempts=retry_attempts,
        retry_base_delay=base_delay,
        retry_max_delay=max_delay,
        cache_timeout=cache_timeout,
        template_cache_timeout=template_cache_timeout,
        templates=MappingProxyType(templates),
        default_region=default_region or None,
        redis=redis,
        redis_connect_timeout=float(connect_timeout if connect_timeout is not None else DEFAULT_REDIS_CONNECT_TIMEOUT),
        unknown_outcome=str(unknown_outcome),
        outside_window=str(outside_window),
        dead_letter_max=int(dead_letter_max or 0),
        turn_wait=float(turn_wait if turn_wait is not None else 10.0),
        clock_skew=float(clock_skew if clock_skew is not None else 2.0),
        log_level=str(log_level).strip().upper(),
        log_json=bool(log_json),
        log_diagnose=bool(log_diagnose),
        metrics_port=metrics_port,
        rate_limit=float(rate_limit or 0.0),
        wa_templates=wa_templates,
        quiet_hours=quiet_hours,
        quiet_categories=quiet_categories,
        worker=WorkerOptions(**worker_values),
        warnings=tuple(warnings),
    )


def parse_categories(text: str) -> tuple[frozenset[Category], str | None]:
    """A comma list of message categories (case and spaces ignored), and what is wrong with it, or None."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CATEGORIES]
    if unknown:
        return frozenset(), f"{', '.join(repr(n[:40]) for n in unknown)}: the categories are {', '.join(CATEGORIES)}."
    if not names:
        return frozenset(), f"names no category (of {', '.join(CATEGORIES)}); leave QUIET_HOURS unset to turn it off."
    return frozenset(cast("list[Category]", names)), None


LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(env: environs.Env) -> str | None:
    """``LOG_LEVEL``, in any case (``info`` is ``INFO``); the upper-cased value is what is kept."""
    return cast(
        "str | None",
        env.str(
            "LOG_LEVEL",
            "INFO",
            validate=lambda v: OneOf(LOG_LEVELS, error="Must be one of: {choices}.")(v.strip().upper()),
        ),
    )


def _connect_timeout(env: environs.Env) -> float | None:
    """``REDIS_CONNECT_TIMEOUT``: a duration (bare: seconds), 0 (one attempt) to an hour."""
    return cast(
        "float | None",
        env.duration("REDIS_CONNECT_TIMEOUT", DEFAULT_REDIS_CONNECT_TIMEOUT, validate=Range(min=0, max=3600)),
    )


def load_connect_timeout(environ: Mapping[str, str] | None = None) -> float:
    """``REDIS_CONNECT_TIMEOUT`` alone, for a command that reads only ``REDIS_URL``; :class:`ConfigError` if bad."""
    env = _MappingEnv(os.environ if environ is None else environ)
    value = _connect_timeout(env)
    if problems := _sealed(env):
        raise ConfigError(problems)
    return float(value if value is not None else DEFAULT_REDIS_CONNECT_TIMEOUT)


def _sealed(env: environs.Env) -> list[str]:
    """Every problem environs found with the variables read so far, one line each."""
    try:
        env.seal()
    except environs.EnvValidationError as exc:
        errors = exc.error_messages
        items = errors.items() if isinstance(errors, Mapping) else [("?", errors)]
        return [f"{name}: {m}" for name, messages in items for m in _flatten(messages)]
    return []


def _flatten(messages: Any) -> list[str]:
    if isinstance(messages, str):
        return [messages]
    if isinstance(messages, Mapping):
        return [m for v in messages.values() for m in _flatten(v)]
    return [m for v in messages for m in _flatten(v)]


@dataclass(frozen=True, slots=True)
class ReactionSettings:
    """How the receiver reacts to WhatsApp's error codes (:mod:`cgb_worker.whatsapp_errors`)."""

    resend_delay: float = 6.0
    """``WA_RESEND_DELAY``: seconds before the first automatic resend of a step WhatsApp failed with 131056 (or a
    throughput code); each further one waits ``WA_RESEND_FACTOR`` times longer."""
    resend_factor: float = 4.0
    """``WA_RESEND_FACTOR``."""
    resend_max: int = 3
    """``WA_RESEND_MAX``: automatic resends of one step at most; 0 turns them off."""
    marketing_cap_retry_after: float = 0.0
    """``MARKETING_CAP_RETRY_AFTER``: seconds after a 131049 (the per-person marketing cap) to send the step once
    more; 0 (the default) never sends it again."""
    undeliverable_ttl: float = 86400.0
    """``UNDELIVERABLE_TTL``: seconds a number WhatsApp failed with 131026 is refused (``UndeliverableError``)."""


@dataclass(frozen=True, slots=True)
class ReceiverSettings:
    """``cgb-worker webhooks``: what the WhatsApp webhook receiver is configured with
    (:func:`load_receiver_settings`). It needs no CGB key: it talks only to Meta and Redis."""

    app_secret: Secret
    """``WABA_APP_SECRET``: the Meta app's secret, which signs every webhook (``X-Hub-Signature-256``)."""
    phone_hash_key: Secret
    """``PHONE_HASH_KEY``: the workers' own, or statuses cannot be matched to their sends."""
    verify_token: Secret | None = None
    """``WABA_VERIFY_TOKEN``: what Meta's subscription handshake must present; None refuses every handshake."""
    redis: RedisConfig = field(default_factory=RedisConfig)
    """``REDIS_URL``, ``REDIS_SENTINELS``, ``REDIS_SENTINEL_MASTER`` (:mod:`cgb_worker.connection`)."""
    redis_connect_timeout: float = DEFAULT_REDIS_CONNECT_TIMEOUT
    """``REDIS_CONNECT_TIMEOUT``, as the worker's."""
    host: str = "0.0.0.0"  # noqa: S104 - Meta posts from outside the container
    port: int = 8090
    match_window: float = 600.0
    """``STATUS_MATCH_WINDOW``: seconds after its request within which Meta stamps a message's ``sent``."""
    unconfirmed_after: float = 86400.0
    """``STATUS_UNCONFIRMED_AFTER``: seconds after which a send with no status at all is ``unconfirmed``."""
    stream_max: int = 100000
    """``DELIVERY_STREAM_MAX``: the ``cgb:deliveries`` stream is trimmed to about this many entries."""
    clock_skew: float = 2.0
    """``STATUS_CLOCK_SKEW``: seconds a status's own timestamp may be before the request that sent its message
    (Meta's whole seconds, and the hosts' clocks); give workers the same value."""
    hold: float = 300.0
    """``STATUS_HOLD``: seconds a status that cannot be placed yet is held and tried again before it is kept as
    unmatched."""
    consumer: str = ""
    """``WEBHOOK_CONSUMER``: this receiver's name in the inbox's consumer group; a receiver restarted under the
    same name takes up what it had in hand at once (default: host name and process id)."""
    log_level: str = "INFO"
    log_json: bool = False
    role: str = "all"
    """``WEBHOOK_ROLE``: ``all`` answers Meta and processes what it stores; ``answer`` only answers (a public-facing
    process of a split deployment), ``process`` only processes (no public port)."""
    # The public port's limits (README, "On the internet").
    admin_host: str = "127.0.0.1"
    """``WEBHOOK_ADMIN_HOST``/``WEBHOOK_ADMIN_PORT``: where ``/healthz`` and ``/metrics`` are served, apart from the
    public port, which serves only the webhook."""
    admin_port: int = 9090
    max_body: int = 3 * 1024 * 1024
    """``WEBHOOK_MAX_BODY``: bytes; Meta documents webhook payloads of up to 3 MB."""
    redis_timeout: float = 2.0
    """``WEBHOOK_REDIS_TIMEOUT``: seconds any Redis call may take before a POST is answered 503 (Meta retries) and
    ``/healthz`` fails."""
    read_timeout: float = 10.0
    """``WEBHOOK_READ_TIMEOUT``: seconds a client has to send a request's headers, and again its body."""
    max_connections: int = 512
    """``WEBHOOK_MAX_CONNECTIONS``: open connections on the public port at once; more are closed as they come
    (and never more than the process's file limit allows)."""
    inbox_max: int = 1_000_000
    """``WEBHOOK_INBOX_MAX``: stored webhooks not yet processed; over it, POSTs are answered 503 (Meta retries)."""
    read_memory: int = 64 * 1024 * 1024
    """``WEBHOOK_READ_MEMORY``: bytes of request bodies being read at once; a body that cannot be given room
    within a second is answered 503."""
    max_lag: float = 60.0
    """``WEBHOOK_MAX_LAG``: seconds the oldest unprocessed webhook may wait before the receiver is unhealthy."""
    diagnostics_ttl: float = 7.0
    """``WEBHOOK_DIAGNOSTICS_TTL``: days the malformed and unmatched streams keep an entry."""
    reactions: ReactionSettings = ReactionSettings()
    opt_out_keywords: frozenset[str] = frozenset({"stop", "unsubscribe"})
    """``OPT_OUT_KEYWORDS``: an inbound text that is wholly one of these (compared as
    :func:`~cgb_worker.suppression.normalize_keyword` makes it) suppresses the person for every category but
    ``authentication``; empty: off."""
    opt_in_keywords: frozenset[str] = frozenset({"start", "subscribe"})
    """``OPT_IN_KEYWORDS``: one of these lifts what the person's own opt-outs put on the list; empty: off."""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """As :attr:`Settings.warnings`: unknown variables, logged once logging is set up."""

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "warnings"}
        return "ReceiverSettings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def redis_url(self) -> str:
        return self.redis.url


def load_receiver_settings(environ: Mapping[str, str] | None = None) -> ReceiverSettings:
    """Read and check the receiver's variables; one :class:`ConfigError` lists every problem."""
    source = os.environ if environ is None else environ
    env = _MappingEnv(source)
    positive = Range(min=0, min_inclusive=False)
    app_secret = env.str("WABA_APP_SECRET")
    verify_token = env.str("WABA_VERIFY_TOKEN", None)
    connect_timeout = _connect_timeout(env)
    host = env.str("WEBHOOK_HOST", "0.0.0.0")  # noqa: S104
    port = env.int("WEBHOOK_PORT", 8090, validate=Range(min=1, max=65535))
    match_window = env.duration("STATUS_MATCH_WINDOW", 600.0, validate=positive)
    unconfirmed_after = env.duration("STATUS_UNCONFIRMED_AFTER", 86400.0, validate=positive)
    stream_max = env.int("DELIVERY_STREAM_MAX", 100000, validate=Range(min=100))
    clock_skew = env.duration("STATUS_CLOCK_SKEW", 2.0, validate=Range(min=0, max=600))
    hold = env.duration("STATUS_HOLD", 300.0, validate=positive)
    consumer = env.str("WEBHOOK_CONSUMER", "")
    log_level = _log_level(env)
    log_json = env.bool("LOG_JSON", False)
    role = env.str("WEBHOOK_ROLE", "all", validate=OneOf(["all", "answer", "process"]))
    admin_host = env.str("WEBHOOK_ADMIN_HOST", "127.0.0.1")
    admin_port = env.int("WEBHOOK_ADMIN_PORT", 9090, validate=Range(min=1, max=65535))
    max_body = env.int("WEBHOOK_MAX_BODY", 3 * 1024 * 1024, validate=Range(min=64 * 1024, max=64 * 1024 * 1024))
    redis_timeout = env.duration("WEBHOOK_REDIS_TIMEOUT", 2.0, validate=Range(min=0.1, max=60))
    read_timeout = env.duration("WEBHOOK_READ_TIMEOUT", 10.0, validate=Range(min=0.5, max=300))
    max_connections = env.int("WEBHOOK_MAX_CONNECTIONS", 512, validate=Range(min=8, max=1_000_000))
    read_memory = env.int("WEBHOOK_READ_MEMORY", 64 * 1024 * 1024, validate=Range(min=1024 * 1024))
    inbox_max = env.int("WEBHOOK_INBOX_MAX", 1_000_000, validate=Range(min=100))
    max_lag = env.duration("WEBHOOK_MAX_LAG", 60.0, validate=positive)
    diagnostics_ttl = env.duration("WEBHOOK_DIAGNOSTICS_TTL", 7.0, unit="d", validate=Range(min=0.01, max=365))
    reactions = ReactionSettings(
        resend_delay=env.duration("WA_RESEND_DELAY", 6.0, validate=Range(min=0, max=86400)) or 0.0,
        resend_factor=env.float("WA_RESEND_FACTOR", 4.0, validate=Range(min=1, max=100)) or 4.0,
        resend_max=env.int("WA_RESEND_MAX", 3, validate=Range(min=0, max=10)) or 0,
        marketing_cap_retry_after=env.duration("MARKETING_CAP_RETRY_AFTER", 0.0, validate=Range(min=0, max=30 * 86400))
        or 0.0,
        undeliverable_ttl=env.duration("UNDELIVERABLE_TTL", 86400.0, validate=Range(min=1, max=365 * 86400)) or 86400.0,
    )
    opt_out_raw = env.str("OPT_OUT_KEYWORDS", ",".join(DEFAULT_OPT_OUT))
    opt_in_raw = env.str("OPT_IN_KEYWORDS", ",".join(DEFAULT_OPT_IN))
    problems = _sealed(env)
    opt_out, problem = parse_keywords(opt_out_raw or "")
    if problem:
        problems.append(f"OPT_OUT_KEYWORDS: {problem}")
    opt_in, problem = parse_keywords(opt_in_raw or "")
    if problem:
        problems.append(f"OPT_IN_KEYWORDS: {problem}")
    if both := sorted(opt_out & opt_in):
        problems.append(f"OPT_IN_KEYWORDS: {', '.join(both)} is an opt-out keyword too; a keyword is one or the other.")
    if max_body is not None and read_memory is not None and read_memory < max_body:
        problems.append("WEBHOOK_READ_MEMORY: must be at least WEBHOOK_MAX_BODY, or no body of that size is read.")
    if port is not None and admin_port is not None and port == admin_port:
        problems.append("WEBHOOK_ADMIN_PORT: must differ from WEBHOOK_PORT; the admin port is never public.")
    if consumer and (len(consumer) > 128 or not consumer.isprintable() or " " in consumer):
        problems.append("WEBHOOK_CONSUMER: must be a name of at most 128 printable characters without spaces.")
    if app_secret is not None and not app_secret.strip():
        problems.append("WABA_APP_SECRET: must not be empty.")
    if problem := phone_key_problem(source.get("PHONE_HASH_KEY")):
        problems.append(problem)
    redis, redis_problems = read_redis_config(source)
    problems.extend(redis_problems)
    if problems:
        raise ConfigError(problems)
    assert app_secret is not None
    assert redis is not None
    return ReceiverSettings(
        app_secret=Secret(app_secret.strip()),
        phone_hash_key=Secret(source["PHONE_HASH_KEY"].strip()),
        verify_token=Secret(verify_token) if verify_token else None,
        redis=redis,
        redis_connect_timeout=float(connect_timeout if connect_timeout is not None else DEFAULT_REDIS_CONNECT_TIMEOUT),
        host=str(host),
        port=int(port or 8090),
        match_window=float(match_window or 600.0),
        unconfirmed_after=float(unconfirmed_after or 86400.0),
        stream_max=int(stream_max or 100000),
        clock_skew=float(clock_skew if clock_skew is not None else 2.0),
        hold=float(hold or 300.0),
        consumer=str(consumer or ""),
        log_level=str(log_level).strip().upper(),
        log_json=bool(log_json),
        role=str(role),
        admin_host=str(admin_host),
        admin_port=int(admin_port or 9090),
        max_body=int(max_body or 3 * 1024 * 1024),
        redis_timeout=float(redis_timeout or 2.0),
        read_timeout=float(read_timeout or 10.0),
        max_connections=int(max_connections or 512),
        read_memory=int(read_memory or 64 * 1024 * 1024),
        inbox_max=int(inbox_max or 1_000_000),
        max_lag=float(max_lag or 60.0),
        diagnostics_ttl=float(diagnostics_ttl or 7.0),
        reactions=reactions,
        opt_out_keywords=opt_out,
        opt_in_keywords=opt_in,
        warnings=tuple(unknown_variables(source)),
    )


# -- the operations console ----------------------------------------------------------------------------------

CONSOLE_TOKEN_MIN = 16
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """``cgb-worker console`` (:func:`load_console_settings`): no CGB key; Redis and the phone key only."""

    phone_hash_key: Secret
    """``PHONE_HASH_KEY``: finding a person's jobs hashes the number typed in, as the workers do."""
    token: Secret | None = None
    """``CONSOLE_TOKEN``: every page and action asks for it; without it the console serves 127.0.0.1 only."""
    host: str = "127.0.0.1"
    port: int = 8070
    redis: RedisConfig = field(default_factory=RedisConfig)
    redis_connect_timeout: float = DEFAULT_REDIS_CONNECT_TIMEOUT
    log_level: str = "INFO"
    log_json: bool = False
    default_region: str | None = None
    """``CGB_DEFAULT_REGION``: how a number typed without its country code is read, as the workers read it."""


def is_loopback(name: str) -> bool:
    """Whether ``name`` (a host name or an address, without brackets or port) is one of this machine's
    loopback names: ``localhost`` in any case, ``127.0.0.1``, ``::1`` in any spelling, each with one trailing
    dot allowed (``localhost.``)."""
    name = name.lower()
    name = name[:-1] if name.endswith(".") else name
    if name in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address in (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


def console_host(host: str) -> tuple[str, str | None]:
    """The address to listen on for ``CONSOLE_HOST`` (or ``--host``), and what is wrong with it: an IPv6
    address may be given in brackets (``[::1]``, listened on as ``::1``); any other bracket is a mistake."""
    if "[" not in host and "]" not in host:
        return host, None
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
    try:
        ipaddress.IPv6Address(inner)
    except ValueError:
        return host, (
            f"CONSOLE_HOST: {host!r} is not a host name or an address (an IPv6 address is written ::1 or [::1], "
            "without a port: that is CONSOLE_PORT)."
        )
    return inner, None


def console_bind_problem(host: str, token: Secret | None) -> str | None:
    """Why the console may not listen on ``host``: without a token, only this machine may reach it."""
    if token is None and not is_loopback(host):
        return (
            f"CONSOLE_HOST: {host} is reachable from other machines; set CONSOLE_TOKEN to serve the console there "
            "(without it the console listens on 127.0.0.1 only)."
        )
    return None


def load_console_settings(
    environ: Mapping[str, str] | None = None, *, host: str | None = None, port: int | None = None
) -> ConsoleSettings:
    """Read and check the console's variables (``host``/``port`` from the command line win over
    ``CONSOLE_HOST``/``CONSOLE_PORT``); one :class:`ConfigError` lists every problem."""
    source = os.environ if environ is None else environ
    env = _MappingEnv(source)
    token = env.str("CONSOLE_TOKEN", None)
    env_host = env.str("CONSOLE_HOST", "127.0.0.1")
    env_port = env.int("CONSOLE_PORT", 8070, validate=Range(min=1, max=65535))
    connect_timeout = _connect_timeout(env)
    log_level = _log_level(env)
    log_json = env.bool("LOG_JSON", False)
    region = (env.str("CGB_DEFAULT_REGION", "") or "").strip().upper() or None
    problems = _sealed(env)
    if region is not None and region not in phonenumbers.SUPPORTED_REGIONS:
        problems.append(f"CGB_DEFAULT_REGION: {region!r} is not a region code (such as IL or US).")
    secret: Secret | None = None
    if token is not None:
        if len(token.strip()) < CONSOLE_TOKEN_MIN:
            problems.append(
                f"CONSOLE_TOKEN: must be at least {CONSOLE_TOKEN_MIN} characters (a random one: openssl rand -hex 24)."
            )
        else:
            secret = Secret(token.strip())
    chosen_host, host_problem = console_host((host if host is not None else str(env_host or "127.0.0.1")).strip())
    if host_problem is None and token is None:
        host_problem = console_bind_problem(chosen_host, None)
    if host_problem is not None:
        problems.append(host_problem if host is None else host_problem.replace("CONSOLE_HOST:", "--host:", 1))
    if problem := phone_key_problem(source.get("PHONE_HASH_KEY")):
        problems.append(problem)
    redis, redis_problems = read_redis_config(source)
    problems.extend(redis_problems)
    if problems:
        raise ConfigError(problems)
    assert redis is not None
    return ConsoleSettings(
        phone_hash_key=Secret(source["PHONE_HASH_KEY"].strip()),
        token=secret,
        host=chosen_host,
        port=int(port if port is not None else (env_port or 8070)),
        redis=redis,
        redis_connect_timeout=float(connect_timeout if connect_timeout is not None else DEFAULT_REDIS_CONNECT_TIMEOUT),
        log_level=str(log_level or "INFO").strip().upper(),
        log_json=bool(log_json),
        default_region=region,
    )
