"""CGBClient unit tests: the exact request of every call, and the one response-to-error table."""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
import pytest
from aioresponses import aioresponses
from aioresponses import core as aioresponses_core
from yarl import URL

from cgb_worker import errors
from cgb_worker.client import CGBClient, error_for_response, parse_retry_after
from cgb_worker.models import AddTag, SendFlow, SetFieldValue
from cgb_worker.settings import Secret

BASE = "https://cgb.test/api"
KEY = "1000001.UnitTestKeyNotRealAbcdefghijklmnopq"
HEADERS = {"X-ACCESS-TOKEN": KEY, "Accept": "application/json", "User-Agent": "cgb-worker/0.1"}
CONTACT = {
    "id": 972500000001,
    "page_id": 1000001,
    "first_name": "Dana",
    "last_name": "",
    "channel": 5,
    "subscribed": 1,
    "tags": [{"id": 100001, "name": "visa"}],
    "custom_fields": [{"id": 612004, "name": "deadline", "type": 2, "value": 1767225600}],
}


@pytest.fixture
async def client() -> AsyncIterator[CGBClient]:
    async with aiohttp.ClientSession() as session:
        yield CGBClient(session, Secret(KEY), base_url=BASE + "/", timeout=5)


class _FinishedWriter:
    output_size = 0


class _MockResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required ``stream_writer`` (aioresponses issue #289)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _FinishedWriter())
        super().__init__(*args, **kwargs)


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _MockResponse)
    with aioresponses() as m:
        yield m


def sent(mock: Any, method: str, url: str) -> list[dict[str, Any]]:
    """The kwargs of every call made to ``method url`` (query string included in ``url``)."""
    return [call.kwargs for call in mock.requests.get((method, URL(url)), [])]


def only_call(mock: Any, method: str, url: str) -> dict[str, Any]:
    calls = sent(mock, method, url)
    assert len(calls) == 1, f"{method} {url}: {len(calls)} calls; all: {list(mock.requests)}"
    assert len(mock.requests) == 1, f"other calls were made: {list(mock.requests)}"
    return calls[0]


def assert_json_call(call: dict[str, Any], body: Any) -> None:
    assert call["headers"] == {**HEADERS, "Content-Type": "application/json"}
    assert msgspec.json.decode(call["data"]) == body


# -- the exact request of every endpoint -----------------------------------------------------------------


async def test_find_contacts(client: CGBClient, mock: Any) -> None:
    url = f"{BASE}/contacts/find_by_custom_field?field_id=phone&value=%2B972500000001"
    mock.get(url, payload={"data": [CONTACT]})
    found = await client.find_contacts("phone", "+972500000001")
    call = only_call(mock, "GET", url)
    assert call["headers"] == HEADERS
    assert call["data"] is None
    assert call["params"] == {"field_id": "phone", "value": "+972500000001"}
    assert len(found) == 1
    assert found[0].id == "972500000001"
    assert found[0].page_id == "1000001"
    assert found[0].tags[0].id == "100001"
    assert found[0].custom_fields[0].value == 1767225600


async def test_find_by_phone_falls_back_to_digits(client: CGBClient, mock: Any) -> None:
    plus = f"{BASE}/contacts/find_by_custom_field?field_id=phone&value=%2B972500000001"
    digits = f"{BASE}/contacts/find_by_custom_field?field_id=phone&value=972500000001"
    mock.get(plus, payload={"data": []})
    mock.get(digits, payload={"data": [CONTACT]})
    contact = await client.find_contact_by_phone("+972500000001")
    assert contact is not None
    assert contact.id == "972500000001"
    assert len(sent(mock, "GET", plus)) == 1
    assert len(sent(mock, "GET", digits)) == 1


async def test_find_by_phone_none_when_neither_matches(client: CGBClient, mock: Any) -> None:
    mock.get(f"{BASE}/contacts/find_by_custom_field?field_id=phone&value=%2B12025550100", payload={"data": []})
    mock.get(f"{BASE}/contacts/find_by_custom_field?field_id=phone&value=12025550100", body=b"")
    assert await client.find_contact_by_phone("+12025550100") is None


