"""A local CGB: an ``aiohttp.web`` app that plays the API per the contract (``cgb-api.md`` §9).

Run it with ``python -m cgb_worker.simulator --port 8089`` (token ``sim-token`` unless ``--token``), point
``CGB_API_URL`` at ``http://127.0.0.1:8089/api`` and the worker cannot tell it from CGB. It is what the
tests, the demo and the benchmarks run against.

Faithful by default:

* every ``/api`` call needs ``X-ACCESS-TOKEN``; a missing or wrong one, or an unknown path without one,
  gets CGB's 401 body served as ``text/html`` (errors are JSON in an HTML content type, as observed);
* contacts are keyed by phone; ``POST /contacts`` upserts and runs its ``actions`` in order; WhatsApp
  contact ids are the phone digits; ids are JSON integers;
* sends are recorded in an outbox, never with a message id. Text, files and session flows to a contact who
  has not written in 24 hours are accepted with ``{"success": true}`` and then marked ``failed``
  (``re-engagement (>24h)``); template flows are delivered at any time, rendered with the contact's fields;
* flows and custom fields come from a fixture (:data:`DEFAULT_FLOWS`, :data:`DEFAULT_FIELDS`).

Where the contract is uncertain, :class:`SimConfig` plays either side (``POST /_sim/config``): blank
contact or 404 for an unknown id, how the created id is returned, whether ``find`` matches the stored
phone as ``+E164`` or digits, JSON accepted for custom fields, top-level ``phone``/``email`` on contacts,
the legacy ``/users`` paths. Faults are injected with ``POST /_sim/faults``: fixed or random status codes
(429 with an optional ``Retry-After``, 5xx), delays, errors inside HTTP 200, ``success: false`` and dropped
connections, each for the next N matching calls or a share of them.

Sim-only endpoints (no token): ``GET /_sim/outbox``, ``GET /_sim/requests``, ``GET /_sim/stats``,
``GET /_sim/contacts``, ``POST /_sim/inbound``, ``POST|GET /_sim/config``, ``POST|DELETE /_sim/faults``,
``POST /_sim/outage`` (stop accepting connections for a while), ``POST /_sim/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import msgspec
from aiohttp import web

from .catalog import BAD_SPACING, TemplateCatalog, load_catalog
from .receipts.app import signature
from .settings import listen_problem

PAGE_ID = 1000001
DEFAULT_TOKEN = "sim-token"  # noqa: S105 - the simulator's own, documented token
WINDOW_MS = 24 * 3600 * 1000
WA_ERRORS = {
    131047: "Re-engagement message",
    132000: "Number of parameters does not match the expected number of params",
    132001: "Template name does not exist in the translation",
    132018: "There was an issue with the parameters in your template",
    131026: "Message undeliverable",
    131049: "This message was not delivered to maintain healthy ecosystem engagement.",
    131050: "Unable to deliver the message. This recipient has chosen to stop receiving marketing messages.",
    131056: "(Business Account, Consumer Account) pair rate limit hit",
    130429: "Rate limit hit",
    131057: "Account in maintenance mode",
}
TEXT_CHANNELS = {"messenger", "whatsapp", "sms", "webchat", "telegram", "instagram", "viber", "omnichannel"}
FILE_CHANNELS = {"messenger", "sms", "whatsapp", "googleBM", "telegram", "instagram", "viber", "omnichannel"}
FILE_TYPES = {"file", "image", "audio", "video"}
ERROR_CT = "text/html; charset=UTF-8"
UNAUTHORIZED = {"error": {"code": 401, "message": "No valid API key provided."}}


class FlowFixture(msgspec.Struct, frozen=True):
    id: int
    name: str
    kind: Literal["template", "session"] = "template"
    body: str = ""
    """Template text; ``{field_name}`` is replaced by the contact's custom field when the flow runs."""


class FieldFixture(msgspec.Struct, frozen=True):
    id: int
    name: str
    type: int = 0
    description: str = ""


DEFAULT_FLOWS: tuple[FlowFixture, ...] = (
    FlowFixture(1752250957765, "visa_approved", "template", "Hello {first_name}, your {visa_type} visa is approved."),
    FlowFixture(
        1752250957766,
        "Documents Needed",
        "template",
        "Hi {first_name}, please send: {documents_needed} by {deadline}.",
    ),
    FlowFixture(1752250957767, "Visa Approved Reminder", "template", "Reminder: your visa is approved."),
    FlowFixture(1752250957768, "welcome", "session", "Welcome!"),
)
DEFAULT_FIELDS: tuple[FieldFixture, ...] = (
    FieldFixture(-8, "Phone Number", 0, "System field"),
    FieldFixture(-12, "Email", 0, "System field"),
    FieldFixture(612001, "first_name", 0),
    FieldFixture(612002, "visa_type", 0),
    FieldFixture(612003, "documents_needed", 5),
    FieldFixture(612004, "deadline", 2),
    FieldFixture(612005, "applicants", 1),
    FieldFixture(612006, "urgent", 4),
)


