"""CGBClient against the simulator over real HTTP, with every request checked against CGB's Swagger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from cgb_worker import errors as E
from cgb_worker.client import CGBClient
from cgb_worker.models import AddTag, SendFlow, SetFieldValue
from cgb_worker.settings import Secret

from .conftest import TOKEN, Sim, free_port
from .swagger import check_request, check_response

PHONE = "+972500000001"
CID = "972500000001"


@pytest.fixture
async def client(sim: Sim) -> AsyncIterator[CGBClient]:
    async with aiohttp.ClientSession() as session:
        yield CGBClient(session, Secret(TOKEN), base_url=sim.api_url, timeout=2)


def assert_requests_follow_the_spec(sim: Sim) -> None:
    assert sim.state.requests, "no request was made"
    for r in sim.state.requests:
        assert check_request(r["method"], r["path"], r["query"], r["content_type"], r["body"]) == [], r


async def test_every_call_end_to_end(client: CGBClient, sim: Sim) -> None:
    account = await client.account()
    assert account.page_id == "1000001"
    flows = {f.name: f.id for f in await client.list_flows()}
    assert flows["visa_approved"] == "1752250957765"
    fields = {f.name: f for f in await client.list_custom_fields()}
    assert fields["Phone Number"].id == "-8"
    assert fields["deadline"].type == 2

    assert await client.find_contact_by_phone(PHONE) is None
    contact_id = await client.create_contact(
        PHONE,
        first_name="Dana",
        last_name="Levi",
        email="dana@example.test",
        actions=[AddTag("visa"), SetFieldValue("first_name", "Dana"), SetFieldValue("visa_type", "work")],
    )
    assert contact_id == CID
    await client.set_custom_field(CID, fields["applicants"].id, 2)
    await client.send_flow(CID, flows["visa_approved"])
    await client.send_text(CID, "Your passport is ready")
    await client.send_file(CID, "https://files.example.test/visa.pdf", "document")

    found = await client.find_contact_by_phone(PHONE)
    assert found is not None
    assert found.id == CID
    contact = await client.get_contact(CID)
    assert (contact.first_name, contact.last_name, contact.channel) == ("Dana", "Levi", 5)
    assert {f.name: f.value for f in contact.custom_fields} == {
        "first_name": "Dana",
        "visa_type": "work",
        "applicants": 2,
    }
    assert [t.name for t in contact.tags] == ["visa"]

    outbox = sim.state.outbox
    assert [(m["kind"], m.get("text"), m.get("type")) for m in outbox] == [
        ("flow", "Hello Dana, your work visa is approved.", None),
        ("text", "Your passport is ready", None),
        ("file", None, "file"),
    ]
    assert all(m["channel"] == "whatsapp" for m in outbox if m["kind"] != "flow")
    assert_requests_follow_the_spec(sim)
    assert [r["endpoint"] for r in sim.state.requests] == [
        "account",
        "list_flows",
        "list_custom_fields",
        "find_contacts",
        "find_contacts",
        "create_contact",
        "set_custom_field",
        "send_flow",
        "send_text",
        "send_file",
        "find_contacts",
        "get_contact",
    ]


async def test_create_with_send_flow_action_follows_the_spec(client: CGBClient, sim: Sim) -> None:
    await client.create_contact(PHONE, actions=[SetFieldValue("first_name", "Dana"), SendFlow(1752250957765)])
    assert sim.state.outbox[0]["text"] == "Hello Dana, your  visa is approved."
    assert_requests_follow_the_spec(sim)


async def test_responses_follow_the_spec(client: CGBClient, sim: Sim, http: aiohttp.ClientSession) -> None:
    await client.create_contact(PHONE)
    headers = {"X-ACCESS-TOKEN": TOKEN}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/contacts/find_by_custom_field?field_id=phone&value=%2B972500000001", {}),
        ("GET", f"/contacts/{CID}", {}),
        ("POST", f"/contacts/{CID}/send/text", {"json": {"text": "hi", "channel": "whatsapp"}}),
        ("POST", f"/contacts/{CID}/send/file", {"json": {"url": "https://f.test/a.png", "type": "image"}}),
        ("POST", f"/contacts/{CID}/custom_fields/612001", {"data": {"value": "Dana"}}),
        ("GET", "/accounts/flows", {}),
        ("GET", "/accounts/custom_fields", {}),
        ("GET", "/accounts/me", {}),
    ]
    for method, path, kwargs in calls:
        async with http.request(method, sim.api_url + path, headers=headers, **kwargs) as resp:
            body = await resp.json(content_type=None)
            assert check_response(method, path.split("?")[0], resp.status, body) == [], (path, body)


async def test_find_falls_back_to_digits_when_cgb_stores_digits(client: CGBClient, sim: Sim) -> None:
    sim.configure(stored_phone="digits")
    await client.create_contact(PHONE)
    found = await client.find_contact_by_phone(PHONE)
    assert found is not None
    assert found.id == CID
    assert [r["query"].get("value") for r in sim.requests("find_contacts")] == [PHONE, CID]


async def test_created_id_missing_is_none(client: CGBClient, sim: Sim) -> None:
    sim.configure(created_id="none")
    assert await client.create_contact(PHONE) is None
    assert [r["endpoint"] for r in sim.state.requests] == ["create_contact"]


async def test_created_id_top_level(client: CGBClient, sim: Sim) -> None:
    sim.configure(created_id="top_id")
    assert await client.create_contact(PHONE) == CID
    assert len(sim.state.requests) == 1


@pytest.mark.parametrize("mode", ["404", "blank"])
async def test_unknown_contact_is_not_found_either_way(client: CGBClient, sim: Sim, mode: str) -> None:
    sim.configure(missing_contact=mode)
    with pytest.raises(E.CGBNotFoundError):
        await client.get_contact("12025550100")


async def test_wrong_key_is_an_auth_error(sim: Sim) -> None:
    async with aiohttp.ClientSession() as session:
        client = CGBClient(session, Secret("1000001.WrongKeyWrongKeyWrongKeyWrong"), base_url=sim.api_url)
        with pytest.raises(E.CGBAuthError) as info:
            await client.account()
    assert info.value.message == "No valid API key provided."
    assert info.value.retryable is False


async def test_send_to_unknown_contact_is_not_found(client: CGBClient, sim: Sim) -> None:
    with pytest.raises(E.CGBNotFoundError):
        await client.send_text("12025550100", "hi")


async def test_json_custom_field_rejected_in_strict_mode(client: CGBClient, sim: Sim) -> None:
    await client.create_contact(PHONE)
    with pytest.raises(E.CGBBadRequestError):
        await client.request("POST", f"/contacts/{CID}/custom_fields/612001", "set_custom_field", json={"value": "x"})
    await client.set_custom_field(CID, "612001", "x")  # the client itself always sends a form


@pytest.mark.parametrize(
    ("rule", "exc"),
    [
        ({"status": 503}, E.CGBServerError),
        ({"status": 500}, E.CGBServerError),
        ({"status": 429, "retry_after": "3"}, E.CGBRateLimitError),
        ({"error_in_200": 429}, E.CGBRateLimitError),
        ({"error_in_200": 401}, E.CGBAuthError),
        ({"success_false": True}, E.CGBBadRequestError),
        ({"drop": True}, E.CGBTimeoutError),
        ({"delay": 3}, E.CGBTimeoutError),
    ],
)
async def test_injected_faults_become_typed_errors(
    client: CGBClient, sim: Sim, rule: dict[str, object], exc: type[Exception]
) -> None:
    from cgb_worker.simulator import FaultRule

    await client.create_contact(PHONE)
    sim.state.faults.append(FaultRule(**rule, count=1))  # type: ignore[arg-type]
    with pytest.raises(exc) as info:
        await client.send_text(CID, "hi")
    if isinstance(info.value, E.CGBRateLimitError) and "retry_after" in rule:
        assert info.value.retry_after == 3.0
    await client.send_text(CID, "after the fault")
    assert [m["text"] for m in sim.state.outbox] == ["after the fault"]


async def test_connection_refused_is_a_connect_error() -> None:
    async with aiohttp.ClientSession() as session:
        client = CGBClient(session, Secret(TOKEN), base_url=f"http://127.0.0.1:{free_port()}/api", timeout=2)
        with pytest.raises(E.CGBConnectError):
            await client.send_text(CID, "hi")