async def test_find_ignores_blank_contacts(client: CGBClient, mock: Any) -> None:
    url = f"{BASE}/contacts/find_by_custom_field?field_id=phone&value=x"
    mock.get(url, payload={"data": [{"id": 0, "first_name": ""}, "junk", CONTACT]})
    found = await client.find_contacts("phone", "x")
    assert [c.id for c in found] == ["972500000001"]


async def test_get_contact_keeps_big_ids_exact(client: CGBClient, mock: Any) -> None:
    big = 1234567890123456789  # past 2**53: a float would change it
    url = f"{BASE}/contacts/{big}"
    # JSON served as text/html, as CGB does; parsed on shape.
    mock.get(url, body=msgspec.json.encode({**CONTACT, "id": big}), content_type="text/html; charset=UTF-8")
    contact = await client.get_contact(str(big))
    assert contact.id == "1234567890123456789"
    assert only_call(mock, "GET", url)["headers"] == HEADERS


@pytest.mark.parametrize(
    "body",
    [
        {"id": 0, "page_id": 0, "first_name": "", "last_name": "", "tags": [], "custom_fields": []},
        {"id": 972500000001},
        {},
        [],
    ],
    ids=["zeroed", "id-only", "empty-object", "array"],
)
async def test_blank_contact_is_not_found(client: CGBClient, mock: Any, body: Any) -> None:
    mock.get(f"{BASE}/contacts/972500000001", payload=body)
    with pytest.raises(errors.CGBNotFoundError) as info:
        await client.get_contact("972500000001")
    assert info.value.endpoint == "get_contact"


async def test_create_contact_with_actions(client: CGBClient, mock: Any) -> None:
    url = f"{BASE}/contacts"
    mock.post(url, payload={"success": True, "data": {"id": 972500000001}})
    contact_id = await client.create_contact(
        "+972500000001",
        first_name="Dana",
        last_name="Levi",
        email="dana@example.test",
        actions=[
            AddTag("visa"),
            SetFieldValue("visa_type", "work"),
            SetFieldValue("applicants", 2),
            SendFlow(1752250957765),
        ],
    )
    assert contact_id == "972500000001"
    assert_json_call(
        only_call(mock, "POST", url),
        {
            "phone": "+972500000001",
            "first_name": "Dana",
            "last_name": "Levi",
            "email": "dana@example.test",
            "actions": [
                {"action": "add_tag", "tag_name": "visa"},
                {"action": "set_field_value", "field_name": "visa_type", "value": "work"},
                {"action": "set_field_value", "field_name": "applicants", "value": 2},
                {"action": "send_flow", "flow_id": 1752250957765},
            ],
        },
    )


async def test_create_contact_minimal_body(client: CGBClient, mock: Any) -> None:
    mock.post(f"{BASE}/contacts", payload={"id": "12025550100"})  # top-level id, as some users see
    assert await client.create_contact("+12025550100") == "12025550100"
    assert_json_call(only_call(mock, "POST", f"{BASE}/contacts"), {"phone": "+12025550100"})


async def test_create_contact_without_id_returns_none_and_calls_nothing_more(client: CGBClient, mock: Any) -> None:
    """The caller takes the phone's digits as the id (a WhatsApp contact's id), instead of two more finds."""
    mock.post(f"{BASE}/contacts", payload={"success": True, "data": {}})
    assert await client.create_contact("+12025550100") is None
    assert list(mock.requests) == [("POST", URL(f"{BASE}/contacts"))]


@pytest.mark.parametrize(
    ("value", "form"),
    [("work", "value=work"), (2, "value=2"), (1.5, "value=1.5"), ("a&b=c d", "value=a%26b%3Dc+d")],
)
async def test_set_custom_field_is_form_encoded(client: CGBClient, mock: Any, value: Any, form: str) -> None:
    url = f"{BASE}/contacts/972500000001/custom_fields/612002"
    mock.post(url, payload={"success": True})
    await client.set_custom_field("972500000001", "612002", value)
    call = only_call(mock, "POST", url)
    assert call["headers"] == {**HEADERS, "Content-Type": "application/x-www-form-urlencoded"}
    assert call["data"] == form.encode()


async def test_send_content(client: CGBClient, mock: Any) -> None:
    url = f"{BASE}/contacts/972500000001/send_content"
    mock.post(url, payload={"success": True})
    message = {
        "messaging_product": "whatsapp",
        "type": "template",
        "template": {"name": "x", "language": {"code": "he"}},
    }
    await client.send_content("972500000001", [message])
    assert_json_call(only_call(mock, "POST", url), {"messages": [message]})