class SimConfig(msgspec.Struct, kw_only=True):
    """The simulator's behaviour where the contract leaves a choice; every field can be set at run time."""

    token: str = DEFAULT_TOKEN
    latency: float = 0.0
    """Seconds added to every ``/api`` response."""
    missing_contact: Literal["404", "blank"] = "404"
    """GET of an unknown contact: 404 (the spec) or 200 with empty fields (observed by one user)."""
    created_id: Literal["data_id", "top_id", "none"] = "data_id"
    """Where POST /contacts puts the new id: ``{"data": {"id"}}`` (observed), top-level ``id``, or nowhere."""
    stored_phone: Literal["plus", "digits"] = "plus"
    """How a contact's phone is stored, which is what ``find`` must match exactly."""
    form_only_fields: bool = True
    """Setting a contact custom field with a JSON body is a 400 (the spec says form)."""
    contact_has_phone: bool = False
    """Put top-level ``phone``/``email`` on contacts (not in the documented model)."""
    upsert: bool = True
    """POST /contacts for an existing phone updates it; when false it is a 400."""
    inbound_on_create: bool = False
    """Treat a new contact as having just written, so its 24-hour window is open."""
    wa_templates_file: str | None = None
    """A ``WA_TEMPLATES_FILE`` of the simulator's own: a ``send_content`` template that does not match it is
    answered success and then marked failed, 132000 (132018 for a badly spaced parameter), as WhatsApp does."""
    account_created: Literal["int", "string"] = "int"
    """``created`` on ``/accounts/me``: the vendor's Swagger gives it as an integer in one place, a string in
    another."""
    record_requests: bool = True
    """Keep every request in ``/_sim/requests`` (turn off for long benchmarks; counts are always kept)."""
    webhook_url: str | None = None
    """Post WhatsApp's status webhooks, signed, here: ``sent``, ``delivered`` and ``read`` for what the outbox
    delivered; ``failed`` 131047 for free-form content outside the 24-hour window, and the catalog's error
    (132000, 132018, 132001) for a mismatched template. ``/_sim/inbound`` posts an inbound message."""
    webhook_secret: str = "sim-app-secret"  # noqa: S105 - the simulator's own, documented secret
    webhook_delay: float = 0.02
    """Seconds before the first status and between statuses."""
    webhook_read: bool = True
    """Follow ``delivered`` with ``read``."""
    webhook_out_of_order: bool = False
    """Post a message's statuses last first (``read`` before ``delivered`` before ``sent``)."""
    webhook_duplicates: bool = False
    """Post every status twice, as Meta's redeliveries do."""
    webhook_drop: list[str] = msgspec.field(default_factory=list)
    """Statuses never posted (``["delivered"]``: read comes without it)."""
    webhook_user_ids: bool = False
    """Give each recipient a business-scoped user id (``recipient_user_id``, ``contacts[].user_id``)."""
    webhook_withhold_phone: bool = False
    """With ``webhook_user_ids``: leave ``recipient_id`` out, as Meta does for users with usernames."""
    webhook_jitter: float = 0.0
    """Post each status on its own after ``webhook_delay`` plus a random delay up to this many seconds, so the
    statuses of different messages (and of one message) arrive in any order, as Meta's do."""
    webhook_duplicate_rate: float = 0.0
    """The share of statuses posted twice (with ``webhook_jitter``)."""
    webhook_drop_sent_rate: float = 0.0
    """The share of messages whose ``sent`` is never posted, only ``delivered`` and ``read`` (with the jitter)."""
    flow_messages: int = 1
    """WhatsApp messages one flow sends (each its own outbox entry, wamid and statuses)."""
    webhook_fail: dict[str, list[int]] = msgspec.field(default_factory=dict)
    """By recipient (the phone's digits): WhatsApp's error codes for the next sends to them, one a send, in order
    (``{"12025550100": [131056]}``: the next send fails with 131056, the one after goes through)."""
    webhook_fail_code: int | None = None
    """Every send fails with this code (after ``webhook_fail``'s)."""
    unsubscribed: list[str] = msgspec.field(default_factory=list)
    """Phone digits (E.164 without ``+``) whose contacts say ``subscribed: 2`` (unsubscribed) instead of 1."""


class FaultRule(msgspec.Struct, kw_only=True):
    """One injected fault. Matches calls by method and path regex; acts on the next ``count`` of them,
    or on a ``rate`` share of them (random), or on all when neither is given."""

    status: int | None = None
    """Answer with this HTTP status and CGB's error envelope."""
    error_in_200: int | None = None
    """Answer HTTP 200 with ``{"error": {"code": <this>}}``."""
    success_false: bool = False
    delay: float = 0.0
    drop: bool = False
    """Close the connection without an answer."""
    after: bool = False
    """Perform the call first, then fail: the effect happened but the caller sees the fault."""
    retry_after: str | None = None
    method: str | None = None
    path: str | None = None
    count: int | None = None
    rate: float | None = None
    hits: int = 0

    @property
    def acts(self) -> bool:
        """Whether the rule changes the answer (a rule with only ``delay`` just slows the call)."""
        return self.drop or self.success_false or self.status is not None or self.error_in_200 is not None


