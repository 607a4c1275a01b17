"""What the receiver keeps for a person to look at (malformed bodies, set-aside items, unmatched statuses) without
the personal data in it: phone numbers, names, texts.

Diagnostics need the shape of what Meta sent and its harmless values (which status, which error), not who it
was for or what it said, so :func:`redact` keeps the shape and a short allow-list of values, and masks long digit
runs even there.
"""

from __future__ import annotations

import re
from typing import Any

_RUN = re.compile(r"[0-9]{7,}")
KEEP = frozenset(
    {
        "object", "field", "messaging_product", "status", "timestamp", "type", "id", "code", "title", "message",
        "details", "category", "pricing_model", "billable", "origin",
    }
)  # fmt: skip
"""Keys whose values are kept (digit runs masked): what a status or an error is, never whose or what it said."""
DEPTH = 32
"""Deeper than this, a value is summarised: nothing Meta sends nests so deep, and the walk stays bounded."""
TEXT_MAX = 2048


def mask_digits(text: str) -> str:
    """Every run of seven or more ASCII digits (a phone number, or a part of one) as asterisks but its last two."""
    return _RUN.sub(lambda m: "*" * (len(m.group()) - 2) + m.group()[-2:], text)


def mask_id(value: str) -> str:
    """A recipient's id (a phone) as asterisks but its last two characters."""
    return "*" * max(0, len(value) - 2) + value[-2:]


def mask_body(body: bytes) -> str:
    """What is kept of a body that is not JSON: its first 2 KiB as text, digit runs masked."""
    return mask_digits(body[:TEXT_MAX].decode("utf-8", errors="replace"))


def redact(obj: Any) -> Any:
    """Decoded JSON with its shape kept: values under :data:`KEEP` keys kept (digit runs masked, ``timestamp``
    as it is), every other string ``<redacted N chars>``, long numbers masked, keys' digit runs masked."""
    return _walk(obj, False, None, 0)


def _walk(obj: Any, keep: bool, key: str | None, depth: int) -> Any:
    if depth > DEPTH:
        return "<redacted: nested too deep>"
    if isinstance(obj, dict):
        return {mask_digits(str(k)): _walk(v, str(k) in KEEP, str(k), depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, keep, key, depth + 1) for v in obj]
    if isinstance(obj, str):
        if keep:
            return obj if key == "timestamp" else mask_digits(obj)
        return f"<redacted {len(obj)} chars>"
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, int | float) and abs(obj) >= 1_000_000:
        return mask_digits(str(obj))
    return obj