async def test_send_text(client: CGBClient, mock: Any) -> None:
    url = f"{BASE}/contacts/972500000001/send/text"
    mock.post(url, payload={"success": True})
    await client.send_text("972500000001", "Your visa is approved")
    assert_json_call(only_call(mock, "POST", url), {"text": "Your visa is approved", "channel": "whatsapp"})


@pytest.mark.parametrize(
    ("ours", "theirs"), [("image", "image"), ("document", "file"), ("video", "video"), ("audio", "audio")]
)
async def test_send_file_maps_types(client: CGBClient, mock: Any, ours: Any, theirs: str) -> None:
    url = f"{BASE}/contacts/972500000001/send/file"
    mock.post(url, payload={"success": True})
    await client.send_file("972500000001", "https://files.example.test/a.pdf", ours)
    assert_json_call(
        only_call(mock, "POST", url),
        {"url": "https://files.example.test/a.pdf", "type": theirs, "channel": "whatsapp"},
    )


@pytest.mark.parametrize("body", [b"", b'{"success": true}', b"OK"], ids=["empty", "success", "plain-text"])
async def test_send_flow_has_no_body_and_accepts_any_2xx(client: CGBClient, mock: Any, body: bytes) -> None:
    url = f"{BASE}/contacts/972500000001/send/1752250957765"
    mock.post(url, body=body)
    # The contract's rule: a 2xx is a success unless the body carries an error; a send needs no answer.
    await client.send_flow("972500000001", "1752250957765")
    call = only_call(mock, "POST", url)
    assert call["headers"] == HEADERS
    assert call["data"] is None


async def test_list_flows_and_custom_fields(client: CGBClient, mock: Any) -> None:
    mock.get(f"{BASE}/accounts/flows", payload=[{"id": 1752250957765, "name": "visa_approved"}, "junk"])
    mock.get(
        f"{BASE}/accounts/custom_fields",
        payload=[{"id": -8, "name": "Phone Number", "type": 0, "description": "System"}, {"id": 612001}],
    )
    flows = await client.list_flows()
    fields = await client.list_custom_fields()
    assert [(f.id, f.name) for f in flows] == [("1752250957765", "visa_approved")]
    assert [(f.id, f.name, f.type) for f in fields] == [("-8", "Phone Number", 0), ("612001", "", 0)]
    for path in ("/accounts/flows", "/accounts/custom_fields"):
        call = sent(mock, "GET", BASE + path)[0]
        assert call["headers"] == HEADERS


async def test_list_flows_rejects_a_non_list(client: CGBClient, mock: Any) -> None:
    mock.get(f"{BASE}/accounts/flows", payload={"flows": []})
    with pytest.raises(errors.CGBResponseError, match="expected a JSON array"):
        await client.list_flows()


async def test_account(client: CGBClient, mock: Any) -> None:
    mock.get(
        f"{BASE}/accounts/me",
        payload={"page_id": 1000001, "name": "Visa desk", "active": True, "created": 1700000000, "total_users": 3},
    )
    account = await client.account()
    assert (account.page_id, account.name, account.active, account.total_users) == ("1000001", "Visa desk", True, 3)
    assert only_call(mock, "GET", f"{BASE}/accounts/me")["headers"] == HEADERS


@pytest.mark.parametrize("method", ["account", "list_flows", "list_custom_fields"])
async def test_a_non_json_2xx_is_an_error_where_an_answer_is_needed(client: CGBClient, mock: Any, method: str) -> None:
    path = {"account": "/accounts/me", "list_flows": "/accounts/flows", "list_custom_fields": "/accounts/custom_fields"}
    mock.get(BASE + path[method], body=b"<html>maintenance</html>", content_type="text/html")
    with pytest.raises(errors.CGBResponseError, match="not JSON"):
        await getattr(client, method)()


async def test_a_non_json_2xx_from_create_is_a_success_without_an_id(client: CGBClient, mock: Any) -> None:
    mock.post(f"{BASE}/contacts", body=b"created")
    assert await client.create_contact("+12025550100") is None


