"""The CGB HTTP client: one method does HTTP, one function turns a response into a value or an error.

:class:`CGBClient` wraps one shared :class:`aiohttp.ClientSession` that the worker owns. It never retries
and never sleeps: every failure leaves as a typed :mod:`cgb_worker.errors` exception that says whether it
is retryable, and the job decides. CGB's quirks are handled here and nowhere else:

* bodies are parsed by shape, not Content-Type (CGB serves JSON errors as ``text/html``);
* a 2xx is a success only if the body has no ``error`` key and ``success`` is not ``false``;
* a contact that comes back with empty fields is "not found";
* ids are strings, whatever CGB sends;
* a phone is looked up as ``+E164`` first, then as bare digits (CGB matches the stored string exactly);
* the id of a created contact is read from ``data.id``, else ``id`` (None when neither is there);
* objects are parsed leniently (:func:`~cgb_worker.models.from_cgb`): a field the worker does not use never
  fails a call, and one it needs, missing or mistyped, is a :class:`CGBResponseError` naming the endpoint.

Before every request the client asks the fleet-wide rate limiter for a slot, waiting at most what is left of
the current try (:func:`~cgb_worker.ratelimit.try_budget`), then runs the request's ``before_send`` hook (the
job marks a send step there, so that the mark is the last thing before the request leaves).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlencode

import aiohttp
import msgspec

from .errors import (
    CGBAPIError,
    CGBAuthError,
    CGBBadRequestError,
    CGBConnectError,
    CGBError,
    CGBNotFoundError,
    CGBRateLimitError,
    CGBResponseError,
    CGBServerError,
    CGBTimeoutError,
)
from .models import Account, Contact, ContactAction, CustomField, Flow, from_cgb
from .phones import contact_id_for
from .ratelimit import LATE, try_budget
from .settings import Secret

__all__ = ["CGBClient", "error_for_response"]

USER_AGENT = "cgb-worker/0.1"
PHONE_FIELD_ID = "phone"
WHATSAPP = "whatsapp"
FILE_TYPES: Mapping[str, str] = {"image": "image", "document": "file", "video": "video", "audio": "audio"}
"""Our ``fileType`` names to the ``type`` CGB's send/file takes (documents are ``file``)."""


class Limiter(Protocol):
    """What the client asks before every request (see :mod:`cgb_worker.ratelimit`)."""

    async def acquire(self, max_wait: float | None = None) -> float: ...

    async def penalize(self, retry_after: float | None) -> None: ...


RequestHook = Callable[[str, int | None, float], None]
"""Called after every request with (endpoint, HTTP status or None on transport failure, seconds)."""

BeforeSend = Callable[[], Awaitable[None]]
"""Run after the request's rate-limit slot, immediately before it leaves."""

_json_encoder = msgspec.json.Encoder()


