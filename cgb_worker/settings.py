"""Configuration: read once from the environment into a frozen :class:`Settings`.

Every bad or missing variable is collected and reported together in one :class:`ConfigError`, so an
operator fixes a deployment in one round. Nothing else in the package reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import environs
import phonenumbers
from marshmallow.validate import Range

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

    def __repr__(self) -> str:
        shown = {
            "api_url": self.api_url,
            "api_key": self.api_key,
            "timeout": self.timeout,
            "retry_attempts": self.retry_attempts,
            "retry_base_delay": self.retry_base_delay,
            "retry_max_delay": self.retry_max_delay,
            "cache_timeout": self.cache_timeout,
            "template_cache_timeout": self.template_cache_timeout,
            "templates": dict(self.templates),
            "default_region": self.default_region,
            "redis_url": redact_url(self.redis_url),
        }
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
    retry_attempts = env.int("CGB_RETRY_ATTEMPTS", 10, validate=non_negative)
    base_delay = env.float("CGB_RETRY_BASE_DELAY", 2.0, validate=positive)
    max_delay = env.float("CGB_RETRY_MAX_DELAY", 300.0, validate=positive)
    cache_timeout = env.int("CGB_CACHE_TIMEOUT", 3600, validate=positive)
    template_cache_timeout = env.int("CGB_TEMPLATE_CACHE_TIMEOUT", 86400, validate=positive)
    default_region = env.str("CGB_DEFAULT_REGION", None)
    redis_url = env.str("REDIS_URL", "redis://localhost:6379/0")

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
    )


def _flatten(messages: Any) -> list[str]:
    if isinstance(messages, str):
        return [messages]
    if isinstance(messages, Mapping):
        return [m for v in messages.values() for m in _flatten(v)]
    return [m for v in messages for m in _flatten(v)]
