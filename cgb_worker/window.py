"""The 24-hour customer-service window, as the worker reads it and the receiver writes it.

An inbound message opens it (``cgb:window:<who>``, ``o:<ms>``); WhatsApp's 131047 shuts it (``c:<ms>``). With no
record for a contact, the window is ``closed`` once the receiver has had signed webhooks for 24 hours
(``cgb:webhooks:since``: it would have seen the contact write), else ``unknown``.
"""

from __future__ import annotations

import time
from typing import Literal

from . import keys

WINDOW_MS = 24 * 3600 * 1000
WINDOW_TTL = 7 * 24 * 3600

Window = Literal["open", "closed", "unknown"]


def window_key(phone: str) -> str:
    return keys.window(keys.who(phone))


def job_keys(phone: str) -> list[str]:
    """What a job reads with its contact, in one ``MGET``: the window, the receiver's first webhook, the
    tracking lease, the person's turn (:mod:`cgb_worker.sends`), their opt-outs (:mod:`cgb_worker.suppression`)
    and whether WhatsApp said they cannot receive (131026)."""
    who = keys.who(phone)
    return [keys.window(who), keys.SINCE, keys.TRACKING, keys.turn(who), keys.suppressed(who), keys.undeliverable(who)]


def window_state(window: bytes | None, since: bytes | None, *, now_ms: int | None = None) -> Window:
    """The contact's 24-hour window from its record and the receiver's first signed webhook."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if window:
        state, _, at = window.decode().partition(":")
        if state == "o" and at.isdigit():
            return "open" if now - int(at) < WINDOW_MS else "closed"
        if state == "c":
            return "closed"
    if since and since.isdigit() and now - int(since) >= WINDOW_MS:
        return "closed"
    return "unknown"
