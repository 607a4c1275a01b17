"""Meta's webhook payload, as far as the receiver relies on it: the envelope strict, each item lenient.

A body whose envelope is not a WhatsApp Business Account webhook is malformed as a whole (not JSON, invalid
UTF-8, nesting too deep to decode, another ``object``, wrong types). Inside it, each entry, change, status,
inbound message and contact is read on its own: one with a shape or a value the receiver does not understand (a
status ``deleted`` or ``warning``, a timestamp that is not Unix seconds, bytes that do not decode) is set aside
with its reason, and its neighbours are used. There is no limit on how many items one body holds: a signed body
is Meta's, and the processor works through a big one in slices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

STATUSES = frozenset({"sent", "delivered", "read", "failed", "played"})
"""The status values the receiver applies; any other is set aside as a malformed item."""


class MetaErrorData(msgspec.Struct):
    details: str = ""


class MetaError(msgspec.Struct):
    code: int
    title: str = ""
    message: str = ""
    error_data: MetaErrorData | None = None


class MetaStatus(msgspec.Struct):
    id: str
    status: str
    timestamp: str
    recipient_id: str | None = None
    recipient_user_id: str | None = None
    errors: list[MetaError] = msgspec.field(default_factory=list)

    @property
    def at_ms(self) -> int:
        return int(self.timestamp) * 1000


class MetaContact(msgspec.Struct):
    wa_id: str | None = None
    user_id: str | None = None


class MetaMessage(msgspec.Struct):
    id: str
    timestamp: str
    from_: str | None = msgspec.field(default=None, name="from")
    from_user_id: str | None = None
    type: Any = None
    text: Any = None
    """``{"body": ...}`` for a ``text`` message; read leniently (:attr:`body`), as are ``button`` and
    ``interactive``: a shape the receiver does not expect here costs only the keyword check, never the message."""
    button: Any = None
    interactive: Any = None

    @property
    def body(self) -> str | None:
        """What the person wrote or tapped: a ``text`` message's body, a template's quick-reply button's text
        (``button``, such as Meta's "Stop promotions" button), or an interactive reply's title; else None."""
        if self.type == "text":
            found = _get(self.text, "body")
        elif self.type == "button":
            found = _get(self.button, "text")
        elif self.type == "interactive" and isinstance(self.interactive, dict):
            found = _get(self.interactive.get("button_reply"), "title")
        else:
            found = None
        return found if isinstance(found, str) else None


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


class _Envelope(msgspec.Struct):
    object: str
    entry: list[msgspec.Raw]


class _Entry(msgspec.Struct):
    changes: list[msgspec.Raw]
    id: str = ""


class _Change(msgspec.Struct):
    field: str
    value: msgspec.Raw


class MalformedError(ValueError):
    """A signed body the receiver cannot use at all; the reason says why (never its content)."""


@dataclass(slots=True)
class Change:
    """One ``messages`` change: what in it was understood, each status with the object Meta sent."""

    statuses: list[tuple[MetaStatus, dict[str, Any]]] = field(default_factory=list)
    messages: list[MetaMessage] = field(default_factory=list)
    contacts: list[MetaContact] = field(default_factory=list)


@dataclass(slots=True)
class Parsed:
    changes: list[Change] = field(default_factory=list)
    bad: list[tuple[str, Any]] = field(default_factory=list)
    """Items set aside: (reason, the item as Meta sent it, decoded; ``bytes`` when it does not decode)."""


_envelope = msgspec.json.Decoder(_Envelope)
_entry = msgspec.json.Decoder(_Entry)
_change = msgspec.json.Decoder(_Change)


class _Value(msgspec.Struct):
    """A ``messages`` change's value, its items left raw."""

    statuses: list[msgspec.Raw] | None = None
    messages: list[msgspec.Raw] | None = None
    contacts: list[msgspec.Raw] | None = None


_value = msgspec.json.Decoder(_Value)


LATEST = 4_102_444_800
"""2100-01-01 in Unix seconds: a later timestamp is not one Meta sent."""


def unix_seconds(value: str) -> bool:
    """Whether ``value`` is a Unix time in seconds, as Meta writes it (ASCII digits, before :data:`LATEST`)."""
    return 0 < len(value) <= 10 and value.isascii() and value.isdigit() and int(value) < LATEST


UNDECODABLE = (ValueError, RecursionError)
"""What decoding hostile bytes raises: msgspec's errors, ``UnicodeDecodeError`` for invalid UTF-8 in a key or a
string, ``RecursionError`` for nesting deeper than the decoder goes."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep"
    if isinstance(exc, UnicodeDecodeError):
        return "invalid UTF-8"
    return str(exc)[:200]


def _plain(raw: msgspec.Raw) -> Any:
    try:
        return msgspec.json.decode(raw)
    except UNDECODABLE:
        return bytes(raw)


_LONE_SURROGATE = re.compile(
    rb"(?<!\\)((?:\\\\)*)\\u(?:d[89ab][0-9a-f]{2}(?!\\ud[c-f][0-9a-f]{2})|d[c-f][0-9a-f]{2})", re.IGNORECASE
)
"""A ``\\uD83D`` escape with no partner (a truncated emoji): JSON that every decoder refuses, which one damaged text
would otherwise make of a whole body. The high half is replaced only when no low half follows it; a low half
found alone after that was alone."""


def _mend(body: bytes) -> bytes:
    """``body`` with each lone surrogate escape replaced by U+FFFD's (a valid pair is left as it is)."""
    mended = bytearray()
    last = 0
    for m in _LONE_SURROGATE.finditer(body):
        start = m.start()
        if m.group(0)[len(m.group(1)) + 2 : len(m.group(1)) + 3].lower() in (b"c", b"d", b"e", b"f") and re.match(
            rb"\\ud[89ab][0-9a-f]{2}$", body[max(0, start - 6) : start], re.IGNORECASE
        ):
            continue  # the low half of a pair
        mended += body[last:start] + m.group(1) + b"\\ufffd"
        last = m.end()
    return bytes(mended + body[last:]) if last else body


def parse_payload(body: bytes) -> Parsed:
    """The ``messages`` changes of a webhook body, item by item (the module doc). :class:`MalformedError` only for
    an envelope that is not a WhatsApp webhook. Changes to other fields (template reviews, account updates) are
    valid and skipped."""
    try:
        envelope = _envelope.decode(body)
    except UNDECODABLE as exc:
        mended = _mend(body)
        if mended is body:
            raise MalformedError(f"not a webhook payload: {_why(exc)}") from None
        try:
            envelope = _envelope.decode(mended)
        except UNDECODABLE as again:
            raise MalformedError(f"not a webhook payload: {_why(again)}") from None
    if envelope.object != "whatsapp_business_account":
        raise MalformedError("object is not whatsapp_business_account")
    parsed = Parsed()
    for raw_entry in envelope.entry:
        try:
            entry = _entry.decode(raw_entry)
        except UNDECODABLE as exc:
            parsed.bad.append((f"an entry: {_why(exc)}", _plain(raw_entry)))
            continue
        for raw_change in entry.changes:
            try:
                change = _change.decode(raw_change)
                if change.field != "messages":
                    continue
                # each item stays raw until it is read on its own: one with a bad byte spoils only itself
                value = _value.decode(change.value)
                lists = {"statuses": value.statuses or [], "messages": value.messages or [],
                         "contacts": value.contacts or []}  # fmt: skip
            except UNDECODABLE as exc:
                parsed.bad.append((f"a change: {_why(exc)}", _plain(raw_change)))
                continue
            parsed.changes.append(_read_change(lists, parsed.bad))
    return parsed


def _items(raws: list[msgspec.Raw], what: str, bad: list[tuple[str, Any]]) -> list[Any]:
    items = []
    for raw in raws:
        try:
            items.append(msgspec.json.decode(raw))
        except UNDECODABLE as exc:
            bad.append((f"{what}: {_why(exc)}", _plain(raw)))
    return items


def _read_change(raw_lists: dict[str, list[msgspec.Raw]], bad: list[tuple[str, Any]]) -> Change:
    out = Change()
    lists = {
        "contacts": _items(raw_lists["contacts"], "a contact", bad),
        "statuses": _items(raw_lists["statuses"], "a status", bad),
        "messages": _items(raw_lists["messages"], "an inbound message", bad),
    }
    for item in lists["contacts"]:
        try:
            out.contacts.append(msgspec.convert(item, MetaContact))
        except msgspec.ValidationError as exc:
            bad.append((f"a contact: {exc}", item))
    for item in lists["statuses"]:
        try:
            status = msgspec.convert(item, MetaStatus)
        except msgspec.ValidationError as exc:
            bad.append((f"a status: {exc}", item))
            continue
        if status.status not in STATUSES:
            bad.append(("a status with an unknown value", item))
        elif not status.id or "\ufffd" in status.id or not unix_seconds(status.timestamp):
            bad.append(("a status without a wamid or a Unix timestamp", item))
        elif not (status.recipient_id or status.recipient_user_id):
            bad.append(("a status without a recipient", item))
        else:
            out.statuses.append((status, item))
    for item in lists["messages"]:
        try:
            message = msgspec.convert(item, MetaMessage)
        except msgspec.ValidationError as exc:
            bad.append((f"an inbound message: {exc}", item))
            continue
        if not unix_seconds(message.timestamp) or not (message.from_ or message.from_user_id):
            bad.append(("an inbound message without a sender or a Unix timestamp", item))
        else:
            out.messages.append(message)
    return out
