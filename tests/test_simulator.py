"""The CGB simulator, over real HTTP: faithful behaviour, both sides of each uncertainty, fault injection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import aiohttp
import msgspec
import pytest

from cgb_worker.simulator import PAGE_ID, WINDOW_MS

from .conftest import TOKEN, Sim, free_port
from .swagger import check_response

AUTH = {"X-ACCESS-TOKEN": TOKEN}
PHONE = "+972500000001"
CID = "972500000001"


async def call(
    http: aiohttp.ClientSession,
    sim: Sim,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = AUTH,
    **kwargs: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    url = (sim.root if path.startswith("/_sim") else sim.api_url) + path
    async with http.request(method, url, headers=headers, **kwargs) as resp:
        raw = await resp.read()
        return resp.status, (msgspec.json.decode(raw) if raw else None), resp


async def create(http: aiohttp.ClientSession, sim: Sim, phone: str = PHONE, **body: Any) -> Any:
    status, reply, _ = await call(http, sim, "POST", "/contacts", json={"phone": phone, **body})
    assert status == 200, reply
    return reply


# -- authentication and unknown paths -------------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {"X-ACCESS-TOKEN": "wrong"}, {"Authorization": f"Bearer {TOKEN}"}])
async def test_bad_token_gets_cgbs_401(http: aiohttp.ClientSession, sim: Sim, headers: dict[str, str] | None) -> None:
    status, body, resp = await call(http, sim, "GET", "/accounts/me", headers=headers)
    assert status == 401
    assert body == {"error": {"code": 401, "message": "No valid API key provided."}}
    assert resp.headers["Content-Type"] == "text/html; charset=UTF-8"


async def test_unknown_path_is_401_without_token_and_404_with_it(http: aiohttp.ClientSession, sim: Sim) -> None:
    status, body, _ = await call(http, sim, "GET", "/nope", headers=None)
    assert (status, body["error"]["code"]) == (401, 401)
    status, body, resp = await call(http, sim, "GET", "/nope")
    assert status == 404
    assert body == {"error": {"code": 404, "message": "Not found"}}
    assert resp.headers["Content-Type"] == "text/html; charset=UTF-8"


async def test_account_and_fixtures(http: aiohttp.ClientSession, sim: Sim) -> None:
    status, me, _ = await call(http, sim, "GET", "/accounts/me")
    assert status == 200
    assert me["page_id"] == PAGE_ID
    assert me["total_users"] == 0
    _, flows, _ = await call(http, sim, "GET", "/accounts/flows")
    assert {"id": 1752250957765, "name": "visa_approved"} in flows
    _, fields, _ = await call(http, sim, "GET", "/accounts/custom_fields")
    assert {f["id"]: f["name"] for f in fields}[-8] == "Phone Number"
    assert {f["id"]: f["name"] for f in fields}[-12] == "Email"
    for path, body in (("/accounts/me", me), ("/accounts/flows", flows), ("/accounts/custom_fields", fields)):
        assert check_response("GET", path, 200, body) == []


# -- contacts -------------------------------------------------------------------------------------------


async def test_create_upserts_by_phone(http: aiohttp.ClientSession, sim: Sim) -> None:
    first = await create(http, sim, first_name="Dana", email="dana@example.test")
    second = await create(http, sim, first_name="Other")
    assert first == {"success": True, "data": {"id": int(CID), "contact_created": True}}
    assert second == {"success": True, "data": {"id": int(CID), "contact_created": False}}
    assert len(sim.state.contacts) == 1
    contact = sim.state.contacts[int(CID)]
    assert (contact["first_name"], contact["phone"], contact["email"]) == ("Dana", PHONE, "dana@example.test")
    status, got, _ = await call(http, sim, "GET", f"/contacts/{CID}")
    assert status == 200
    assert got["id"] == int(CID)
    assert got["channel"] == 5
    assert got["subscribed"] == 1
    assert "phone" not in got  # not in the documented model
    assert check_response("GET", f"/contacts/{CID}", 200, got) == []


async def test_create_without_upsert_rejects_existing(http: aiohttp.ClientSession, sim: Sim) -> None:
    sim.configure(upsert=False)
    await create(http, sim)
    status, body, _ = await call(http, sim, "POST", "/contacts", json={"phone": PHONE})
    assert (status, body["error"]["message"]) == (400, "Contact already exists")


@pytest.mark.parametrize(
    ("created_id", "expected"),
    [
        ("data_id", {"success": True, "data": {"id": int(CID), "contact_created": True}}),
        ("top_id", {"success": True, "id": int(CID)}),
        ("none", {"success": True}),
    ],
)
async def test_created_id_shapes(http: aiohttp.ClientSession, sim: Sim, created_id: str, expected: Any) -> None:
    sim.configure(created_id=created_id)
    assert await create(http, sim) == expected


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"phone": ""},
        {"phone": 972500000001},
        {"phone": "+97"},
        {"phone": PHONE, "gender": "other"},
        {"phone": PHONE, "actions": {"action": "add_tag"}},
        {"phone": PHONE, "actions": [{"action": "explode"}]},
    ],
    ids=["no-phone", "empty", "number", "short", "gender", "actions-not-list", "unknown-action"],
)
async def test_create_rejects_bad_bodies(http: aiohttp.ClientSession, sim: Sim, body: Any) -> None:
    status, reply, _ = await call(http, sim, "POST", "/contacts", json=body)
    assert status == 400
    assert reply["error"]["code"] == 400
    assert sim.state.contacts == {}


async def test_create_rejects_non_json(http: aiohttp.ClientSession, sim: Sim) -> None:
    status, _, _ = await call(http, sim, "POST", "/contacts", data=b"phone=1", headers={**AUTH})
    assert status == 400


async def test_actions_run_in_order(http: aiohttp.ClientSession, sim: Sim) -> None:
    await create(
        http,
        sim,
        actions=[
            {"action": "add_tag", "tag_name": "visa"},
            {"action": "set_field_value", "field_name": "first_name", "value": "Dana"},
            {"action": "send_flow", "flow_id": 1752250957765},
            {"action": "set_field_value", "field_name": "visa_type", "value": "work"},
            {"action": "set_field_value", "field_name": "no_such_field", "value": "ignored"},
            {"action": "remove_tag", "tag_name": "visa"},
            {"action": "add_tag", "tag_name": "approved"},
        ],
    )
    [sent] = sim.state.outbox
    # visa_type was set after the flow ran, so the flow did not see it.
    assert sent["text"] == "Hello Dana, your  visa is approved."
    assert (sent["kind"], sent["flow_id"], sent["status"]) == ("flow", "1752250957765", "delivered")
    _, got, _ = await call(http, sim, "GET", f"/contacts/{CID}")
    assert [t["name"] for t in got["tags"]] == ["approved"]
    assert {f["name"]: f["value"] for f in got["custom_fields"]} == {"first_name": "Dana", "visa_type": "work"}


async def test_unknown_flow_in_action_is_404(http: aiohttp.ClientSession, sim: Sim) -> None:
    status, body, _ = await call(
        http, sim, "POST", "/contacts", json={"phone": PHONE, "actions": [{"action": "send_flow", "flow_id": 9}]}
    )
    assert (status, body["error"]["message"]) == (404, "Flow not found")


@pytest.mark.parametrize(("stored", "hit", "miss"), [("plus", PHONE, CID), ("digits", CID, PHONE)])
async def test_find_matches_the_stored_string_exactly(
    http: aiohttp.ClientSession, sim: Sim, stored: str, hit: str, miss: str
) -> None:
    sim.configure(stored_phone=stored)
    await create(http, sim)
    status, found, _ = await call(
        http, sim, "GET", "/contacts/find_by_custom_field", params={"field_id": "phone", "value": hit}
    )
    assert status == 200
    assert [c["id"] for c in found["data"]] == [int(CID)]
    assert check_response("GET", "/contacts/find_by_custom_field", 200, found) == []
    _, none, _ = await call(
        http, sim, "GET", "/contacts/find_by_custom_field", params={"field_id": "phone", "value": miss}
    )
    assert none == {"data": []}


async def test_find_by_email_and_custom_field_capped_at_100(http: aiohttp.ClientSession, sim: Sim) -> None:
    for i in range(101):
        await create(
            http,
            sim,
            phone=f"+1202555{i:04d}",
            email=f"u{i}@example.test",
            actions=[{"action": "set_field_value", "field_name": "visa_type", "value": "work"}],
        )
    _, by_field, _ = await call(
        http, sim, "GET", "/contacts/find_by_custom_field", params={"field_id": "612002", "value": "work"}
    )
    assert len(by_field["data"]) == 100
    _, by_email, _ = await call(
        http, sim, "GET", "/contacts/find_by_custom_field", params={"field_id": "email", "value": "u7@example.test"}
    )
    assert [c["id"] for c in by_email["data"]] == [12025550007]


@pytest.mark.parametrize(
    "params", [{}, {"field_id": "phone"}, {"custom_field_id": "-8", "value": PHONE}, {"field_id": "zip", "value": "1"}]
)
async def test_find_with_bad_parameters_is_400(http: aiohttp.ClientSession, sim: Sim, params: dict[str, str]) -> None:
    status, body, _ = await call(http, sim, "GET", "/contacts/find_by_custom_field", params=params)
    assert (status, body["error"]["message"]) == (400, "Invalid parameters")


async def test_unknown_contact_404_or_blank(http: aiohttp.ClientSession, sim: Sim) -> None:
    status, body, _ = await call(http, sim, "GET", "/contacts/12025550100")
    assert (status, body) == (404, {"error": {"code": 404, "message": "User not found"}})
    status, body, _ = await call(http, sim, "GET", "/contacts/abc")
    assert status == 400
    sim.configure(missing_contact="blank")
    status, body, _ = await call(http, sim, "GET", "/contacts/12025550100")
    assert status == 200
    assert body["id"] == 0
    assert body["first_name"] == ""


async def test_contact_can_carry_phone_and_email(http: aiohttp.ClientSession, sim: Sim) -> None:
    sim.configure(contact_has_phone=True)
    await create(http, sim, email="dana@example.test")
    _, got, _ = await call(http, sim, "GET", f"/contacts/{CID}")
    assert (got["phone"], got["email"]) == (PHONE, "dana@example.test")


# -- sends and the 24-hour window -----------------------------------------------------------------------


async def test_text_outside_window_is_accepted_but_fails(http: aiohttp.ClientSession, sim: Sim) -> None:
    await create(http, sim)
    status, body, _ = await call(
        http, sim, "POST", f"/contacts/{CID}/send/text", json={"text": "hi", "channel": "whatsapp"}
    )
    assert (status, body) == (200, {"success": True})
    assert check_response("POST", f"/contacts/{CID}/send/text", 200, body) == []
    status, _, _ = await call(http, sim, "POST", "/_sim/inbound", json={"phone": PHONE}, headers=None)
    assert status == 200
    await call(http, sim, "POST", f"/contacts/{CID}/send/text", json={"text": "again", "channel": "whatsapp"})
    old = int(time.time() * 1000) - WINDOW_MS - 1000
    await call(http, sim, "POST", "/_sim/inbound", json={"phone": PHONE, "at": old}, headers=None)
    await call(http, sim, "POST", f"/contacts/{CID}/send/file", json={"url": "https://f.test/a.pdf", "type": "file"})
    await call(http, sim, "POST", f"/contacts/{CID}/send/1752250957767")  # a template flow: any time
    await call(http, sim, "POST", f"/contacts/{CID}/send/1752250957768")  # a session flow: like text
    _, outbox, _ = await call(http, sim, "GET", "/_sim/outbox", headers=None)
    assert [(m["kind"], m["status"], m["reason"]) for m in outbox] == [
        ("text", "failed", "re-engagement (>24h)"),
        ("text", "delivered", None),
        ("file", "failed", "re-engagement (>24h)"),
        ("flow", "delivered", None),
        ("flow", "failed", "re-engagement (>24h)"),
    ]
    assert outbox[2]["channel"] == "omnichannel"  # no channel given: the contact's own
    assert all("message_id" not in m for m in outbox)


async def test_inbound_on_create_opens_the_window(http: aiohttp.ClientSession, sim: Sim) -> None:
    sim.configure(inbound_on_create=True)
    await create(http, sim)
    await call(http, sim, "POST", f"/contacts/{CID}/send/text", json={"text": "hi"})
    assert sim.state.outbox[0]["status"] == "delivered"


async def test_inbound_for_unknown_contact_is_404(http: aiohttp.ClientSession, sim: Sim) -> None:
    status, _, _ = await call(http, sim, "POST", "/_sim/inbound", json={"phone": PHONE}, headers=None)
    assert status == 404


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/send/text", {}),
        ("/send/text", {"text": ""}),
        ("/send/text", {"text": "hi", "channel": "carrier-pigeon"}),
        ("/send/file", {"url": "https://f.test/a.pdf", "type": "document"}),
        ("/send/file", {"type": "image"}),
        ("/send/file", {"url": "https://f.test/a.png", "type": "image", "channel": "rcs"}),
        ("/send/abc", None),
    ],
)
async def test_send_rejects_bad_bodies(http: aiohttp.ClientSession, sim: Sim, path: str, body: Any) -> None:
    await create(http, sim)
    status, reply, _ = await call(http, sim, "POST", f"/contacts/{CID}{path}", json=body)
    assert (status, reply["error"]["code"]) == (400, 400)
    assert sim.state.outbox == []


@pytest.mark.parametrize("path", ["/send/text", "/send/file", "/send/1752250957765", "/custom_fields/612001"])
async def test_send_to_unknown_contact_is_404(http: aiohttp.ClientSession, sim: Sim, path: str) -> None:
    status, reply, _ = await call(http, sim, "POST", f"/contacts/12025550100{path}", json={"text": "x"})
    assert (status, reply["error"]["message"]) == (404, "User not found")


async def test_unknown_flow_is_404(http: aiohttp.ClientSession, sim: Sim) -> None:
    await create(http, sim)
    status, reply, _ = await call(http, sim, "POST", f"/contacts/{CID}/send/123")
    assert (status, reply["error"]["message"]) == (404, "Flow not found")


# -- custom fields ---------------------------------------------------------------------------------------


async def test_custom_field_form_and_json(http: aiohttp.ClientSession, sim: Sim) -> None:
    await create(http, sim)
    status, body, _ = await call(http, sim, "POST", f"/contacts/{CID}/custom_fields/612005", data={"value": "3"})
    assert (status, body) == (200, {"success": True})
    status, _, _ = await call(http, sim, "POST", f"/contacts/{CID}/custom_fields/612001", json={"value": "Dana"})
    assert status == 400  # the spec says form
    sim.configure(form_only_fields=False)
    status, _, _ = await call(http, sim, "POST", f"/contacts/{CID}/custom_fields/612001", json={"value": "Dana"})
    assert status == 200
    _, fields, _ = await call(http, sim, "GET", f"/contacts/{CID}/custom_fields")
    assert fields == [
        {"id": 612001, "name": "first_name", "type": 0, "value": "Dana"},
        {"id": 612005, "name": "applicants", "type": 1, "value": 3},  # numbers come back as numbers
    ]
    assert check_response("GET", f"/contacts/{CID}/custom_fields", 200, fields) == []


@pytest.mark.parametrize(("field", "data", "status"), [("999", {"value": "x"}, 404), ("612001", {"other": "x"}, 400)])
async def test_custom_field_errors(
    http: aiohttp.ClientSession, sim: Sim, field: str, data: dict[str, str], status: int
) -> None:
    await create(http, sim)
    got, _, _ = await call(http, sim, "POST", f"/contacts/{CID}/custom_fields/{field}", data=data)
    assert got == status


# -- fault injection -------------------------------------------------------------------------------------


async def faults(http: aiohttp.ClientSession, sim: Sim, *rules: dict[str, Any]) -> None:
    status, _, _ = await call(http, sim, "POST", "/_sim/faults", json=list(rules), headers=None)
    assert status == 200


async def test_fault_count_with_retry_after(http: aiohttp.ClientSession, sim: Sim) -> None:
    await faults(http, sim, {"status": 429, "retry_after": "2", "count": 2, "path": "/accounts/me"})
    results = []
    for _ in range(3):
        status, _, resp = await call(http, sim, "GET", "/accounts/me")
        results.append((status, resp.headers.get("Retry-After")))
    await call(http, sim, "GET", "/accounts/flows")
    assert results == [(429, "2"), (429, "2"), (200, None)]
    assert sim.state.counts["account"] == 3
    assert sim.state.counts["list_flows"] == 1


async def test_fault_rate_is_random_but_seeded(http: aiohttp.ClientSession, sim: Sim) -> None:
    await faults(http, sim, {"status": 503, "rate": 0.5})
    statuses = [(await call(http, sim, "GET", "/accounts/me"))[0] for _ in range(40)]
    assert set(statuses) == {200, 503}
    assert 8 <= statuses.count(503) <= 32


async def test_fault_error_in_200_and_success_false(http: aiohttp.ClientSession, sim: Sim) -> None:
    await faults(http, sim, {"error_in_200": 500, "count": 1, "method": "GET"}, {"success_false": True, "count": 1})
    status, body, resp = await call(http, sim, "GET", "/accounts/me")
    assert (status, body) == (200, {"error": {"code": 500, "message": "Injected error 500"}})
    assert resp.headers["Content-Type"] == "text/html; charset=UTF-8"
    status, body, _ = await call(http, sim, "GET", "/accounts/me")
    assert (status, body) == (200, {"success": False, "message": "Injected failure"})


async def test_fault_delay_and_latency(http: aiohttp.ClientSession, sim: Sim) -> None:
    await faults(http, sim, {"delay": 0.3, "count": 1})
    started = time.perf_counter()
    status, _, _ = await call(http, sim, "GET", "/accounts/me")
    assert status == 200
    assert time.perf_counter() - started >= 0.3
    sim.configure(latency=0.2)
    started = time.perf_counter()
    await call(http, sim, "GET", "/accounts/me")
    assert time.perf_counter() - started >= 0.2


async def test_fault_drop_closes_the_connection(http: aiohttp.ClientSession, sim: Sim) -> None:
    await create(http, sim)
    # POST: aiohttp itself retries an idempotent GET once on a dropped keep-alive connection.
    await faults(http, sim, {"drop": True, "count": 1})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, sim, "POST", f"/contacts/{CID}/send/text", json={"text": "hi"})
    assert sim.state.outbox == []
    assert (await call(http, sim, "GET", "/accounts/me"))[0] == 200


async def test_fault_after_performs_the_call_first(http: aiohttp.ClientSession, sim: Sim) -> None:
    await create(http, sim)
    await faults(http, sim, {"status": 502, "after": True, "count": 1, "path": "/send/text$"})
    status, _, _ = await call(http, sim, "POST", f"/contacts/{CID}/send/text", json={"text": "hi"})
    assert status == 502
    assert [m["text"] for m in sim.state.outbox] == ["hi"]  # sent, though the caller saw a 502


async def test_fault_list_and_clear(http: aiohttp.ClientSession, sim: Sim) -> None:
    await faults(http, sim, {"status": 500})
    _, rules, _ = await call(http, sim, "GET", "/_sim/faults", headers=None)
    assert [r["status"] for r in rules] == [500]
    await call(http, sim, "DELETE", "/_sim/faults", headers=None)
    assert (await call(http, sim, "GET", "/accounts/me"))[0] == 200


# -- bookkeeping -----------------------------------------------------------------------------------------


async def test_requests_stats_config_and_reset(http: aiohttp.ClientSession, sim: Sim) -> None:
    await create(http, sim)
    await call(http, sim, "POST", f"/contacts/{CID}/custom_fields/612001", data={"value": "Dana"})
    _, requests, _ = await call(http, sim, "GET", "/_sim/requests", headers=None)
    assert [(r["method"], r["endpoint"], r["content_type"], r["body"]) for r in requests] == [
        ("POST", "create_contact", "application/json", {"phone": PHONE}),
        ("POST", "set_custom_field", "application/x-www-form-urlencoded", {"value": "Dana"}),
    ]
    _, later, _ = await call(http, sim, "GET", "/_sim/requests?since=1", headers=None)
    assert len(later) == 1
    _, stats, _ = await call(http, sim, "GET", "/_sim/stats", headers=None)
    assert stats["counts"] == {"create_contact": 1, "set_custom_field": 1, "total": 2}
    assert (stats["contacts"], stats["outbox"]) == (1, 0)
    _, contacts, _ = await call(http, sim, "GET", "/_sim/contacts", headers=None)
    assert contacts[0]["phone"] == PHONE
    _, config, _ = await call(http, sim, "POST", "/_sim/config", json={"latency": 0.01}, headers=None)
    assert config["latency"] == 0.01
    assert config["token"] == TOKEN
    _, config, _ = await call(http, sim, "GET", "/_sim/config", headers=None)
    assert config["latency"] == 0.01
    await call(http, sim, "POST", "/_sim/reset", headers=None)
    assert (sim.state.contacts, sim.state.requests, sim.state.config.latency) == ({}, [], 0.0)
    assert sim.state.config.token == TOKEN


async def test_request_log_can_be_turned_off(http: aiohttp.ClientSession, sim: Sim) -> None:
    sim.configure(record_requests=False)
    await call(http, sim, "GET", "/accounts/me")
    assert sim.state.requests == []
    assert sim.state.counts["account"] == 1


async def test_legacy_users_paths(http: aiohttp.ClientSession, sim: Sim) -> None:
    await create(http, sim)
    status, body, _ = await call(http, sim, "POST", f"/users/{CID}/send/text", json={"text": "hi"})
    assert (status, body) == (200, {"success": True})
    assert sim.state.counts["send_text_legacy"] == 1


async def test_concurrency_is_measured(http: aiohttp.ClientSession, sim: Sim) -> None:
    sim.configure(latency=0.2)
    await asyncio.gather(*(call(http, sim, "GET", "/accounts/me") for _ in range(5)))
    assert sim.state.max_in_flight == 5


def test_runs_as_a_module() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cgb_worker.simulator", "--port", str(port), "--token", "t0k"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import urllib.request

        deadline = time.monotonic() + 15
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/accounts/me", headers={"X-ACCESS-TOKEN": "t0k"}
                )
                with urllib.request.urlopen(req, timeout=2) as resp:
                    body = msgspec.json.decode(resp.read())
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert body["page_id"] == PAGE_ID
    finally:
        proc.terminate()
        proc.wait(10)


async def test_outage_refuses_connections_then_recovers(http: aiohttp.ClientSession, sim: Sim) -> None:
    status, body, _ = await call(http, sim, "POST", "/_sim/outage", json={"seconds": 0.5}, headers=None)
    assert (status, body["seconds"]) == (200, 0.5)
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as fresh:  # no kept-alive connection to reuse
        with pytest.raises(aiohttp.ClientConnectorError):
            await call(fresh, sim, "GET", "/accounts/me")
        await asyncio.sleep(0.6)
        assert (await call(fresh, sim, "GET", "/accounts/me"))[0] == 200
    _, stats, _ = await call(http, sim, "GET", "/_sim/stats", headers=None)
    assert stats["in_flight"] == 0
