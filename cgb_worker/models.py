"""msgspec Structs for everything that crosses a boundary.

Two kinds, two policies:

* CGB objects (:class:`Contact`, :class:`Flow`, :class:`CustomField`, :class:`Account`) are parsed leniently:
  unknown fields are ignored, every field has a default, and ids are strings (CGB sends int64 ids, some
  past 2^53, and WhatsApp contact ids are phone digits). :func:`from_cgb` does the conversion.
* Our own job payload (:class:`SendJob`) is strict: an unknown field is an error, so a producer's typo
  never silently drops content. The job result (:class:`SendResult`) is what ``Job.result()`` returns.
  Field names on the wire are the camelCase ones producers already send (``fileUrl``, ``firstName``).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

from .errors import CGBResponseError

Scalar = str | int | float | bool | None
HEADER_KINDS = ("text", "image", "video", "document")
"""A WhatsApp template header's kinds; all but ``text`` are media."""
FileType = Literal["image", "document", "video", "audio"]
Category = Literal["marketing", "utility", "authentication", "service"]
"""WhatsApp's message categories. Opt-outs, quiet hours and the marketing cap (131049) are per category."""
CATEGORIES: tuple[Category, ...] = ("marketing", "utility", "authentication", "service")


class Tag(msgspec.Struct, frozen=True):
    id: str
    name: str = ""


class ContactField(msgspec.Struct, frozen=True):
    """A custom field as it is set on one contact."""

    id: str
    name: str = ""
    type: int = 0
    value: str | int | float | None = None


class Contact(msgspec.Struct, frozen=True):
    """A CGB contact. ``phone`` and ``email`` are not in CGB's documented model and are often absent."""

    id: str = ""
    page_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    channel: int | None = None
    subscribed: int | None = None
    last_interaction: int | None = None
    tags: list[Tag] = msgspec.field(default_factory=list)
    custom_fields: list[ContactField] = msgspec.field(default_factory=list)
    phone: str | None = None
    email: str | None = None

    @property
    def is_blank(self) -> bool:
        """CGB has been seen answering an unknown id with an object whose fields are all empty."""
        return not self.id or self.id == "0" or (not self.page_id and not self.first_name and not self.channel)


class Flow(msgspec.Struct, frozen=True):
    id: str
    name: str = ""


class CustomField(msgspec.Struct, frozen=True):
    """An account-level custom field definition. ``type``: 0 text, 1 number, 2 date, 3 datetime, 4 boolean,
    5 long text, 6 select, 7 multi-select."""

    id: str
    name: str = ""
    type: int = 0
    description: str | None = None


class Account(msgspec.Struct, frozen=True):
    """``GET /accounts/me``. The vendor's Swagger gives ``created`` as an integer in one place and a string in
    another; it is only shown, so either is kept as it came."""

    page_id: str = ""
    name: str = ""
    active: bool | int | None = None
    created: int | str | None = None
    total_users: int | None = None


class AddTag(msgspec.Struct, frozen=True, tag_field="action", tag="add_tag"):
    tag_name: str


class SetFieldValue(msgspec.Struct, frozen=True, tag_field="action", tag="set_field_value"):
    field_name: str
    value: str | int | float


class SendFlow(msgspec.Struct, frozen=True, tag_field="action", tag="send_flow"):
    flow_id: int


ContactAction = AddTag | SetFieldValue | SendFlow


