"""Delivery receipts: what happened to each message after CGB said success, kept in Redis.

CGB returns no message id and pushes no status; the truth comes as WhatsApp's status webhooks, which
``cgb-worker webhooks`` (:mod:`cgb_worker.webhooks`) receives. This module is the record both sides share.

**What the worker writes.** When CGB acknowledges a send step, the step's state (``accepted``, when, to whom)
goes into the job's send-log hash (``cgb:sends:<job id>``, field ``d:<step>``) in the same ``HSET`` that marks
the step sent, so it costs no extra command. While a receiver is deployed on this Redis
(``cgb:webhooks:tracking``, a lease the receiver renews), the step is also put in ``cgb:accepted``, the sends
still waiting for their first status (one ``ZADD``, in the same round trip): that is the one more command per
message. Without a receiver nothing else is written, and ``accepted`` is all a timeline can say.

**How a status finds its message.** A status carries a wamid. A wamid already matched goes to its message
(``cgb:wamid:<wamid>``). Otherwise the status takes the oldest send to that recipient in ``cgb:accepted``
accepted within ``STATUS_MATCH_WINDOW`` before it (or :data:`CLOCK_SKEW` after it), and the timeline says the
match was ``recipient`` (by recipient and time) rather than ``wamid``. CGB overwrites
``biz_opaque_callback_data``, so nothing better is available. A status with only a business-scoped user id
(BSUID) is matched through the phone that id was last seen with. A flow that sends several WhatsApp
messages, or messages sent to the same person outside this worker (a bot's reply) within the window, can be
matched to the wrong send: the match is by recipient and time, and the timeline says so.

**Status.** Moves forward only, by :data:`RANK`: ``accepted`` → ``unconfirmed`` → ``sent`` → ``failed`` →
``delivered`` → ``read`` → ``played``. ``failed`` ranks below ``delivered`` because, with several devices,
WhatsApp can report a failure on one and delivery on another, in either order; a message delivered anywhere
was delivered. Late events are kept in the events list and never move the status back. A step still
``accepted`` after ``STATUS_UNCONFIRMED_AFTER`` is ``unconfirmed`` (the receiver sweeps it, and
:func:`delivery` says so even when no receiver runs).

**The 24-hour window.** An inbound message opens it (``cgb:window:<recipient>``, ``o:<ms>``; phones appear in keys only
hashed, as in the contact cache); WhatsApp's
131047 shuts it (``c:<ms>``). With no record for a contact, the window is ``closed`` once the receiver has had
signed webhooks for 24 hours (``cgb:webhooks:since``: it would have seen the contact write), else
``unknown``. See :func:`window_state`.

Every change of status (``accepted`` excepted: the job's result says that) is appended to the stream
``cgb:deliveries`` (``DELIVERY_STREAM_MAX``). Timelines live as long as the send log (7 days).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from redis.asyncio import Redis

from .contacts import phone_key
from .sends import key as sends_key

ACCEPTED = "cgb:accepted"
TRACKING = "cgb:webhooks:tracking"
SINCE = "cgb:webhooks:since"
STREAM = "cgb:deliveries"
WINDOW_MS = 24 * 3600 * 1000
WINDOW_TTL = 7 * 24 * 3600
WAMID_TTL = 7 * 24 * 3600
BSUID_TTL = 30 * 24 * 3600
CLOCK_SKEW = 60.0
"""Seconds a status's own timestamp may be before the worker's record of the send (clocks, and WhatsApp
stamping ``sent`` before CGB answered)."""
TRACKING_LEASE = 24 * 3600
"""How long sends stay tracked after the last receiver stopped renewing: a receiver that is down for a
deploy misses nothing (Meta redelivers for days), and one taken away for good stops the bookkeeping."""

Status = Literal["accepted", "unconfirmed", "sent", "failed", "delivered", "read", "played"]
RANK: dict[str, int] = {
    "accepted": 0,
    "unconfirmed": 1,
    "sent": 2,
    "failed": 3,
    "delivered": 4,
    "read": 5,
    "played": 6,
}
Window = Literal["open", "closed", "unknown"]


def recipient(phone: str) -> str:
    """The name a phone goes by in Redis keys and members: not the number itself (as for the contact cache)."""
    return phone_key("+" + phone.lstrip("+"))


def window_key(phone: str) -> str:
    return f"cgb:window:{recipient(phone)}"


def bsuid_key(user_id: str) -> str:
    return f"cgb:bsuid:{user_id}"


def wamid_key(wamid: str) -> str:
    return f"cgb:wamid:{wamid}"


def window_keys(phone: str) -> list[str]:
    """What :func:`window_state` reads, and the tracking lease, in one ``MGET`` with whatever else the job
    reads."""
    return [window_key(phone), SINCE, TRACKING]


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


def member(phone: str, at_ms: int, delivery_id: str, step: str) -> str:
    """A send in ``cgb:accepted``. Every score there is 0 and members sort as strings: by recipient, then by
    time (13 digits of milliseconds), so a recipient's oldest send in a time range is one ``ZRANGEBYLEX``
    away, however many sends are waiting."""
    return f"{recipient(phone)}|{at_ms:013d}|{delivery_id}|{step}"


def parse_member(value: str) -> tuple[str, int, str, str]:
    """(recipient, time in ms, delivery id, step) of a :func:`member`."""
    who, at, rest = value.split("|", 2)
    delivery_id, _, step = rest.rpartition("|")
    return who, int(at), delivery_id, step


class Accepted(msgspec.Struct, frozen=True):
    """A step CGB acknowledged, as the worker records it (:meth:`fields`, :meth:`index`)."""

    delivery_id: str
    step: str
    to: str
    """E.164."""
    at_ms: int
    tracking: bool
    fallback: dict[str, Any] | None = None
    """For a text sent in place of a ``whatsappTemplate``: the job fields the receiver re-sends as the
    template if WhatsApp answers 131047."""
    fallback_for: str | None = None
    """For that template, sent automatically: the step it replaces."""

    def fields(self) -> dict[str | bytes, bytes]:
        state: dict[str, Any] = {"status": "accepted", "at": self.at_ms}
        if self.fallback_for:
            state["fallbackFor"] = self.fallback_for
        out: dict[str | bytes, bytes] = {f"d:{self.step}": msgspec.json.encode(state)}
        if self.fallback is not None:
            out[f"f:{self.step}"] = msgspec.json.encode(self.fallback)
        return out

    def index(self) -> dict[str, float] | None:
        return {member(self.to, self.at_ms, self.delivery_id, self.step): 0} if self.tracking else None


# -- what a producer reads ----------------------------------------------------------------------------------


class DeliveryError(msgspec.Struct, frozen=True):
    """WhatsApp's error on a ``failed`` status (see ``../shared/whatsapp-webhooks.md`` for the codes)."""

    code: int
    title: str = ""
    details: str = ""


class DeliveryEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """One status as it arrived: ``meta`` is the status object WhatsApp sent, as it sent it."""

    status: str
    at: str
    """ISO 8601, UTC: WhatsApp's timestamp, in whole seconds (the worker's own for ``accepted`` and
    ``unconfirmed``). Events are listed in the order they arrived, which WhatsApp does not keep to."""
    received: str = ""
    """When the receiver recorded it (the acknowledgement, for ``accepted``)."""
    step: str = ""
    wamid: str | None = None
    meta: dict[str, Any] | None = None


class StepDelivery(msgspec.Struct, frozen=True, rename="camel"):
    """One message of a job: its own status and events."""

    step: str
    status: str
    accepted_at: str
    wamid: str | None = None
    error: DeliveryError | None = None
    matched_by: Literal["wamid", "recipient"] | None = None
    """How its first status was matched: ``recipient`` means by recipient and time (see the module doc)."""
    wa_id: str | None = None
    user_id: str | None = None
    fallback_for: str | None = None
    """Set on a template sent automatically after this job's text failed with 131047."""
    events: list[DeliveryEvent] = msgspec.field(default_factory=list)


class Delivery(msgspec.Struct, frozen=True, rename="camel"):
    """What really happened to a job's messages; :func:`delivery` builds it.

    ``status`` is the least advanced of the job's messages (``failed`` when any failed and was not replaced
    by a fallback template); ``wamid`` is its last message's; ``events`` merges every step's in the order
    they arrived."""

    job_id: str
    status: str
    wamid: str | None
    error: DeliveryError | None
    events: list[DeliveryEvent]
    steps: list[StepDelivery]


def iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _worst(statuses: list[str]) -> str:
    if "failed" in statuses:
        return "failed"
    return min(statuses, key=lambda s: RANK.get(s, 0))