ACCOUNTS = [
    ("created as a date string", {"page_id": 1, "name": "Visa desk", "created": "2024-05-01 10:00:00"}),
    ("created as an integer", {"page_id": 1, "name": "Visa desk", "created": 1714557600}),
    ("created as an object", {"page_id": 1, "name": "Visa desk", "created": {"at": 1}}),
    ("total_users as text", {"page_id": 1, "name": "Visa desk", "total_users": "many"}),
    ("active as a string", {"page_id": 1, "name": "Visa desk", "active": "yes"}),
    ("fields missing", {"page_id": 1}),
]


@pytest.mark.parametrize("body", [a[1] for a in ACCOUNTS], ids=[a[0] for a in ACCOUNTS])
async def test_account_fields_the_worker_does_not_use_never_fail(client: CGBClient, mock: Any, body: Any) -> None:
    """Symptom 10: ``created`` as a date string ended ``cgb-worker check`` in a msgspec traceback."""
    mock.get(f"{BASE}/accounts/me", payload=body)
    account = await client.account()
    assert account.page_id == "1"


async def test_a_needed_field_missing_or_mistyped_names_the_endpoint(client: CGBClient, mock: Any) -> None:
    mock.get(f"{BASE}/accounts/flows", payload=[{"id": 1752250957765, "name": "ok"}, {"name": "no id"}])
    with pytest.raises(errors.CGBResponseError) as info:
        await client.list_flows()
    assert info.value.endpoint == "list_flows"
    assert "'id' is missing" in str(info.value)
    mock.get(f"{BASE}/accounts/custom_fields", payload=[{"id": {"nested": 1}, "name": "x"}])
    with pytest.raises(errors.CGBResponseError, match="'id' is a dict") as info:
        await client.list_custom_fields()
    assert info.value.endpoint == "list_custom_fields"


async def test_account_rejects_a_non_object(client: CGBClient, mock: Any) -> None:
    mock.get(f"{BASE}/accounts/me", payload=[1])
    with pytest.raises(errors.CGBResponseError):
        await client.account()


async def test_ids_are_url_quoted(client: CGBClient, mock: Any) -> None:
    mock.post(f"{BASE}/contacts/a%2Fb/send/text", payload={"success": True})
    await client.send_text("a/b", "x")
    assert len(sent(mock, "POST", f"{BASE}/contacts/a%2Fb/send/text")) == 1


def test_repr_hides_the_key() -> None:
    c = CGBClient.__new__(CGBClient)
    c._base_url = BASE
    assert KEY not in repr(c)
    assert "[secure]" in repr(c)


# -- one table: response -> exception -------------------------------------------------------------------

E = errors
STATUS_TABLE: list[tuple[int, Any, type[Exception], int | None]] = [
    (400, {"error": {"code": 400, "message": "Invalid parameters"}}, E.CGBBadRequestError, 400),
    (401, {"error": {"code": 401, "message": "No valid API key provided."}}, E.CGBAuthError, 401),
    (403, None, E.CGBAuthError, None),
    (404, {"error": {"code": 404, "message": "User not found"}}, E.CGBNotFoundError, 404),
    (405, None, E.CGBBadRequestError, None),
    (408, None, E.CGBServerError, None),
    (409, None, E.CGBBadRequestError, None),
    (422, {"errors": {"phone": ["bad"]}}, E.CGBBadRequestError, None),
    (429, {"error": {"code": 429, "message": "Too many"}}, E.CGBRateLimitError, 429),
    (500, None, E.CGBServerError, None),
    (502, "<html>Bad gateway</html>", E.CGBServerError, None),
    (503, {"error": {"code": 503, "message": "down"}}, E.CGBServerError, 503),
    (504, None, E.CGBServerError, None),
    (302, None, E.CGBResponseError, None),
    # CGB's errors inside HTTP 200, mapped by the code they carry:
    (200, {"error": {"code": 401, "message": "No valid API key provided."}}, E.CGBAuthError, 401),
    (200, {"error": {"code": 404, "message": "User not found"}}, E.CGBNotFoundError, 404),
    (200, {"error": {"code": "429", "message": "slow down"}}, E.CGBRateLimitError, 429),
    (200, {"error": {"code": 500, "message": "oops"}}, E.CGBServerError, 500),
    (200, {"error": {"code": 400, "message": "Invalid parameters"}}, E.CGBBadRequestError, 400),
    (200, {"error": {"code": 7, "message": "odd code"}}, E.CGBBadRequestError, 7),
    (200, {"error": "flat string"}, E.CGBBadRequestError, None),
    (200, {"error": {"message": "no code"}}, E.CGBBadRequestError, None),
    (200, {"success": False, "message": "Contact is unsubscribed"}, E.CGBBadRequestError, None),
    (200, {"success": False}, E.CGBBadRequestError, None),
    (201, {"success": False}, E.CGBBadRequestError, None),
]