class TemplateMedia(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    url: str
    filename: str | None = None
    """Documents only: the name the recipient sees."""


class TemplateHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Exactly one of the four kinds (checked by the job)."""

    text: str | None = None
    image: TemplateMedia | None = None
    video: TemplateMedia | None = None
    document: TemplateMedia | None = None

    @property
    def kinds(self) -> list[str]:
        """The kinds given (a valid header has exactly one)."""
        return [k for k in HEADER_KINDS if getattr(self, k) is not None]

    @property
    def media(self) -> TemplateMedia | None:
        return self.image or self.video or self.document


class TemplateButton(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A URL button's suffix (``url``) or a quick-reply button's ``payload``, for the button at ``index``."""

    index: int
    url: str | None = None
    payload: str | None = None


class WhatsAppTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A Meta-approved WhatsApp template, sent through CGB's ``send_content`` as a Cloud API template object.

    ``body`` is a list for positional parameters (``{{1}}``...) or a mapping for named ones."""

    name: str
    language: str
    body: list[str] | dict[str, str] | None = None
    header: TemplateHeader | None = None
    buttons: list[TemplateButton] | None = None


class SendJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel", omit_defaults=True):
    """The ``whatsapp_send`` payload. Which combinations are valid is checked by the job, not here."""

    to: str
    message: str | None = None
    template: str | None = None
    variables: dict[str, Scalar] | None = None
    file_url: str | None = None
    file_type: FileType | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    whatsapp_template: WhatsAppTemplate | None = None
    category: Category | None = None
    """Left out: a native template's ``category`` in ``WA_TEMPLATES_FILE``, else ``utility``; a flow template
    ``utility``; a text or a file ``service``."""
    expires_at: str | None = None
    """ISO 8601 with an offset: not sent after it (:class:`~cgb_worker.errors.ExpiredError`)."""


class SendResult(msgspec.Struct, frozen=True, rename="camel"):
    """What a finished ``whatsapp_send`` job returns. ``message_id`` is always None: CGB returns none."""

    success: bool
    contact_id: str | None
    to: str
    timestamp: str
    """ISO 8601, UTC, of when the send was acknowledged (or the job gave up)."""
    message_id: str | None = None
    error: str | None = None
    kind: Literal["text", "template", "file", "whatsapp_template"] | None = None
    flow_id: str | None = None
    fallback: bool = False
    """A template that maps to no flow was replaced by the job's ``message``."""
    attempts: int = 1
    possible_duplicate: bool = False
    """An earlier try may have sent this message too (its outcome was unknown); see ``CGB_UNKNOWN_OUTCOME``."""
    template_name: str | None = None
    """A ``whatsapp_template``'s name (and, in ``language``, its language code)."""
    language: str | None = None
    window: Literal["open", "closed", "unknown"] = "unknown"
    """The contact's 24-hour window when the job ran, as the webhook receiver knows it
    (:func:`cgb_worker.deliveries.window_state`)."""
    category: Category | None = None
    """The job's category, given or defaulted (:func:`cgb_worker.jobs.category_of`)."""


_T = TypeVar("_T")
_ID_KEYS = frozenset({"id", "page_id", "flow_id"})


def ids_to_str(obj: Any) -> Any:
    """Return ``obj`` with every integer under an id key turned into a string, at any depth."""
    if isinstance(obj, dict):
        return {
            k: (str(v) if k in _ID_KEYS and isinstance(v, int) and not isinstance(v, bool) else ids_to_str(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [ids_to_str(v) for v in obj]
    return obj


def from_cgb(obj: Any, type: type[_T], *, endpoint: str) -> _T:
    """Convert a decoded CGB object to ``type``, leniently: ``"5"`` for 5 is fine, unknown fields are ignored,
    and a field the worker does not need (one with a default) that is missing or of a type it cannot take
    is left at its default. A needed field (no default) missing or unusable, or a body that is not an
    object, is a :class:`CGBResponseError` naming ``endpoint``."""
    if not isinstance(obj, dict):
        raise CGBResponseError(f"expected an object, got {_kind(obj)}", status=200, endpoint=endpoint)
    obj = ids_to_str(obj)
    try:
        return msgspec.convert(obj, type, strict=False)
    except msgspec.ValidationError:
        pass
    kept: dict[str, Any] = {}
    for field in msgspec.structs.fields(type):  # type: ignore[arg-type]
        needed = field.required
        if field.encode_name not in obj:
            if needed:
                raise CGBResponseError(f"{field.encode_name!r} is missing", status=200, endpoint=endpoint)
            continue
        try:
            kept[field.encode_name] = msgspec.convert(obj[field.encode_name], field.type, strict=False)
        except msgspec.ValidationError:
            if needed:
                raise CGBResponseError(
                    f"{field.encode_name!r} is {_kind(obj[field.encode_name])}", status=200, endpoint=endpoint
                ) from None
    return msgspec.convert(kept, type, strict=False)


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"
