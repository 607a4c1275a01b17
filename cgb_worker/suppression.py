"""The suppression list: people who must not be sent some categories of message, and why.

A person is named by their keyed hash (:func:`cgb_worker.keys.who`), never their number. Their entry is one
Redis STRING, ``cgb:suppressed:<who>`` (read with the job's contact in one ``MGET``), holding JSON::

    {"all": {"reason": "keyword", "at": 1764650000000}, "marketing": {"reason": "131050", "at": ...},
     "lifted": 1764650100000}

Two scopes: ``all`` refuses every category but ``authentication`` (a one-time code the person asked for);
``marketing`` refuses ``marketing``. Reasons (:data:`REASONS`): ``keyword`` (the person sent an opt-out keyword,
such as STOP), ``131050`` (WhatsApp: the person stopped marketing messages), ``cgb_unsubscribed`` (CGB's contact
says ``subscribed == 2``), ``operator`` (``cgb-worker suppress add`` or :func:`suppress`). Times are ms.
``lifted`` is when opt-outs were last lifted: an opt-out older than it (a STOP redelivered after the START that
followed it) changes nothing. Every change goes through ``suppress.lua`` (:class:`~cgb_worker.scripts.SuppressScript`),
so concurrent receivers and workers never lose each other's writes; ``cgb:suppressed:index`` holds the hashes of
everyone with a scope, for :func:`list_suppressed`.

Lifting: an opt-in keyword (START) lifts what the person's own word put there, every scope with the reasons in
:data:`PERSON_REASONS`: the keyword's, 131050's marketing suppression too (a person who writes START asks to hear
from us again; if WhatsApp still refuses marketing, the next 131050 suppresses marketing again), and CGB's
``cgb_unsubscribed`` (suppressed again the next time the worker reads the contact from CGB, if it still says 2).
An operator's suppression stays until an operator removes it (:func:`unsuppress`, which lifts every reason).
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import msgspec
from redis.asyncio import Redis

from . import keys
from .models import Category
from .phones import normalize_phone
from .scripts import SuppressScript

Scope = Literal["all", "marketing"]
SCOPES: tuple[Scope, ...] = ("all", "marketing")
Reason = Literal["keyword", "131050", "cgb_unsubscribed", "operator", "unreadable"]
REASONS: dict[str, str] = {
    "keyword": "the person sent an opt-out keyword (such as STOP)",
    "131050": "WhatsApp answered 131050: the person stopped marketing messages from this business",
    "cgb_unsubscribed": "CGB's contact is unsubscribed (subscribed = 2)",
    "operator": "an operator suppressed this number",
    "unreadable": "the stored suppression could not be read, so it is honoured as 'all'",
}
"""Every reason, as :class:`~cgb_worker.errors.SuppressedError` and ``suppress list`` tell it."""
PERSON_REASONS: tuple[str, ...] = ("keyword", "131050", "cgb_unsubscribed")
"""What an opt-in keyword lifts: every reason but an operator's."""
LIFTED_TTL = 8 * 24 * 3600
"""Seconds an entry with no scope left keeps its ``lifted`` time: longer than Meta redelivers a webhook (7 days)."""
DEFAULT_OPT_OUT = ("STOP", "UNSUBSCRIBE")
DEFAULT_OPT_IN = ("START", "SUBSCRIBE")


