"""Template names to flows, variables to typed custom-field values, the cached catalog."""

from __future__ import annotations

from typing import Any

import pytest

from cgb_worker import errors as E
from cgb_worker.models import CustomField, Flow
from cgb_worker.templates import Catalog, TemplateResolver, convert_value, normalize_name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Visa_Approved", "visa approved"), ("  visa   approved ", "visa approved"), ("visa-approved", "visa approved")],
)
def test_normalize_name(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


def field(type_: int) -> CustomField:
    return CustomField(id="1", name="f", type=type_)


@pytest.mark.parametrize(
    ("type_", "value", "expected"),
    [
        (0, "Dana", "Dana"),
        (0, 5, "5"),
        (0, True, "true"),
        (0, None, ""),
        (5, "long text", "long text"),
        (1, 3, 3),
        (1, 2.5, 2.5),
        (1, "42", 42),
        (1, " -7 ", -7),
        (1, "1.25", 1.25),
        (2, "2026-12-01", 1796083200),
        (2, 1796083200, 1796083200),
        (2, "1796083200", 1796083200),
        (3, "2026-12-01T10:30:00Z", 1796121000),
        (3, "2026-12-01T12:30:00+02:00", 1796121000),
        (3, "2026-12-01T10:30:00", 1796121000),  # naive: UTC
        (3, 1796121000.9, 1796121000),
        (4, True, 1),
        (4, False, 0),
        (4, 1, 1),
        (4, "yes", 1),
        (4, "FALSE", 0),
        (4, "off", 0),
    ],
)
def test_convert_value(type_: int, value: Any, expected: Any) -> None:
    converted = convert_value(field(type_), "v", value)
    assert converted == expected
    assert type(converted) is type(expected)


@pytest.mark.parametrize(
    ("type_", "value", "message"),
    [
        (1, "two", "needs a number"),
        (1, True, "needs a number"),
        (1, None, "needs a number"),
        (1, "nan", "finite"),
        (1, float("inf"), "finite"),
        (2, "next week", "not an ISO 8601 date"),
        (2, True, "ISO 8601 date or Unix seconds"),
        (3, float("nan"), "ISO 8601 date or Unix seconds"),
        (4, "maybe", "needs true or false"),
        (4, 2, "needs true or false"),
    ],
)
def test_convert_value_errors(type_: int, value: Any, message: str) -> None:
    with pytest.raises(E.UnknownVariableError, match=message) as info:
        convert_value(field(type_), "my_var", value)
    assert "'my_var'" in str(info.value)


class FakeCatalog:
    def __init__(self, flows: list[Flow], fields: list[CustomField] | None = None) -> None:
        self._flows = flows
        self._fields = fields or []

    async def flows(self) -> list[Flow]:
        return self._flows

    async def custom_fields(self) -> list[CustomField]:
        return self._fields


async def test_mapping_wins_then_exact_name() -> None:
    flows = [Flow("1", "Visa Approved"), Flow("2", "Visa Approved Reminder"), Flow("3", "welcome")]
    resolver = TemplateResolver(FakeCatalog(flows), {"welcome": "99"})  # type: ignore[arg-type]
    assert await resolver.flow_id("WELCOME") == "99"
    assert await resolver.flow_id("visa_approved") == "1"
    assert await resolver.flow_id("visa approved reminder") == "2"
    assert await resolver.flow_id("visa") is None
    assert await resolver.flow_id("approved") is None


async def test_ambiguous_flow_names_are_an_error() -> None:
    resolver = TemplateResolver(FakeCatalog([Flow("1", "visa"), Flow("2", "Visa")]), {})  # type: ignore[arg-type]
    with pytest.raises(E.TemplateNotFoundError, match="ambiguous: flows 1, 2"):
        await resolver.flow_id("visa")


async def test_fields_for_names_every_missing_variable() -> None:
    fields = [CustomField("10", "first_name", 0), CustomField("11", "Applicants", 1)]
    resolver = TemplateResolver(FakeCatalog([], fields), {})  # type: ignore[arg-type]
    assert await resolver.fields_for({"first_name": "Dana", "applicants": "2"}) == [(fields[0], "Dana"), (fields[1], 2)]
    assert await resolver.fields_for({}) == []
    with pytest.raises(E.UnknownVariableError, match="'passport', 'zip'"):
        await resolver.fields_for({"zip": 1, "first_name": "x", "passport": "p"})


class CountingClient:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    async def list_flows(self) -> list[Flow]:
        self.calls += 1
        if self.fail:
            raise E.CGBServerError("down", status=503)
        return [Flow("1752250957765", "visa_approved")]

    async def list_custom_fields(self) -> list[CustomField]:
        return []


async def test_catalog_caches_in_redis_and_serves_stale(redis_client: Any) -> None:
    client = CountingClient()
    catalog = Catalog(client, redis_client, ttl=3600)  # type: ignore[arg-type]
    assert [f.id for f in await catalog.flows()] == ["1752250957765"]
    assert [f.id for f in await Catalog(client, redis_client, ttl=3600).flows()] == ["1752250957765"]  # type: ignore[arg-type]
    assert client.calls == 1  # the second catalog (another process) read Redis
    assert 3600 * 29 < await redis_client.ttl("cgb:catalog:flows") <= 3600 * 30

    expired = Catalog(client, redis_client, ttl=0)  # type: ignore[arg-type]
    client.fail = True
    assert [f.id for f in await expired.flows()] == ["1752250957765"]  # stale, served
    assert client.calls == 2


async def test_catalog_without_a_copy_raises_the_cgb_error(redis_client: Any) -> None:
    client = CountingClient()
    client.fail = True
    with pytest.raises(E.CGBServerError):
        await Catalog(client, redis_client, ttl=60).flows()  # type: ignore[arg-type]


async def test_catalog_refreshes_once_for_concurrent_callers(redis_client: Any) -> None:
    import asyncio

    client = CountingClient()
    catalog = Catalog(client, redis_client, ttl=60)  # type: ignore[arg-type]
    results = await asyncio.gather(*(catalog.flows() for _ in range(20)))
    assert all(r == results[0] for r in results)
    assert client.calls == 1