class SimState:
    """Everything the simulator remembers; reset with ``POST /_sim/reset``."""

    def __init__(
        self,
        config: SimConfig | None = None,
        flows: tuple[FlowFixture, ...] = DEFAULT_FLOWS,
        fields: tuple[FieldFixture, ...] = DEFAULT_FIELDS,
        seed: int | None = None,
    ) -> None:
        self.config = config or SimConfig()
        self.flows = {f.id: f for f in flows}
        self.fields = {f.id: f for f in fields}
        self.random = random.Random(seed)  # noqa: S311 - fault sampling, not security
        self.listener: Listener | None = None
        self.reset()

    def reset(self) -> None:
        self.contacts: dict[int, dict[str, Any]] = {}
        self.outbox: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.faults: list[FaultRule] = []
        self.tags: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.webhooks: list[dict[str, Any]] = []
        """Every webhook posted: what was in it and the HTTP status it got."""
        self.webhook_tasks: set[asyncio.Task[None]] = set()

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def find_field(self, name: str) -> FieldFixture | None:
        return next((f for f in self.fields.values() if f.name == name), None)

    def stored_phone(self, digits: str) -> str:
        return f"+{digits}" if self.config.stored_phone == "plus" else digits

    def contact_json(self, c: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": c["id"],
            "page_id": PAGE_ID,
            "first_name": c["first_name"],
            "last_name": c["last_name"],
            "channel": 5,
            "profile_pic": "",
            "locale": "",
            "gender": {"female": 0, "male": 1}.get(c["gender"], 2),
            "timezone": 0,
            "last_sent": c["last_sent"],
            "last_delivered": c["last_delivered"],
            "last_seen": c["last_inbound"] or 0,
            "last_interaction": c["last_inbound"] or 0,
            "subscribed_date": datetime.fromtimestamp(c["created"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "subscribed": 2 if str(c["id"]) in self.config.unsubscribed else 1,
            "tags": [{"id": self.tags[t], "name": t} for t in sorted(c["tags"])],
            "custom_fields": [self.field_json(fid, v) for fid, v in sorted(c["fields"].items())],
        }
        if self.config.contact_has_phone:
            out["phone"] = c["phone"]
            out["email"] = c["email"]
        return out

    def field_json(self, field_id: int, value: str) -> dict[str, Any]:
        f = self.fields[field_id]
        shown: Any = value
        if f.type not in (0, 5):
            try:
                shown = int(value)
            except ValueError:
                try:
                    shown = float(value)
                except ValueError:
                    shown = value
        return {"id": f.id, "name": f.name, "type": f.type, "value": shown}

    def deliver(self, contact: dict[str, Any], kind: str, **details: Any) -> dict[str, Any]:
        """Record a send; free-form content outside the 24-hour window is accepted but fails."""
        now = self.now_ms()
        needs_window = kind in ("text", "file", "content") or details.get("flow_kind") == "session"
        window_open = contact["last_inbound"] is not None and now - contact["last_inbound"] < WINDOW_MS
        failed = needs_window and not window_open
        code = None if failed else self.fail_code(contact["phone"])  # 131047 comes first; a queued code waits
        entry = {
            "seq": len(self.outbox) + 1,
            "contact_id": str(contact["id"]),
            "phone": contact["phone"],
            "kind": kind,
            "status": "failed" if failed or code else "delivered",
            "reason": "re-engagement (>24h)" if failed else WA_ERRORS.get(code or 0),
            "at": now,
            **details,
        }
        if code and not failed:
            entry["error_code"] = code
        self.outbox.append(entry)
        contact["last_sent"] = now
        if entry["status"] == "delivered":
            contact["last_delivered"] = now
        if self.config.webhook_url:
            self._spawn(self._post_statuses(entry))
        return entry

    def fail_code(self, phone: str) -> int | None:
        """The error code WhatsApp fails this send with (``webhook_fail``, ``webhook_fail_code``), if any."""
        queued = self.config.webhook_fail.get(re.sub(r"\D", "", phone))
        if queued:
            return queued.pop(0)
        return self.config.webhook_fail_code

    # -- WhatsApp's webhooks, as Meta would post them --------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.webhook_tasks.add(task)
        task.add_done_callback(self.webhook_tasks.discard)

    def user_id(self, phone: str) -> str:
        digits = re.sub(r"\D", "", phone)
        return f"US.SIM{digits[-8:]}"

    def _envelope(self, value: dict[str, Any]) -> dict[str, Any]:
        value = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550100000", "phone_number_id": "100000000000001"},
            **value,
        }
        return {"object": "whatsapp_business_account", "entry": [{"id": "200000000000001", "changes": [
            {"field": "messages", "value": value}]}]}  # fmt: skip

    def status_objects(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """The statuses WhatsApp would report for an outbox entry, before the switches."""
        digits = re.sub(r"\D", "", entry["phone"])
        wamid = f"wamid.SIM{entry['seq']:08d}"
        base_ts = entry["at"] // 1000
        common: dict[str, Any] = {"id": wamid, "recipient_id": digits}
        if self.config.webhook_user_ids:
            common["recipient_user_id"] = self.user_id(digits)
            if self.config.webhook_withhold_phone:
                del common["recipient_id"]
        if entry["status"] == "failed":
            code = entry.get("error_code") or 131047
            error = {"code": code, "title": WA_ERRORS.get(code, "Failed"), "message": WA_ERRORS.get(code, "Failed"),
                     "error_data": {"details": entry.get("reason") or ""}}  # fmt: skip
            return [{**common, "status": "failed", "timestamp": str(base_ts), "errors": [error]}]
        pricing = {"billable": True, "pricing_model": "PMP", "category": "utility", "type": "regular"}
        out = [
            {**common, "status": "sent", "timestamp": str(base_ts), "pricing": pricing,
             "conversation": {"id": f"conv{entry['seq']}", "origin": {"type": "utility"},
                              "expiration_timestamp": str(base_ts + 86400)}},
            {**common, "status": "delivered", "timestamp": str(base_ts + 1), "pricing": pricing},
        ]  # fmt: skip
        if self.config.webhook_read:
            out.append({**common, "status": "read", "timestamp": str(base_ts + 2)})
        return out

    async def _post_statuses(self, entry: dict[str, Any]) -> None:
        config = self.config
        statuses = [s for s in self.status_objects(entry) if s["status"] not in config.webhook_drop]
        if config.webhook_jitter > 0:
            rng = self.random
            if len(statuses) > 1 and rng.random() < config.webhook_drop_sent_rate:
                statuses = [s for s in statuses if s["status"] != "sent"]
            for status in statuses:
                for _ in range(2 if rng.random() < config.webhook_duplicate_rate else 1):
                    delay = config.webhook_delay + rng.random() * config.webhook_jitter
                    self._spawn(self._post_later(delay, status))
            return
        if config.webhook_out_of_order:
            statuses.reverse()
        for status in statuses:
            await asyncio.sleep(config.webhook_delay)
            value: dict[str, Any] = {"statuses": [status]}
            if config.webhook_user_ids:
                value["contacts"] = [
                    {"wa_id": status.get("recipient_id") or "", "user_id": status["recipient_user_id"]}
                ]
                if config.webhook_withhold_phone:
                    value["contacts"] = [{"user_id": status["recipient_user_id"]}]
            for _ in range(2 if config.webhook_duplicates else 1):
                await self.post_webhook(self._envelope(value))

    async def _post_later(self, delay: float, status: dict[str, Any]) -> None:
        await asyncio.sleep(delay)
        await self.post_webhook(self._envelope({"statuses": [status]}))

    async def post_webhook(self, payload: dict[str, Any]) -> int:
        """Post one signed webhook to ``webhook_url``; the HTTP status (0: no answer) goes in ``webhooks``."""
        body = msgspec.json.encode(payload)
        signed = signature(self.config.webhook_secret, body)
        status = 0
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    str(self.config.webhook_url),
                    data=body,
                    headers={"Content-Type": "application/json", "X-Hub-Signature-256": signed},
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as response,
            ):
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        self.webhooks.append({"payload": payload, "status": status, "posted_at": time.time()})
        return status


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATE: web.AppKey[SimState] = web.AppKey("state", SimState)


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def _err(status: int, message: str, *, http_status: int | None = None) -> web.Response:
    body = msgspec.json.encode({"error": {"code": status, "message": message}})
    return web.Response(body=body, status=http_status or status, headers={"Content-Type": ERROR_CT})


class _Bad(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        raise _Bad(400, "Invalid parameters") from None
    if not isinstance(body, dict):
        raise _Bad(400, "Invalid parameters")
    return body


def _contact_or_404(state: SimState, request: web.Request) -> dict[str, Any]:
    raw = request.match_info["contact_id"]
    contact = state.contacts.get(int(raw)) if raw.isdigit() else None
    if contact is None:
        raise _Bad(404, "User not found")
    return contact


# -- the API -------------------------------------------------------------------------------------------


async def find_by_custom_field(request: web.Request) -> web.Response:
    state = request.app[STATE]
    field_id = request.query.get("field_id")
    value = request.query.get("value")
    if not field_id or value is None or not (field_id in ("phone", "email") or field_id.lstrip("-").isdigit()):
        raise _Bad(400, "Invalid parameters")
    matches: list[dict[str, Any]] = []
    for c in state.contacts.values():
        if field_id in ("phone", "-8"):
            hit = c["phone"] == value
        elif field_id in ("email", "-12"):
            hit = c["email"] is not None and c["email"] == value
        else:
            hit = c["fields"].get(int(field_id)) == value
        if hit:
            matches.append(c)
    matches.sort(key=lambda c: c["fields_updated"], reverse=True)
    return _ok({"data": [state.contact_json(c) for c in matches[:100]]})


async def get_contact(request: web.Request) -> web.Response:
    state = request.app[STATE]
    raw = request.match_info["contact_id"]
    if not raw.isdigit():
        raise _Bad(400, "Invalid username supplied")
    contact = state.contacts.get(int(raw))
    if contact is None:
        if state.config.missing_contact == "blank":
            return _ok({"id": 0, "page_id": 0, "first_name": "", "last_name": "", "tags": [], "custom_fields": []})
        raise _Bad(404, "User not found")
    return _ok(state.contact_json(contact))


async def create_contact(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    phone = body.get("phone")
    if not isinstance(phone, str) or not phone.strip():
        raise _Bad(400, "Invalid parameters")
    digits = re.sub(r"\D", "", phone)
    if not 6 <= len(digits) <= 15:
        raise _Bad(400, "Invalid phone number")
    gender = body.get("gender")
    if gender is not None and gender not in ("male", "female", "unknown"):
        raise _Bad(400, "Invalid parameters")
    actions = body.get("actions") or []
    if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
        raise _Bad(400, "Invalid parameters")
    for action in actions:
        if action.get("action") not in ("add_tag", "remove_tag", "set_field_value", "unset_field_value", "send_flow"):
            raise _Bad(400, f"Unknown action {action.get('action')!r}")
    contact_id = int(digits)
    now = state.now_ms()
    contact = state.contacts.get(contact_id)
    created = contact is None
    if contact is None:
        contact = {
            "id": contact_id,
            "phone": state.stored_phone(digits),
            "first_name": body.get("first_name") or "",
            "last_name": body.get("last_name") or "",
            "email": body.get("email"),
            "gender": gender or "unknown",
            "created": now,
            "fields": {},
            "fields_updated": now,
            "tags": set(),
            "last_inbound": now if state.config.inbound_on_create else None,
            "last_sent": 0,
            "last_delivered": 0,
        }
        state.contacts[contact_id] = contact
    elif not state.config.upsert:
        raise _Bad(400, "Contact already exists")
    elif body.get("email") and not contact["email"]:
        contact["email"] = body["email"]
    for action in actions:
        _run_action(state, contact, action)
    reply: dict[str, Any] = {"success": True}
    if state.config.created_id == "data_id":
        reply["data"] = {"id": contact_id, "contact_created": created}
    elif state.config.created_id == "top_id":
        reply["id"] = contact_id
    return _ok(reply)


def _run_action(state: SimState, contact: dict[str, Any], action: dict[str, Any]) -> None:
    kind = action["action"]
    if kind in ("add_tag", "remove_tag"):
        name = action.get("tag_name")
        if not isinstance(name, str) or not name:
            return
        if kind == "add_tag":
            state.tags.setdefault(name, 100000 + len(state.tags) + 1)
            contact["tags"].add(name)
        else:
            contact["tags"].discard(name)
    elif kind in ("set_field_value", "unset_field_value"):
        f = state.find_field(str(action.get("field_name")))
        if f is None:
            return  # unknown names are ignored (contract §9, a guess)
        if kind == "set_field_value":
            contact["fields"][f.id] = _field_text(action.get("value"))
        else:
            contact["fields"].pop(f.id, None)
        contact["fields_updated"] = state.now_ms()
    elif kind == "send_flow":
        _run_flow(state, contact, action.get("flow_id"))


def _field_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


def _run_flow(state: SimState, contact: dict[str, Any], flow_id: Any) -> None:
    try:
        flow = state.flows[int(flow_id)]
    except (KeyError, TypeError, ValueError):
        raise _Bad(404, "Flow not found") from None
    values = {state.fields[fid].name: v for fid, v in contact["fields"].items()}
    rendered = re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), ""), flow.body)
    for _ in range(max(1, state.config.flow_messages)):
        state.deliver(
            contact,
            "flow",
            flow_id=str(flow.id),
            flow_name=flow.name,
            flow_kind=flow.kind,
            text=rendered,
            fields=dict(values),
        )