@dataclass(frozen=True, slots=True)
class Entry:
    """One scope of a person's suppression."""

    scope: Scope
    reason: str
    at_ms: int

    @property
    def since(self) -> str:
        """``at_ms`` as UTC ISO 8601, to the second."""
        return datetime.fromtimestamp(self.at_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def message(self, category: str) -> str:
        """What a refused job's :class:`~cgb_worker.errors.SuppressedError` says."""
        why = REASONS.get(self.reason, self.reason)
        return f"not sending a {category} message: the number is suppressed for {self.scope} since {self.since}: {why}"


@dataclass(frozen=True, slots=True)
class Suppression:
    """A person's entry: ``who`` is their hash, ``entries`` their scopes (none once lifted)."""

    who: str
    entries: tuple[Entry, ...] = ()
    lifted_ms: int | None = None


def decode(value: bytes | str | None) -> tuple[tuple[Entry, ...], int | None]:
    """The scopes and the last lift time in a stored value. One that cannot be read is honoured as scope ``all``
    (reason ``unreadable``): refusing is the safe side of an opt-out."""
    if value is None:
        return (), None
    try:
        data = msgspec.json.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return (Entry("all", "unreadable", 0),), None
    if not isinstance(data, dict):
        return (Entry("all", "unreadable", 0),), None
    entries: list[Entry] = []
    for scope in SCOPES:
        e = data.get(scope)
        if e is None:
            continue
        if not isinstance(e, dict) or not isinstance(e.get("reason"), str) or not isinstance(e.get("at"), int | float):
            entries.append(Entry(scope, "unreadable", 0))
        else:
            entries.append(Entry(scope, e["reason"], int(e["at"])))
    lifted = data.get("lifted")
    return tuple(entries), int(lifted) if isinstance(lifted, int | float) else None


def refusal(value: bytes | str | None, category: Category) -> Entry | None:
    """Whether a job of ``category`` is refused by the stored ``value``, and by which scope (None: sent). Scope
    ``all`` refuses every category but ``authentication``; ``marketing`` refuses ``marketing``; ``all`` is told
    first when both apply."""
    entries, _lifted = decode(value)
    for entry in entries:
        if entry.scope == "all" and category != "authentication":
            return entry
    for entry in entries:
        if entry.scope == "marketing" and category == "marketing":
            return entry
    return None


# -- keywords ----------------------------------------------------------------------------------------------


def normalize_keyword(text: str) -> str:
    """A message's whole text as keywords are compared: NFKC-normalised (full-width letters are plain ones),
    invisible format characters (zero-width spaces, joiners, direction marks) dropped, stripped, inner
    whitespace collapsed to one space, casefolded. ``" Stop "`` is ``stop``; ``"S T O P"`` and ``"stop please"``
    stay what they are, no keyword."""
    text = "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")
    return " ".join(text.split()).casefold()


def parse_keywords(value: str) -> tuple[frozenset[str], str | None]:
    """A comma-separated keyword setting, normalised; the problem with it, or None. An empty value is no
    keywords (that feed off)."""
    if not value.strip():
        return frozenset(), None
    words = [normalize_keyword(w) for w in value.split(",")]
    if any(not w for w in words):
        return frozenset(), "an empty keyword (two commas, or one at an end)."
    if any(len(w) > 64 for w in words):
        return frozenset(), "a keyword longer than 64 characters."
    return frozenset(words), None


def keyword_action(text: str, *, opt_out: frozenset[str], opt_in: frozenset[str]) -> Literal["out", "in"] | None:
    """``out`` when the whole text is an opt-out keyword, ``in`` when it is an opt-in one, else None."""
    word = normalize_keyword(text)
    if word in opt_out:
        return "out"
    if word in opt_in:
        return "in"
    return None


# -- the public API ------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


