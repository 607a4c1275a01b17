"""What a producer reads: a job's delivery record, built from its send-log hash (:func:`delivery`).

**Status.** Moves forward only, by :data:`RANK`: ``accepted`` → ``unconfirmed`` → ``sent`` → ``failed`` →
``delivered`` → ``read`` → ``played``. ``failed`` ranks below ``delivered`` because, with several devices,
WhatsApp can report a failure on one and delivery on another, in either order; a message delivered anywhere
was delivered. Late events are kept in the events list and never move the status back. A step still
``accepted`` after ``STATUS_UNCONFIRMED_AFTER`` reads ``unconfirmed``; ``unconfirmed`` is a status, not an end:
a status that comes later still finds its message. A step whose request left but which CGB has not
acknowledged (or whose outcome stayed unknown) reads ``sending`` until a status places it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from redis.asyncio import Redis

from .. import keys
from ..whatsapp_errors import base_step, rule_for

Status = Literal["sending", "accepted", "unconfirmed", "sent", "failed", "delivered", "read", "played"]
RANK: dict[str, int] = {
    "sending": 0,
    "accepted": 0,
    "unconfirmed": 1,
    "sent": 2,
    "failed": 3,
    "delivered": 4,
    "read": 5,
    "played": 6,
}


class DeliveryError(msgspec.Struct, frozen=True):
    """WhatsApp's error on a ``failed`` status (see ``../shared/whatsapp-webhooks.md`` for the codes)."""

    code: int
    title: str = ""
    details: str = ""
    meaning: str = ""
    """What the code means, from :mod:`cgb_worker.whatsapp_errors` (Meta's ``title`` is often terse)."""


class DeliveryEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """One status as it arrived: ``meta`` is the status object WhatsApp sent, as it sent it."""

    status: str
    at: str
    """ISO 8601, UTC: WhatsApp's timestamp, in whole seconds (the worker's own for ``accepted`` and
    ``unconfirmed``). Events are listed in the order they arrived, which WhatsApp does not keep to."""
    received: str = ""
    """When the receiver recorded it (the request's time, for ``accepted``)."""
    step: str = ""
    wamid: str | None = None
    meta: dict[str, Any] | None = None


class StepDelivery(msgspec.Struct, frozen=True, rename="camel"):
    """One message of a job: its own status and events."""

    step: str
    status: str
    accepted_at: str
    """When the request left the worker."""
    wamid: str | None = None
    wamids: list[str] = msgspec.field(default_factory=list)
    """Every WhatsApp message placed on this step, the first being ``wamid``: more than one only for a flow
    that sent several, or a step sent again after an unknown outcome."""
    error: DeliveryError | None = None
    matched_by: Literal["wamid", "recipient"] | None = None
    """How its first status was placed: ``recipient`` when it was the one send of ours to that person that
    could have produced it (the README's attribution rule), ``wamid`` when its wamid was known already."""
    unresolved: int = 0
    """Statuses that may have been this message's but could not be told apart from another send's: held for
    ``STATUS_HOLD``, then kept as unmatched rather than guessed."""
    wa_id: str | None = None
    """Only in records written before the receiver stopped keeping the recipient's phone (none now)."""
    user_id: str | None = None
    fallback_for: str | None = None
    """Set on a template sent automatically after this job's text failed with 131047."""
    category: str | None = None
    """The job's category when this step was sent."""
    resend_of: str | None = None
    """Set on a step sent again automatically (``text~1``): the step WhatsApp failed, and its code. The job's
    status follows the newest."""
    resend_code: int | None = None
    resending: str | None = None
    """A resend of this step queued by the receiver (its name, ``text~1``), until it is sent."""
    events: list[DeliveryEvent] = msgspec.field(default_factory=list)


class Delivery(msgspec.Struct, frozen=True, rename="camel"):
    """What really happened to a job's messages; :func:`delivery` builds it.

    ``status`` is the least advanced of the job's messages (``failed`` when any failed and was not replaced
    by a fallback template or an automatic resend, whose own status then counts); ``wamid`` is its last
    message's; ``events`` merges every step's in the order they arrived."""

    job_id: str
    status: str
    wamid: str | None
    error: DeliveryError | None
    events: list[DeliveryEvent]
    steps: list[StepDelivery]
    category: str | None = None
    resending: bool = False
    """A message of the job failed and the receiver has queued it to be sent again (:mod:`.reactions`): a
    ``failed`` status is not final yet."""