class CGBClient:
    """Typed access to the CGB endpoints the worker uses. Holds no state besides its collaborators."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_key: Secret,
        *,
        base_url: str = "https://app.chatgptbuilder.io/api",
        timeout: float = 30.0,
        on_request: RequestHook | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self._session = session
        self._limiter = limiter
        self._base_url = base_url.rstrip("/")
        self._headers = {
            "X-ACCESS-TOKEN": api_key.get_secret_value(),
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._form_headers = {**self._headers, "Content-Type": "application/x-www-form-urlencoded"}
        self.timeout = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._on_request = on_request

    def __repr__(self) -> str:
        return f"CGBClient(base_url={self._base_url!r}, api_key=[secure])"

    # -- contacts -----------------------------------------------------------------------------------

    async def find_contacts(self, field_id: str, value: str) -> list[Contact]:
        """``GET /contacts/find_by_custom_field``: up to 100 contacts whose field equals ``value``."""
        body = await self.request(
            "GET", "/contacts/find_by_custom_field", "find_contacts", params={"field_id": field_id, "value": value}
        )
        data = body.get("data") if isinstance(body, dict) else body
        if data is None:
            return []
        if not isinstance(data, list):
            raise CGBResponseError("expected {'data': [...]}", status=200, endpoint="find_contacts")
        contacts = [from_cgb(c, Contact, endpoint="find_contacts") for c in data if isinstance(c, dict)]
        return [c for c in contacts if not c.is_blank]

    async def find_contact_by_phone(self, e164: str) -> Contact | None:
        """The contact with this phone: looked up as ``+E164``, then as digits; None when neither matches."""
        for value in (e164, contact_id_for(e164)):
            found = await self.find_contacts(PHONE_FIELD_ID, value)
            if found:
                return found[0]
        return None

    async def get_contact(self, contact_id: str) -> Contact:
        """``GET /contacts/{id}``; a 404 or a blank object raises :class:`CGBNotFoundError`."""
        body = await self.request("GET", f"/contacts/{_seg(contact_id)}", "get_contact")
        contact = from_cgb(body, Contact, endpoint="get_contact") if isinstance(body, dict) else None
        if contact is None or contact.is_blank:
            raise CGBNotFoundError("contact not found", status=200, endpoint="get_contact")
        return contact

    async def create_contact(
        self,
        phone: str,
        *,
        first_name: str | None = None,
        last_name: str | None = None,
        email: str | None = None,
        actions: Sequence[ContactAction] = (),
    ) -> str | None:
        """``POST /contacts`` (CGB upserts by phone) and run ``actions`` in order; return the contact id, or
        None when CGB's answer carries none (for a WhatsApp contact it is the phone's digits)."""
        payload: dict[str, Any] = {"phone": phone}
        if first_name:
            payload["first_name"] = first_name
        if last_name:
            payload["last_name"] = last_name
        if email:
            payload["email"] = email
        if actions:
            payload["actions"] = list(actions)
        body = await self.request("POST", "/contacts", "create_contact", json=payload, expect_json=False)
        return _created_id(body)

    async def set_custom_field(self, contact_id: str, field_id: str, value: str | int | float) -> None:
        """``POST /contacts/{id}/custom_fields/{field}``, form-encoded ``value``."""
        await self.request(
            "POST",
            f"/contacts/{_seg(contact_id)}/custom_fields/{_seg(field_id)}",
            "set_custom_field",
            form={"value": _form_value(value)},
            expect_json=False,
        )

    # -- sending ------------------------------------------------------------------------------------

    async def send_text(
        self, contact_id: str, text: str, *, channel: str = WHATSAPP, before_send: BeforeSend | None = None
    ) -> None:
        await self.request(
            "POST",
            f"/contacts/{_seg(contact_id)}/send/text",
            "send_text",
            json={"text": text, "channel": channel},
            expect_json=False,
            before_send=before_send,
        )

    async def send_file(
        self,
        contact_id: str,
        url: str,
        file_type: Literal["image", "document", "video", "audio"],
        *,
        channel: str = WHATSAPP,
        before_send: BeforeSend | None = None,
    ) -> None:
        await self.request(
            "POST",
            f"/contacts/{_seg(contact_id)}/send/file",
            "send_file",
            json={"url": url, "type": FILE_TYPES[file_type], "channel": channel},
            expect_json=False,
            before_send=before_send,
        )

    async def send_content(
        self, contact_id: str, messages: Sequence[Mapping[str, Any]], *, before_send: BeforeSend | None = None
    ) -> None:
        """``POST /contacts/{id}/send_content`` with ``{"messages": [...]}`` (Cloud API template objects, for one)."""
        await self.request(
            "POST",
            f"/contacts/{_seg(contact_id)}/send_content",
            "send_content",
            json={"messages": list(messages)},
            expect_json=False,
            before_send=before_send,
        )

    async def send_flow(self, contact_id: str, flow_id: str, *, before_send: BeforeSend | None = None) -> None:
        """``POST /contacts/{id}/send/{flow_id}``, no body (the spec declares a form with no fields)."""
        await self.request(
            "POST",
            f"/contacts/{_seg(contact_id)}/send/{_seg(flow_id)}",
            "send_flow",
            expect_json=False,
            before_send=before_send,
        )

    # -- account ------------------------------------------------------------------------------------

    async def list_flows(self) -> list[Flow]:
        return _list_of(await self.request("GET", "/accounts/flows", "list_flows"), Flow, "list_flows")

    async def list_custom_fields(self) -> list[CustomField]:
        body = await self.request("GET", "/accounts/custom_fields", "list_custom_fields")
        return _list_of(body, CustomField, "list_custom_fields")

    async def account(self) -> Account:
        """``GET /accounts/me``: the cheapest call that proves the API key works."""
        return from_cgb(await self.request("GET", "/accounts/me", "account"), Account, endpoint="account")

    # -- the one place that does HTTP ---------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        form: Mapping[str, str] | None = None,
        expect_json: bool = True,
        before_send: BeforeSend | None = None,
    ) -> Any:
        """Send one request and return its decoded body (None when empty), or raise a :class:`CGBError`.

        ``endpoint`` names the operation in errors and metrics; it never holds ids or phone numbers. A 2xx
        whose body is not JSON is a success (the contract's rule: no ``error`` key, no ``success: false``)
        for calls that need no answer (``expect_json=False``) and a :class:`CGBResponseError` otherwise.
        """
        headers = self._headers
        data: bytes | None = None
        if json is not None:
            data = _json_encoder.encode(json)
            headers = self._json_headers
        elif form is not None:
            data = urlencode(dict(form)).encode()
            headers = self._form_headers
        slot = 0.0
        if self._limiter is not None:
            slot = await self._limiter.acquire(try_budget(self.timeout))
        if before_send is not None:
            await before_send()
            # The mark took long: leaving now would put this request beside the next second's.
            while self._limiter is not None and time.monotonic() - slot > LATE:
                slot = await self._limiter.acquire(try_budget(self.timeout))
        started = time.perf_counter()
        status: int | None = None
        try:
            async with self._session.request(
                method,
                self._base_url + path,
                params=params,
                data=data,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                raw = await response.read()
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL) as exc:
            raise CGBConnectError(f"cannot connect to CGB on {endpoint}: {type(exc).__name__}") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise CGBTimeoutError(f"CGB did not answer {endpoint} in time") from exc
        except aiohttp.ClientError as exc:
            raise CGBTimeoutError(f"connection to CGB broke during {endpoint}: {type(exc).__name__}") from exc
        finally:
            if self._on_request is not None:
                self._on_request(endpoint, status, time.perf_counter() - started)
        body = _decode(raw)
        error = error_for_response(status, body, endpoint=endpoint, retry_after=retry_after, size=len(raw))
        if error is not None:
            if isinstance(error, CGBRateLimitError) and self._limiter is not None:
                await self._limiter.penalize(error.retry_after)
            raise error
        if body is _UNDECODABLE:
            if expect_json:
                raise CGBResponseError(f"body is not JSON ({len(raw)} bytes)", status=status, endpoint=endpoint)
            return None
        return body


def error_for_response(
    status: int,
    body: Any,
    *,
    endpoint: str,
    retry_after: str | None = None,
    size: int = 0,
) -> CGBError | None:
    """The exception a response stands for, or None when it is a success. The one mapping table."""
    if 200 <= status < 300:
        if isinstance(body, dict) and body.get("error") not in (None, False, "", {}):
            code, message = _error_fields(body["error"])
            cls = _class_for_status(code) if code is not None and 400 <= code < 600 else CGBBadRequestError
            return _build(cls, message, status=status, code=code, endpoint=endpoint, retry_after=retry_after)
        if isinstance(body, dict) and body.get("success") is False:
            message = body.get("message")
            text = message if isinstance(message, str) and message else "CGB answered success: false"
            return CGBBadRequestError(text, status=status, endpoint=endpoint)
        return None
    code, message = _error_fields(body.get("error") if isinstance(body, dict) else None)
    if message is None:
        message = "no error message" if body is None else f"unexpected body ({size} bytes)"
    return _build(
        _class_for_status(status), message, status=status, code=code, endpoint=endpoint, retry_after=retry_after
    )


def _class_for_status(status: int) -> type[CGBAPIError]:
    if status == 429:
        return CGBRateLimitError
    if status in (401, 403):
        return CGBAuthError
    if status == 404:
        return CGBNotFoundError
    if status == 408 or 500 <= status < 600:
        return CGBServerError
    if 400 <= status < 500:
        return CGBBadRequestError
    return CGBResponseError


def _build(
    cls: type[CGBAPIError],
    message: str | None,
    *,
    status: int,
    code: int | None,
    endpoint: str,
    retry_after: str | None,
) -> CGBAPIError:
    text = message or "no error message"
    if cls is CGBRateLimitError:
        return CGBRateLimitError(
            text, status=status, code=code, endpoint=endpoint, retry_after=parse_retry_after(retry_after)
        )
    return cls(text, status=status, code=code, endpoint=endpoint)


def _error_fields(error: Any) -> tuple[int | None, str | None]:
    """(code, message) from CGB's ``{"code": ..., "message": ...}``, or from a bare string."""
    if isinstance(error, str):
        return None, error[:300]
    if not isinstance(error, dict):
        return None, None
    code: int | None = None
    raw_code = error.get("code")
    if isinstance(raw_code, int) and not isinstance(raw_code, bool):
        code = raw_code
    elif isinstance(raw_code, str) and raw_code.strip().isdigit():
        code = int(raw_code)
    message = error.get("message")
    return code, (str(message)[:300] if message is not None else None)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date); None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


class _Undecodable:
    def __repr__(self) -> str:
        return "<undecodable body>"


_UNDECODABLE: Any = _Undecodable()


def _decode(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return _UNDECODABLE


def _created_id(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    data = body.get("data")
    for source in (data, body):
        if isinstance(source, dict):
            value = source.get("id")
            if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value) not in ("", "0"):
                return str(value)
    return None


def _list_of(body: Any, type_: type[Any], endpoint: str) -> list[Any]:
    items = body.get("data") if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise CGBResponseError("expected a JSON array", status=200, endpoint=endpoint)
    return [from_cgb(item, type_, endpoint=endpoint) for item in items if isinstance(item, dict)]


def _seg(value: str) -> str:
    return quote(str(value), safe="-")


def _form_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