async def delivery(redis: Redis, job_id: str, *, unconfirmed_after: float = 86400.0) -> Delivery | None:
    """The delivery record of ``job_id`` (a replayed job's original id), or None when there is none: the job
    sent nothing yet, or its record is older than 7 days. A step still ``accepted`` after
    ``unconfirmed_after`` seconds reads ``unconfirmed``."""
    raw: dict[bytes, bytes] = await redis.hgetall(sends_key(job_id))  # type: ignore[misc]
    now = time.time() * 1000
    steps: list[StepDelivery] = []
    for name, value in raw.items():
        if not name.startswith(b"d:"):
            continue
        step = name[2:].decode()
        state = msgspec.json.decode(value)
        events = [
            msgspec.convert({**e, "step": step}, DeliveryEvent)
            for e in (msgspec.json.decode(line) for line in raw.get(b"e:" + name[2:], b"").splitlines() if line)
        ]
        accepted_at = iso(float(state.get("at", 0)))
        status = str(state.get("status", "accepted"))
        if status == "accepted" and now - float(state.get("at", now)) > unconfirmed_after * 1000:
            status = "unconfirmed"
        error = state.get("error")
        steps.append(
            StepDelivery(
                step=step,
                status=status,
                accepted_at=accepted_at,
                wamid=state.get("wamid") or None,
                error=msgspec.convert(error, DeliveryError) if isinstance(error, dict) else None,
                matched_by=state.get("match") or None,
                wa_id=state.get("waId") or None,
                user_id=state.get("userId") or None,
                fallback_for=state.get("fallbackFor") or None,
                events=[DeliveryEvent("accepted", accepted_at, accepted_at, step), *events],
            )
        )
    if not steps:
        return None
    steps.sort(key=lambda s: s.accepted_at)
    replaced = {s.fallback_for for s in steps if s.fallback_for}
    current = [s for s in steps if s.step not in replaced] or steps
    status = _worst([s.status for s in current])
    error = next((s.error for s in current if s.status == "failed"), None)
    events = sorted((e for s in steps for e in s.events), key=lambda e: e.received)  # stable: a step's order
    return Delivery(job_id, status, current[-1].wamid, error, events, steps)


# -- what the receiver runs: each change to one message is one script, so receivers never race ---------------

MATCH = """
-- KEYS: wamid key, accepted set. ARGV: '' when the recipient is unknown, else the lowest member ('[who|t0')
-- and the bound above the highest ('(who|t1+1'); the wamid's TTL.
local ref = redis.call('GET', KEYS[1])
if ref then return {ref, 'wamid'} end
if ARGV[1] == '' then return false end
local found = redis.call('ZRANGEBYLEX', KEYS[2], ARGV[1], ARGV[2], 'LIMIT', 0, 1)[1]
if not found then return false end
redis.call('ZREM', KEYS[2], found)
local r = string.match(found, '^[^|]*|%d+|(.*)$')
redis.call('SET', KEYS[1], r, 'EX', ARGV[3])
return {r, 'recipient'}
"""

_LUA_RANKS = "{" + ", ".join(f"{name} = {rank}" for name, rank in RANK.items()) + "}"

APPLY = (
    """
-- KEYS: the send-log hash, the deliveries stream, the window key ('' when the phone is unknown), the
-- accepted set.
-- ARGV: step, status, at (ms), event (JSON line), wamid, match, error code, title, details, stream max,
--       job id, wa_id, user_id, accepted-set member ('' when it is out of the set already).
local step, status, at, wamid, code = ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[7]
local ranks = """
    + _LUA_RANKS
    + """
local raw = redis.call('HGET', KEYS[1], 'd:' .. step)
if not raw then return {'gone'} end
local s = cjson.decode(raw)
local key = status .. '/' .. wamid
local seen = s.seen or '|'
if string.find(seen, '|' .. key .. '|', 1, true) then return {'duplicate', s.status, tostring(s.at)} end
s.seen = seen .. key .. '|'
local events = redis.call('HGET', KEYS[1], 'e:' .. step) or ''
if #events < 65536 then redis.call('HSET', KEYS[1], 'e:' .. step, events .. ARGV[4] .. '\\n') end
if wamid ~= '' and not s.wamid then s.wamid = wamid end
if ARGV[6] ~= '' and not s.match then s.match = ARGV[6] end
if ARGV[12] ~= '' then s.waId = ARGV[12] end
if ARGV[13] ~= '' then s.userId = ARGV[13] end
if ARGV[14] ~= '' then redis.call('ZREM', KEYS[4], ARGV[14]) end
local changed = (ranks[s.status] or 0) < ranks[status]
local fallback = 0
if changed then
  s.status = status
  if status == 'failed' then
    s.error = {code = tonumber(code) or 0, title = ARGV[8], details = ARGV[9]}
    if code == '131047' then
      if KEYS[3] ~= '' then redis.call('SET', KEYS[3], 'c:' .. at, 'EX', """
    + str(WINDOW_TTL)
    + """) end
      if redis.call('HEXISTS', KEYS[1], 'f:' .. step) == 1 then fallback = 1 end
    end
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[10], '*', 'job', ARGV[11], 'step', step, 'status', status,
    'wamid', s.wamid or '', 'error', status == 'failed' and code or '', 'at', at)
end
redis.call('HSET', KEYS[1], 'd:' .. step, cjson.encode(s))
return {changed and 'changed' or 'kept', s.status, tostring(s.at), fallback}
"""
)

OPEN_WINDOW = """
-- KEYS: the window key. ARGV: inbound time (ms), TTL. A later inbound never loses to an earlier one.
local cur = redis.call('GET', KEYS[1])
if cur then
  local state, at = string.match(cur, '^(%a):(%d+)$')
  if state == 'o' and tonumber(at) >= tonumber(ARGV[1]) then return 0 end
  if state == 'c' and tonumber(at) > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], 'o:' .. ARGV[1], 'EX', ARGV[2])
return 1
"""