async def send_text(request: web.Request) -> web.Response:
    state = request.app[STATE]
    contact = _contact_or_404(state, request)
    body = await _json_body(request)
    text = body.get("text")
    channel = body.get("channel", "omnichannel")
    if not isinstance(text, str) or not text or channel not in TEXT_CHANNELS:
        raise _Bad(400, "Invalid parameters")
    state.deliver(contact, "text", text=text, channel=channel)
    return _ok({"success": True})


@functools.lru_cache(maxsize=4)
def _catalog(path: str) -> TemplateCatalog:
    return load_catalog(path)  # read once per file, not on every send


def template_error(template: dict[str, Any], catalog: TemplateCatalog) -> int | None:
    """WhatsApp's error for a Cloud API template object against the approved templates, or None: 132001 for
    a name or language it does not know, 132018 for a badly spaced parameter, 132000 for any other mismatch."""
    approved = catalog.templates.get(str(template.get("name")))
    language = template.get("language")
    if approved is None or not isinstance(language, dict) or language.get("code") not in approved.languages:
        return 132001
    components = [c for c in template.get("components") or [] if isinstance(c, dict)]
    texts: list[str] = []
    body = [c for c in components if c.get("type") == "body"]
    params = [p for c in body for p in c.get("parameters") or [] if isinstance(p, dict)]
    texts += [str(p.get("text", "")) for p in params]
    if isinstance(approved.body, int):
        if len(params) != approved.body or any("parameter_name" in p for p in params):
            return 132000
    elif sorted(str(p.get("parameter_name")) for p in params) != sorted(approved.body):
        return 132000
    headers = [c for c in components if c.get("type") == "header"]
    header_kinds = [p.get("type") for c in headers for p in c.get("parameters") or [] if isinstance(p, dict)]
    if header_kinds != ([approved.header] if approved.header else []):
        return 132000
    texts += [str(p.get("text")) for c in headers for p in c.get("parameters") or [] if p.get("type") == "text"]
    for button in (c for c in components if c.get("type") == "button"):
        raw_index = str(button.get("index", ""))
        index = int(raw_index) if raw_index.isdigit() else -1
        wanted = approved.buttons[index] if 0 <= index < len(approved.buttons) else None
        if wanted is None or button.get("sub_type") != wanted:
            return 132000
    if any(BAD_SPACING.search(t) for t in texts):
        return 132018
    return None