@pytest.mark.parametrize(("status", "body", "exc", "code"), STATUS_TABLE)
async def test_status_table(
    client: CGBClient, mock: Any, status: int, body: Any, exc: type[Exception], code: int | None
) -> None:
    url = f"{BASE}/contacts/972500000001/send/text"
    raw = body.encode() if isinstance(body, str) else (b"" if body is None else msgspec.json.encode(body))
    mock.post(url, status=status, body=raw, content_type="text/html; charset=UTF-8")
    with pytest.raises(exc) as info:
        await client.send_text("972500000001", "hi")
    error = info.value
    assert type(error) is exc
    assert isinstance(error, E.CGBAPIError)
    assert error.status == status
    assert error.code == code
    assert error.endpoint == "send_text"
    assert error.retryable is (exc in (E.CGBRateLimitError, E.CGBServerError))
    assert KEY not in str(error)
    assert KEY not in repr(error.to_dict())


@pytest.mark.parametrize(
    "body", [None, {"success": True}, {"data": []}, [], {"error": None}, {"error": {}}, {"success": 1}]
)
def test_successes(body: Any) -> None:
    assert error_for_response(200, body, endpoint="x") is None


async def test_error_message_is_kept(client: CGBClient, mock: Any) -> None:
    mock.get(f"{BASE}/accounts/me", status=401, body=b'{"error":{"code":401,"message":"No valid API key provided."}}')
    with pytest.raises(E.CGBAuthError) as info:
        await client.account()
    assert info.value.message == "No valid API key provided."
    assert str(info.value) == "HTTP 401 on account: No valid API key provided."


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("1.5", 1.5), (None, None), ("", None), ("soon", None), ("-3", 0.0), ("nan", None)],
)
async def test_429_retry_after(client: CGBClient, mock: Any, header: str | None, expected: float | None) -> None:
    headers = {"Retry-After": header} if header is not None else {}
    mock.post(f"{BASE}/contacts/1/send/text", status=429, headers=headers, body=b"")
    with pytest.raises(E.CGBRateLimitError) as info:
        await client.send_text("1", "hi")
    assert info.value.retry_after == expected


def test_retry_after_http_date() -> None:
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 26 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 26 Nov 2026 11:00:00 GMT", now=now) == 0.0


async def test_error_in_200_with_retry_after_header(client: CGBClient, mock: Any) -> None:
    mock.post(
        f"{BASE}/contacts/1/send/text", status=200, headers={"Retry-After": "4"}, payload={"error": {"code": 429}}
    )
    with pytest.raises(E.CGBRateLimitError) as info:
        await client.send_text("1", "hi")
    assert info.value.retry_after == 4.0


# -- transport failures: no aiohttp exception ever leaves the client ---------------------------------------

_conn_key: Any = type("Key", (), {"ssl": None, "host": "cgb.test", "port": 443})()
TRANSPORT_TABLE: list[tuple[BaseException, type[E.CGBTransportError]]] = [
    (aiohttp.ClientConnectorError(_conn_key, OSError(111, "refused")), E.CGBConnectError),
    (aiohttp.ConnectionTimeoutError(), E.CGBConnectError),
    (TimeoutError(), E.CGBTimeoutError),
    (TimeoutError(), E.CGBTimeoutError),
    (aiohttp.ServerTimeoutError(), E.CGBTimeoutError),
    (aiohttp.SocketTimeoutError(), E.CGBTimeoutError),
    (aiohttp.ServerDisconnectedError(), E.CGBTimeoutError),
    (aiohttp.ClientOSError(104, "reset"), E.CGBTimeoutError),
    (aiohttp.ClientPayloadError("truncated"), E.CGBTimeoutError),
    (aiohttp.ClientConnectionError(), E.CGBTimeoutError),
    (aiohttp.ClientError(), E.CGBTimeoutError),
    (aiohttp.InvalidURL("https://cgb.test"), E.CGBConnectError),
]