async def suppress_who(
    redis: Redis, who: str, *, scope: Scope = "all", reason: str = "operator", at_ms: int | None = None
) -> bool:
    """:func:`suppress` for a person known by their hash (:func:`cgb_worker.keys.who`), as the receiver knows
    them (131050 uses it). True when the opt-out was added; False when the scope had one already, or the
    person's opt-outs were lifted after ``at_ms``."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if reason not in REASONS or reason == "unreadable":
        raise ValueError(f"reason must be one of keyword, 131050, cgb_unsubscribed, operator, not {reason!r}")
    return await SuppressScript(redis, lifted_ttl=LIFTED_TTL).add(
        who, scope, reason, _now_ms() if at_ms is None else at_ms
    )


async def suppress(
    redis: Redis,
    phone: str,
    *,
    scope: Scope = "all",
    reason: str = "operator",
    at_ms: int | None = None,
    default_region: str | None = None,
) -> bool:
    """Put ``phone`` on the suppression list for ``scope`` (``all`` or ``marketing``). Jobs of a refused category
    then fail at once with :class:`~cgb_worker.errors.SuppressedError`, no CGB call. Needs the phone key wired
    (:func:`cgb_worker.keys.use_phone_key`)."""
    return await suppress_who(
        redis, keys.who(normalize_phone(phone, default_region)), scope=scope, reason=reason, at_ms=at_ms
    )


async def unsuppress_who(
    redis: Redis, who: str, *, reasons: tuple[str, ...] | None = None, at_ms: int | None = None
) -> int:
    """Lift a person's opt-outs, every scope, of the given ``reasons`` (None: every reason, as an operator's
    removal does; an opt-in keyword passes :data:`PERSON_REASONS`). Returns how many scopes were lifted."""
    return await SuppressScript(redis, lifted_ttl=LIFTED_TTL).lift(
        who, _now_ms() if at_ms is None else at_ms, reasons="*" if reasons is None else ",".join(reasons)
    )


async def unsuppress(
    redis: Redis,
    phone: str,
    *,
    reasons: tuple[str, ...] | None = None,
    at_ms: int | None = None,
    default_region: str | None = None,
) -> int:
    """Take ``phone`` off the suppression list: every scope and reason by default (an operator's decision);
    see :func:`unsuppress_who`."""
    who = keys.who(normalize_phone(phone, default_region))
    return await unsuppress_who(redis, who, reasons=reasons, at_ms=at_ms)


async def lookup_who(redis: Redis, who: str) -> Suppression:
    entries, lifted = decode(await redis.get(keys.suppressed(who)))
    return Suppression(who, entries, lifted)


async def lookup(redis: Redis, phone: str, *, default_region: str | None = None) -> Suppression:
    """The person's suppression (``entries`` empty: not suppressed)."""
    return await lookup_who(redis, keys.who(normalize_phone(phone, default_region)))


async def is_suppressed(
    redis: Redis, phone: str, category: Category, *, default_region: str | None = None
) -> Entry | None:
    """Whether a job of ``category`` to ``phone`` would be refused, and by which scope (None: it would be sent)."""
    who = keys.who(normalize_phone(phone, default_region))
    return refusal(await redis.get(keys.suppressed(who)), category)


async def list_suppressed(redis: Redis) -> list[Suppression]:
    """Everyone on the list, by hash (the numbers are not stored), oldest suppression first."""
    found: list[Suppression] = []
    hashes = sorted(
        {m.decode() if isinstance(m, bytes) else str(m) async for m in redis.sscan_iter(keys.SUPPRESSED_INDEX)}
    )
    for start in range(0, len(hashes), 500):
        chunk = hashes[start : start + 500]
        values = await redis.mget([keys.suppressed(h) for h in chunk])
        for who, value in zip(chunk, values, strict=True):
            entries, lifted = decode(value)
            if entries:
                found.append(Suppression(who, entries, lifted))
    return sorted(found, key=lambda s: (min(e.at_ms for e in s.entries), s.who))


async def page_suppressed(redis: Redis, cursor: int = 0, count: int = 500) -> tuple[list[Suppression], int, int]:
    """One page of the list for the console, in the index's own order (``SSCAN``: a page costs the same however
    long the list is): the entries, oldest first within the page, the cursor of the next page (0 at the end)
    and how many people the index holds. An entry may show twice across pages, as ``SSCAN`` allows."""
    cursor, members = await redis.sscan(keys.SUPPRESSED_INDEX, cursor=cursor, count=count)
    hashes = sorted({m.decode() if isinstance(m, bytes) else str(m) for m in members})
    found: list[Suppression] = []
    if hashes:
        values = await redis.mget([keys.suppressed(h) for h in hashes])
        for who, value in zip(hashes, values, strict=True):
            entries, lifted = decode(value)
            if entries:
                found.append(Suppression(who, entries, lifted))
    total = int(await redis.scard(keys.SUPPRESSED_INDEX))  # type: ignore[misc]
    return sorted(found, key=lambda s: (min(e.at_ms for e in s.entries), s.who)), int(cursor), total


SuppressionEntry = Entry
"""The name :class:`Entry` goes by in the package's public surface."""
lookup_suppression = lookup
"""The name :func:`lookup` goes by in the package's public surface."""