async def send_content(request: web.Request) -> web.Response:
    """Cloud API template objects in ``messages`` go out as WhatsApp templates, inside the 24-hour window or
    not; any other message is free-form content, which needs the window."""
    state = request.app[STATE]
    contact = _contact_or_404(state, request)
    body = await _json_body(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise _Bad(400, "Invalid parameters")
    for message in messages:
        if message.get("type") == "template":
            template = message.get("template")
            if (
                not isinstance(template, dict)
                or not isinstance(template.get("name"), str)
                or not isinstance(template.get("language"), dict)
            ):
                raise _Bad(400, "Invalid parameters")
            entry = state.deliver(contact, "whatsapp_template", template=template, to=message.get("to"))
            if state.config.wa_templates_file:
                code = template_error(template, _catalog(state.config.wa_templates_file))
                if code is not None:
                    entry["status"], entry["error_code"] = "failed", code
                    entry["reason"] = "parameter format" if code == 132018 else "template parameters mismatch"
        else:
            inner = message.get("message")
            state.deliver(contact, "content", text=inner.get("text") if isinstance(inner, dict) else None)
    return _ok({"success": True})


async def send_file(request: web.Request) -> web.Response:
    state = request.app[STATE]
    contact = _contact_or_404(state, request)
    body = await _json_body(request)
    url = body.get("url")
    file_type = body.get("type")
    channel = body.get("channel", "omnichannel")
    if not isinstance(url, str) or not url or file_type not in FILE_TYPES or channel not in FILE_CHANNELS:
        raise _Bad(400, "Invalid parameters")
    state.deliver(contact, "file", url=url, type=file_type, channel=channel)
    return _ok({"success": True})


async def send_flow(request: web.Request) -> web.Response:
    state = request.app[STATE]
    contact = _contact_or_404(state, request)
    flow_id = request.match_info["flow_id"]
    if not flow_id.isdigit():
        raise _Bad(400, "Invalid parameters")
    _run_flow(state, contact, flow_id)
    return _ok({"success": True})


async def set_custom_field(request: web.Request) -> web.Response:
    state = request.app[STATE]
    contact = _contact_or_404(state, request)
    raw_field = request.match_info["field_id"]
    field_id = int(raw_field) if raw_field.lstrip("-").isdigit() else None
    if field_id is None or field_id not in state.fields:
        raise _Bad(404, "Custom field not found")
    value: Any
    if request.content_type == "application/x-www-form-urlencoded":
        value = (await request.post()).get("value")
    elif request.content_type == "application/json" and not state.config.form_only_fields:
        value = (await _json_body(request)).get("value")
    else:
        raise _Bad(400, "Invalid parameters")
    if value is None or not isinstance(value, (str, int, float)):
        raise _Bad(400, "Invalid parameters")
    contact["fields"][field_id] = _field_text(value)
    contact["fields_updated"] = state.now_ms()
    return _ok({"success": True})


async def contact_custom_fields(request: web.Request) -> web.Response:
    state = request.app[STATE]
    contact = _contact_or_404(state, request)
    return _ok([state.field_json(fid, v) for fid, v in sorted(contact["fields"].items())])


async def list_flows(request: web.Request) -> web.Response:
    return _ok([{"id": f.id, "name": f.name} for f in request.app[STATE].flows.values()])


async def list_custom_fields(request: web.Request) -> web.Response:
    fields = request.app[STATE].fields.values()
    return _ok([{"id": f.id, "name": f.name, "type": f.type, "description": f.description} for f in fields])


async def account(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _ok(
        {
            "page_id": PAGE_ID,
            "name": "cgb-worker simulator",
            "active": True,
            "created": 1700000000 if state.config.account_created == "int" else "2023-11-14 22:13:20",
            "total_users": len(state.contacts),
        }
    )


# -- middleware: token, faults, latency, bookkeeping ---------------------------------------------------


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/_sim/"):
        return await handler(request)
    state = request.app[STATE]
    endpoint = _endpoint_name(request)
    state.counts[endpoint] += 1
    state.counts["total"] += 1
    if state.config.record_requests:
        state.requests.append(await _describe(request, endpoint))
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        if request.headers.get("X-ACCESS-TOKEN") != state.config.token:
            return _err(401, "No valid API key provided.")
        if state.config.latency:
            await asyncio.sleep(state.config.latency)
        rule = _pick_fault(state, request)
        if rule is not None and rule.delay:
            await asyncio.sleep(rule.delay)
        if rule is not None and rule.acts and not rule.after:
            return _fault_response(rule, request)
        try:
            response = await handler(request)
        except web.HTTPNotFound:
            return _err(404, "Not found")
        except web.HTTPMethodNotAllowed:
            return _err(405, "Method not allowed")
        except _Bad as bad:
            return _err(bad.status, bad.message)
        if rule is not None and rule.acts:
            return _fault_response(rule, request)
        return response
    finally:
        state.in_flight -= 1


def _endpoint_name(request: web.Request) -> str:
    route = request.match_info.route
    name = route.name if route is not None and route.name else None
    return name or "unknown"


async def _describe(request: web.Request, endpoint: str) -> dict[str, Any]:
    raw = await request.read()
    body: Any = None
    if raw:
        if request.content_type == "application/x-www-form-urlencoded":
            body = dict((await request.post()).items())
        else:
            try:
                body = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                body = raw.decode(errors="replace")
    return {
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "endpoint": endpoint,
        "content_type": request.content_type if raw else None,
        "body": body,
        "at": time.time(),
    }


def _pick_fault(state: SimState, request: web.Request) -> FaultRule | None:
    for rule in state.faults:
        if rule.method and rule.method.upper() != request.method:
            continue
        if rule.path and not re.search(rule.path, request.path):
            continue
        if rule.count is not None:
            if rule.hits >= rule.count:
                continue
        elif rule.rate is not None and state.random.random() >= rule.rate:
            continue
        rule.hits += 1
        return rule
    return None


def _fault_response(rule: FaultRule, request: web.Request) -> web.Response:
    if rule.drop:
        # Close the socket with no answer: the client sees a broken connection, as on a crashed proxy.
        if request.transport is not None:
            request.transport.abort()
        return _err(500, "dropped")
    if rule.status is not None:
        response = _err(rule.status, f"Injected {rule.status}")
        if rule.retry_after is not None:
            response.headers["Retry-After"] = rule.retry_after
        return response
    if rule.error_in_200 is not None:
        return _err(rule.error_in_200, f"Injected error {rule.error_in_200}", http_status=200)
    return _ok({"success": False, "message": "Injected failure"})


# -- sim-only endpoints ---------------------------------------------------------------------------------


async def sim_outbox(request: web.Request) -> web.Response:
    return _ok(request.app[STATE].outbox)


async def sim_requests(request: web.Request) -> web.Response:
    since = int(request.query.get("since", "0"))
    return _ok(request.app[STATE].requests[since:])


async def sim_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _ok(
        {
            "counts": dict(state.counts),
            "contacts": len(state.contacts),
            "outbox": len(state.outbox),
            "in_flight": state.in_flight,
            "max_in_flight": state.max_in_flight,
        }
    )


async def sim_contacts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _ok([{**state.contact_json(c), "phone": c["phone"], "email": c["email"]} for c in state.contacts.values()])


async def sim_inbound(request: web.Request) -> web.Response:
    """Pretend the contact wrote to us, which opens (or, with an old ``at``, shuts) the 24-hour window."""
    state = request.app[STATE]
    body = await request.json()
    digits = re.sub(r"\D", "", str(body.get("phone", "")))
    contact = state.contacts.get(int(digits)) if digits else None
    if contact is None:
        return _err(404, "User not found")
    contact["last_inbound"] = int(body.get("at") or state.now_ms())
    if state.config.webhook_url:
        digits = str(contact["id"])
        sender: dict[str, Any] = {"profile": {"name": contact["first_name"] or "Sim"}, "wa_id": digits}
        message: dict[str, Any] = {
            "from": digits,
            "id": f"wamid.SIMIN{len(state.webhooks) + 1:06d}",
            "timestamp": str(contact["last_inbound"] // 1000),
            "type": "text",
            "text": {"body": str(body.get("text") or "hello")},
        }
        if state.config.webhook_user_ids:
            sender["user_id"] = message["from_user_id"] = state.user_id(digits)
        await state.post_webhook(state._envelope({"contacts": [sender], "messages": [message]}))
    return _ok({"success": True})


async def sim_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.method == "POST":
        changes = await request.json()
        state.config = msgspec.convert({**msgspec.to_builtins(state.config), **changes}, SimConfig)
    return _ok(state.config)


async def sim_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.method == "DELETE":
        state.faults.clear()
    elif request.method == "POST":
        body = await request.json()
        rules = body if isinstance(body, list) else [body]
        state.faults.extend(msgspec.convert(r, FaultRule) for r in rules)
    return _ok(state.faults)


async def sim_outage(request: web.Request) -> web.Response:
    """Stop accepting connections for ``seconds``: callers see "connection refused", as in a real outage."""
    body = await request.json()
    seconds = float(body.get("seconds", 5))
    listener = request.app[STATE].listener
    if listener is None:
        return _err(501, "this simulator was not started with a listener it can close")
    asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(listener.outage(seconds)))
    return _ok({"success": True, "seconds": seconds})


class Listener:
    """The simulator's listening socket, which it can close for a while and open again on the same port."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port
        self.site: web.TCPSite | None = None

    async def start(self) -> int:
        self.site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        await self.site.start()
        server = self.site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def outage(self, seconds: float) -> None:
        if self.site is not None:
            await self.site.stop()
        await asyncio.sleep(seconds)
        await self.start()


async def sim_webhooks(request: web.Request) -> web.Response:
    """Every webhook posted so far, and how many are still to come."""
    state = request.app[STATE]
    return _ok({"posted": state.webhooks, "pending": len(state.webhook_tasks)})


async def sim_reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    keep_token = state.config.token
    state.reset()
    state.config = SimConfig(token=keep_token)
    return _ok({"success": True})


def create_app(state: SimState | None = None, *, legacy_users: bool = True) -> web.Application:
    """The simulator as an aiohttp app. ``legacy_users`` also serves ``/api/users/...`` (seen in old code)."""
    app = web.Application(middlewares=[api_middleware])
    app[STATE] = state or SimState()
    r = app.router
    prefixes = ["/api/contacts"] + (["/api/users"] if legacy_users else [])
    for i, prefix in enumerate(prefixes):
        suffix = "" if i == 0 else "_legacy"
        r.add_get(f"{prefix}/find_by_custom_field", find_by_custom_field, name="find_contacts" + suffix)
        r.add_post(f"{prefix}/{{contact_id}}/send/text", send_text, name="send_text" + suffix)
        r.add_post(f"{prefix}/{{contact_id}}/send/file", send_file, name="send_file" + suffix)
        r.add_post(f"{prefix}/{{contact_id}}/send/{{flow_id}}", send_flow, name="send_flow" + suffix)
        r.add_post(f"{prefix}/{{contact_id}}/send_content", send_content, name="send_content" + suffix)
        r.add_get(f"{prefix}/{{contact_id}}/custom_fields", contact_custom_fields, name="contact_fields" + suffix)
        r.add_post(
            f"{prefix}/{{contact_id}}/custom_fields/{{field_id}}", set_custom_field, name="set_custom_field" + suffix
        )
        r.add_get(f"{prefix}/{{contact_id}}", get_contact, name="get_contact" + suffix)
        r.add_post(prefix, create_contact, name="create_contact" + suffix)
    r.add_get("/api/accounts/flows", list_flows, name="list_flows")
    r.add_get("/api/accounts/custom_fields", list_custom_fields, name="list_custom_fields")
    r.add_get("/api/accounts/me", account, name="account")
    r.add_route("*", "/api/{tail:.*}", _unknown_path, name="unknown")
    r.add_get("/_sim/outbox", sim_outbox)
    r.add_get("/_sim/requests", sim_requests)
    r.add_get("/_sim/stats", sim_stats)
    r.add_get("/_sim/contacts", sim_contacts)
    r.add_post("/_sim/inbound", sim_inbound)
    r.add_get("/_sim/webhooks", sim_webhooks)
    r.add_route("*", "/_sim/config", sim_config)
    r.add_route("*", "/_sim/faults", sim_faults)
    r.add_post("/_sim/reset", sim_reset)
    r.add_post("/_sim/outage", sim_outage)
    return app


async def _unknown_path(request: web.Request) -> web.Response:
    return _err(404, "Not found")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cgb-simulator", description="Run the local CGB simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the X-ACCESS-TOKEN it accepts")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every API response")
    parser.add_argument("--seed", type=int, default=None, help="seed for random faults")
    parser.add_argument("--no-request-log", action="store_true", help="keep counts only (for long benchmarks)")
    parser.add_argument("--wa-templates", help="a WA_TEMPLATES_FILE of its own: mismatched templates then fail")
    args = parser.parse_args(argv)
    config = SimConfig(
        token=args.token,
        latency=args.latency,
        record_requests=not args.no_request_log,
        wa_templates_file=args.wa_templates,
    )
    asyncio.run(_serve(create_app(SimState(config, seed=args.seed)), args.host, args.port))


async def _serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT. A port it cannot listen on is one line on stderr and exit 2; once it
    listens, one line says where."""
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    listener = Listener(runner, host, port)
    app[STATE].listener = listener
    try:
        await listener.start()
    except OSError as exc:
        await runner.cleanup()
        sys.stderr.write(f"cgb-simulator: {listen_problem('--port', host, port, exc)}\n")
        raise SystemExit(2) from None
    token = app[STATE].config.token
    sys.stderr.write(f"CGB simulator on http://{host}:{listener.port}/api (token {token!r}); Ctrl-C stops it\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