def _step(step_b: bytes, value: bytes, raw: dict[bytes, bytes], now: float, unconfirmed_after: float) -> StepDelivery:
    step = step_b.decode()
    state = msgspec.json.decode(value)
    if not isinstance(state, dict):
        raise TypeError("a step's record is an object")
    events = []
    for line in raw.get(b"e:" + step_b, b"").splitlines():
        try:
            event = msgspec.json.decode(line) if line else None
            if isinstance(event, dict):
                events.append(msgspec.convert({**event, "step": step}, DeliveryEvent))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # one bad event line never hides the others
    accepted_at = iso(float(state.get("at", 0)))
    status = state.get("status", "accepted")
    if status not in RANK:
        raise ValueError("not a status")
    acked = raw.get(step_b) == b"sent" or b"a:" + step_b in raw
    if status == "accepted" and not acked:
        status = "sending"
    elif status == "accepted" and now - float(state.get("at", now)) > unconfirmed_after * 1000:
        status = "unconfirmed"
    wamid = _str(state.get("wamid"))
    more = state.get("more")
    wamids = [wamid, *(w for w in more if isinstance(w, str))] if wamid and isinstance(more, list) else []
    if wamid and not wamids:
        wamids = [wamid]
    unresolved = raw.get(b"u:" + step_b, b"0") or b"0"
    code = state.get("resendCode")
    match = _str(state.get("match"))
    return StepDelivery(
        step=step,
        status=status,
        accepted_at=accepted_at,
        wamid=wamid,
        wamids=wamids,
        error=_error(state.get("error")),
        matched_by=match if match in ("wamid", "recipient") else None,  # type: ignore[arg-type]
        unresolved=int(unresolved) if unresolved.isascii() and unresolved.isdigit() else 0,
        wa_id=_str(state.get("waId")),
        user_id=_str(state.get("userId")),
        fallback_for=_str(state.get("fallbackFor")),
        category=_str(state.get("category")),
        resend_of=_str(state.get("resendOf")),
        resend_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        resending=_text(raw.get(b"r:" + step_b)),
        events=[DeliveryEvent("accepted" if acked else "sending", accepted_at, accepted_at, step), *events],
    )


def _str(value: Any) -> str | None:
    """A field another version, or damage, may have stored as another type: a string, or none."""
    return value if isinstance(value, str) and value else None


def _text(value: bytes | None) -> str | None:
    return value.decode() if value else None


def iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _error(stored: Any) -> DeliveryError | None:
    if not isinstance(stored, dict):
        return None
    error = msgspec.convert(stored, DeliveryError, strict=False)  # lenient: a record another version wrote
    return msgspec.structs.replace(error, meaning=rule_for(error.code).meaning)


def _worst(statuses: list[str]) -> str:
    if "failed" in statuses:
        return "failed"
    return min(statuses, key=lambda s: RANK.get(s, 0))


async def delivery(redis: Redis, job_id: str, *, unconfirmed_after: float = 86400.0) -> Delivery | None:
    """The delivery record of ``job_id`` (a replayed job's original id), or None when there is none: the job
    sent nothing yet, or its record is older than 7 days. A step still ``accepted`` after
    ``unconfirmed_after`` seconds reads ``unconfirmed``."""
    raw: dict[bytes, bytes] = await redis.hgetall(keys.sends(job_id))  # type: ignore[misc]
    return build(job_id, raw, unconfirmed_after=unconfirmed_after)


def build(job_id: str, raw: dict[bytes, bytes], *, unconfirmed_after: float = 86400.0) -> Delivery | None:
    """:func:`delivery` from the hash as read."""
    now = time.time() * 1000
    steps: list[StepDelivery] = []
    for name, value in raw.items():
        if not name.startswith(b"d:"):
            continue
        try:
            steps.append(_step(name[2:], value, raw, now, unconfirmed_after))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, AttributeError, OverflowError,
                OSError):  # fmt: skip
            continue  # another version's record, or a damaged one: the job's other messages still show
    if not steps:
        return None
    sent_steps = {s.step for s in steps}
    steps = [
        msgspec.structs.replace(s, resending=None) if s.resending in sent_steps else s for s in steps
    ]  # once the resend is sent, its own step says how it went
    steps.sort(key=lambda s: s.accepted_at)
    # a fallback template replaces the text and its resends (``text~1``); a resend replaces the step it resends
    by_template = {s.fallback_for for s in steps if s.fallback_for}
    resent = {s.resend_of for s in steps if s.resend_of}
    current = [s for s in steps if s.step not in resent and base_step(s.step) not in by_template] or steps
    # a message delivered anywhere was delivered: a copy that a resend replaced, reported delivered after all,
    # stands for its chain (text, text~1, ...) in place of the newest
    best = {base_step(s.step): s for s in steps if RANK.get(s.status, 0) >= RANK["delivered"]}
    current = [best.get(base_step(s.step), s) if s.status == "failed" else s for s in current]
    status = _worst([s.status for s in current])
    error = next((s.error for s in current if s.status == "failed"), None)
    events = sorted((e for s in steps for e in s.events), key=lambda e: e.received)  # stable: a step's order
    category = next((s.category for s in reversed(current) if s.category), None)
    resending = any(s.resending for s in current)
    return Delivery(job_id, status, current[-1].wamid, error, events, steps, category, resending)
