"""Templates: a template name to a CGB flow, and template variables to the contact's custom fields.

WhatsApp templates are sent through CGB as flows whose first step is an approved template; its variables
are read from the contact's custom fields, so the fields are written first, then the flow is triggered.

* A name maps to a flow id through ``CGB_TEMPLATE_<NAME>`` first, else through the account's flow list
  by exact name, ignoring case and treating ``_``, ``-`` and spaces alike (never a partial match: a
  ``visa_approved`` job must not send "Visa Approved Reminder"). Two flows with the same name are an error.
* The flow and custom-field lists are cached in Redis for ``CGB_TEMPLATE_CACHE_TIMEOUT``; when a refresh
  fails, the stale copy is served (and the failure logged) rather than failing every job during a CGB blip.
* Variables are matched to custom fields by name the same way, and converted to what the field's type
  holds: numbers for Number, Unix seconds for Date and Date & Time (from ISO 8601 text or a number of
  seconds), 1/0 for Boolean, text for the rest.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import msgspec
from loguru import logger
from redis.asyncio import Redis

from . import keys
from .client import CGBClient
from .errors import CGBError, TemplateNotFoundError, UnknownVariableError
from .models import CustomField, Flow, Scalar

_T = TypeVar("_T")

TEXT, NUMBER, DATE, DATETIME, BOOLEAN = 0, 1, 2, 3, 4
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def normalize_name(name: str) -> str:
    """``Visa_Approved``, ``visa approved`` and ``visa-approved`` all become ``visa approved``."""
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower())).strip()


class _Cached(msgspec.Struct):
    at: float
    items: list[Any]


class Catalog:
    """The account's flows and custom fields, cached in Redis and refreshed once per TTL per process."""

    def __init__(self, client: CGBClient, redis: Redis, *, ttl: int) -> None:
        self._client = client
        self._redis = redis
        self._ttl = ttl
        self._refreshing: dict[str, asyncio.Task[list[Any]]] = {}

    async def flows(self) -> list[Flow]:
        return await self._get("flows", self._client.list_flows, Flow)

    async def custom_fields(self) -> list[CustomField]:
        return await self._get("custom_fields", self._client.list_custom_fields, CustomField)

    async def _get(self, name: str, fetch: Callable[[], Awaitable[list[_T]]], type_: type[_T]) -> list[_T]:
        key = keys.catalog(name)
        raw = await self._redis.get(key)
        stale: _Cached | None = msgspec.msgpack.decode(raw, type=_Cached) if raw else None
        if stale is not None and time.time() - stale.at < self._ttl:
            items = stale.items
        else:
            items = await self._refreshed(name, key, fetch, stale)
        return msgspec.convert(items, list[type_])  # type: ignore[valid-type]

    async def _refreshed(
        self, name: str, key: str, fetch: Callable[[], Awaitable[list[Any]]], stale: _Cached | None
    ) -> list[Any]:
        """A fresh copy (one fetch per process at a time), or the stale one when CGB cannot give it."""
        task = self._refreshing.get(name)
        if task is None:
            task = asyncio.ensure_future(self._refresh(key, fetch))
            self._refreshing[name] = task
            task.add_done_callback(lambda _: self._refreshing.pop(name, None))
        try:
            return await asyncio.shield(task)
        except CGBError as exc:
            if stale is None:
                raise
            logger.warning("serving a stale {} list: CGB could not refresh it ({})", name, type(exc).__name__)
            return stale.items

    async def _refresh(self, key: str, fetch: Callable[[], Awaitable[list[Any]]]) -> list[Any]:
        items = [msgspec.to_builtins(i) for i in await fetch()]
        # Kept well past the TTL so that a stale copy exists to fall back on.
        await self._redis.set(key, msgspec.msgpack.encode(_Cached(time.time(), items)), ex=self._ttl * 30)
        return items


class TemplateResolver:
    """Template names to flows, variables to custom-field writes."""

    def __init__(self, catalog: Catalog, mapping: Mapping[str, str]) -> None:
        self._catalog = catalog
        self._mapping = {normalize_name(k): v for k, v in mapping.items()}

    async def flow_id(self, template: str) -> str | None:
        """The flow for ``template``, or None when neither a mapping nor a flow of that name exists."""
        wanted = normalize_name(template)
        mapped = self._mapping.get(wanted)
        if mapped is not None:
            return mapped
        matches = [f for f in await self._catalog.flows() if normalize_name(f.name) == wanted]
        if len(matches) > 1:
            ids = ", ".join(f.id for f in matches)
            raise TemplateNotFoundError(f"template {template!r} is ambiguous: flows {ids} share that name")
        return matches[0].id if matches else None

    async def not_found(self, template: str) -> TemplateNotFoundError:
        """The error for a template that maps to nothing, saying what was looked up."""
        flow_count = len(await self._catalog.flows())
        env_name = "CGB_TEMPLATE_" + re.sub(r"\W", "_", template.strip()).upper()
        return TemplateNotFoundError(
            f"template {template!r} not found: no {env_name} mapping, and no flow named "
            f"{normalize_name(template)!r} among the account's {flow_count} flows; "
            "add the mapping or send a fallback message"
        )

    async def fields_for(self, variables: Mapping[str, Scalar]) -> list[tuple[CustomField, str | int | float]]:
        """Each variable's custom field and converted value; raises before anything is sent."""
        if not variables:
            return []
        by_name: dict[str, CustomField] = {}
        for f in await self._catalog.custom_fields():
            by_name.setdefault(normalize_name(f.name), f)
        missing = [name for name in variables if normalize_name(name) not in by_name]
        if missing:
            raise UnknownVariableError(
                f"no custom field for variable(s) {', '.join(map(repr, sorted(missing)))}; "
                "create them in CGB or drop them from the job"
            )
        return [
            (field, convert_value(field, name, value))
            for name, value in variables.items()
            for field in [by_name[normalize_name(name)]]
        ]


def convert_value(field: CustomField, name: str, value: Scalar) -> str | int | float:
    """``value`` as the custom field's type stores it; :class:`UnknownVariableError` when it cannot be."""

    def bad(why: str) -> UnknownVariableError:
        return UnknownVariableError(f"variable {name!r} ({_TYPE_NAMES.get(field.type, 'text')} field): {why}")

    if field.type == NUMBER:
        if isinstance(value, bool) or value is None:
            raise bad("needs a number")
        if isinstance(value, (int, float)):
            number: int | float = value
        else:
            try:
                number = int(value) if re.fullmatch(r"\s*-?\d+\s*", value) else float(value)
            except ValueError:
                raise bad("needs a number") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise bad("needs a finite number")
        return number
    if field.type in (DATE, DATETIME):
        return _unix_seconds(value, bad)
    if field.type == BOOLEAN:
        if isinstance(value, bool):
            return 1 if value else 0
        if isinstance(value, int) and value in (0, 1):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return 1 if value.strip().lower() in _TRUE else 0
        raise bad("needs true or false")
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_TYPE_NAMES = {NUMBER: "number", DATE: "date", DATETIME: "date & time", BOOLEAN: "boolean"}


def _unix_seconds(value: Scalar, bad: Callable[[str], Exception]) -> int:
    if isinstance(value, bool) or value is None:
        raise bad("needs an ISO 8601 date or Unix seconds")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise bad("needs an ISO 8601 date or Unix seconds")
        return int(value)
    text = value.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            parsed = datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
        else:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
    except ValueError:
        raise bad(f"{text[:40]!r} is not an ISO 8601 date") from None
    return int(parsed.timestamp())