@pytest.mark.parametrize(("raised", "expected"), TRANSPORT_TABLE, ids=lambda v: type(v).__name__)
async def test_transport_errors_are_mapped(
    client: CGBClient, mock: Any, raised: BaseException, expected: type[E.CGBTransportError]
) -> None:
    mock.post(f"{BASE}/contacts/1/send/text", exception=raised)
    with pytest.raises(expected) as info:
        await client.send_text("1", "hi")
    assert type(info.value) is expected
    assert info.value.retryable is True
    assert "send_text" in str(info.value)


def _all_client_errors() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    todo: list[type[BaseException]] = [aiohttp.ClientError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: c.__name__)


def _instance(cls: type[BaseException]) -> BaseException:
    info = aiohttp.RequestInfo(URL(BASE), "POST", {}, URL(BASE))  # type: ignore[arg-type]
    patterns: list[tuple[Any, ...]] = [
        (),
        (_conn_key, OSError(111, "refused")),
        ("/run/cgb.sock", _conn_key, OSError(111, "refused")),
        (info, ()),
        ("https://cgb.test",),
        (b"a", b"b", "cgb.test", 443),
    ]
    for args in patterns:
        try:
            return cls(*args)
        except TypeError:
            continue
    raise AssertionError(f"cannot build {cls.__name__}")


@pytest.mark.parametrize("cls", _all_client_errors(), ids=lambda c: c.__name__)
async def test_no_aiohttp_error_leaves_the_client(client: CGBClient, mock: Any, cls: type[BaseException]) -> None:
    """Every ClientError aiohttp has, now or after an upgrade, comes out as one of ours."""
    mock.post(f"{BASE}/contacts/1/send/text", exception=_instance(cls))
    with pytest.raises(E.CGBError) as info:
        await client.send_text("1", "hi")
    assert isinstance(info.value, E.CGBTransportError)
    assert info.value.__cause__ is not None


async def test_request_hook_sees_every_call(mock: Any) -> None:
    seen: list[tuple[str, int | None]] = []
    async with aiohttp.ClientSession() as session:
        c = CGBClient(session, Secret(KEY), base_url=BASE, on_request=lambda e, s, t: seen.append((e, s)))
        mock.get(f"{BASE}/accounts/me", payload={"page_id": 1})
        mock.post(f"{BASE}/contacts/1/send/text", exception=aiohttp.ServerDisconnectedError())
        await c.account()
        with pytest.raises(E.CGBTimeoutError):
            await c.send_text("1", "x")
    assert seen == [("account", 200), ("send_text", None)]


# -- the exceptions themselves ------------------------------------------------------------------------------

ALL_ERRORS: list[Exception] = [
    E.CGBWorkerError("root"),
    E.ConfigError(["CGB_API_KEY: Environment variable not set.", "CGB_TIMEOUT: Not a valid number."]),
    E.InvalidJobError("no content"),
    E.InvalidPhoneError("phone is too short"),
    E.CGBConnectError("refused"),
    E.CGBTimeoutError("slow"),
    E.CGBRateLimitError("429", status=429, code=429, endpoint="send_text", retry_after=3.0),
    E.CGBServerError("503", status=503, endpoint="send_text"),
    E.CGBBadRequestError("bad", status=400, code=400, endpoint="create_contact"),
    E.CGBAuthError("key", status=401, code=401, endpoint="account"),
    E.CGBNotFoundError("gone", status=404, endpoint="get_contact"),
    E.CGBResponseError("shape", status=200, endpoint="list_flows"),
]


@pytest.mark.parametrize("error", ALL_ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_and_round_trip(error: E.CGBWorkerError) -> None:
    unpickled = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    for copy in (unpickled, E.error_from_dict(error.to_dict())):
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.to_dict() == error.to_dict()


def test_retryable_is_decided_by_class() -> None:
    retryable = {type(e).__name__ for e in ALL_ERRORS if isinstance(e, E.CGBWorkerError) and e.retryable}
    assert retryable == {"CGBConnectError", "CGBTimeoutError", "CGBRateLimitError", "CGBServerError"}


def test_unknown_error_type_rebuilds_as_root() -> None:
    rebuilt = E.error_from_dict({"type": "SomethingElse", "message": "m"})
    assert type(rebuilt) is E.CGBWorkerError
    assert rebuilt.message == "m"
