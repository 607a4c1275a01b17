"""What the receiver keeps for a person to look at (malformed bodies, set-aside items, unmatched statuses) without
the personal data in it: phone numbers, names, texts.

Diagnostics need the shape of what Meta sent and its harmless values (which status, which error), not who it
was for or what it said, so :func:`redact` keeps the shape and a short allow-list of values, and masks long digit
runs even there.
"""

from __future__ import annotations

import re
from typing import Any

from .logs import mask_text as logs_mask_text

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
    """What is kept of a body that is not JSON: the shape of its first 2 KiB, every letter an ``x`` and every
    digit a ``0`` (punctuation and spacing kept), so that names, texts and numbers in any spelling are gone."""
    text = body[:TEXT_MAX].decode("utf-8", errors="replace")
    return _SHAPE.sub(lambda m: "0" if m.group().isdigit() else "x", text)


_SHAPE = re.compile(r"\w")


def mask_text(text: str) -> str:
    """A value kept for diagnosis (an error's message): phone numbers in any spelling masked as the logs mask
    them, and any run of seven digits or more."""
    return mask_digits(logs_mask_text(text))


def status_kept(raw: dict[str, Any]) -> dict[str, Any]:
    """Meta's status object as a timeline or a held status keeps it: what the status is (its wamid, value, time,
    conversation, pricing and errors, messages masked), the recipient masked to its last two digits, and
    nothing else (``biz_opaque_callback_data``, for one, which CGB fills with the phone's digits)."""
    kept: dict[str, Any] = {k: raw[k] for k in ("id", "status", "timestamp", "type") if isinstance(raw.get(k), str)}
    rid = raw.get("recipient_id")
    if isinstance(rid, str):
        kept["recipient_id"] = mask_id(rid)
    if isinstance(raw.get("recipient_user_id"), str):
        kept["recipient_user_id"] = raw["recipient_user_id"]  # a business-scoped id, not a phone
    for part in ("conversation", "pricing"):
        if isinstance(raw.get(part), dict):
            kept[part] = redact(raw[part])
    if isinstance(raw.get("errors"), list):
        kept["errors"] = [_error(e) for e in raw["errors"] if isinstance(e, dict)]
    return kept


def _error(error: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(error.get("code"), int) and not isinstance(error.get("code"), bool):
        out["code"] = error["code"]
    for key in ("title", "message", "href"):
        if isinstance(error.get(key), str):
            out[key] = mask_text(error[key])
    data = error.get("error_data")
    if isinstance(data, dict) and isinstance(data.get("details"), str):
        out["error_data"] = {"details": mask_text(data["details"])}
    return out


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
            return obj if key == "timestamp" else mask_text(obj)
        return f"<redacted {len(obj)} chars>"
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, int | float) and abs(obj) >= 1_000_000:
        return mask_digits(str(obj))
    return obj
