"""Contact resolution: cache, single-flight in a process, a Redis lock across processes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cgb_worker import errors as E
from cgb_worker.contacts import ContactResolver, phone_key
from cgb_worker.locks import redis_lock
from cgb_worker.models import Contact


class SlowClient:
    """Counts calls; knows no contact at first, creates after a delay (a wide race window)."""

    timeout = 1.0

    def __init__(self) -> None:
        self.finds = 0
        self.creates = 0
        self.fail = False

    async def get_contact(self, contact_id: str) -> Contact:
        self.finds += 1
        await asyncio.sleep(0.02)
        if not self.creates:
            raise E.CGBNotFoundError("User not found", status=404, endpoint="get_contact")
        return Contact(id=contact_id, page_id="1", channel=5)

    async def find_contact_by_phone(self, e164: str) -> Contact | None:
        raise AssertionError("a phone is found by its id first")

    async def create_contact(self, phone: str, **kwargs: Any) -> str:
        await asyncio.sleep(0.05)
        if self.fail:
            raise E.CGBServerError("down", status=503)
        self.creates += 1
        return phone[1:]


def resolver(client: SlowClient, redis: Any) -> ContactResolver:
    return ContactResolver(client, redis, cache_ttl=60)  # type: ignore[arg-type]


async def test_one_create_across_processes_and_tasks(redis_client: Any) -> None:
    client = SlowClient()
    # Three resolvers stand for three worker processes: their single-flight maps are separate.
    resolvers = [resolver(client, redis_client) for _ in range(3)]
    results = await asyncio.gather(*(resolvers[i % 3].resolve("+972500000001") for i in range(30)))
    assert {r.id for r in results} == {"972500000001"}
    assert client.creates == 1
    assert sum(r.created for r in results) == 1
    assert client.finds == 1
    key = f"cgb:contact:{phone_key('+972500000001')}"
    assert await redis_client.get(key) == b"972500000001"
    assert 0 < await redis_client.ttl(key) <= 60
    assert b"972500000001" not in key.encode()
    cached = await resolvers[0].resolve("+972500000001")
    assert (cached.cached, cached.created) == (True, False)
    assert client.finds == 1


async def test_hits_and_misses_are_reported(redis_client: Any) -> None:
    seen: list[bool] = []
    r = ContactResolver(SlowClient(), redis_client, cache_ttl=60, on_cache=seen.append)  # type: ignore[arg-type]
    await r.resolve("+12025550100")
    await r.resolve("+12025550100")
    assert seen == [False, True]
    await r.forget("+12025550100")
    assert await r.cached("+12025550100") is None


async def test_a_failed_leader_fails_its_followers_and_releases_the_lock(redis_client: Any) -> None:
    client = SlowClient()
    client.fail = True
    r = resolver(client, redis_client)
    results = await asyncio.gather(*(r.resolve("+12025550100") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(x, E.CGBServerError) for x in results)
    assert await redis_client.keys("cgb:lock:*") == []
    client.fail = False
    assert (await r.resolve("+12025550100")).created is True


async def test_lock_wait_runs_out_as_busy(redis_client: Any) -> None:
    async with redis_lock(redis_client, "cgb:lock:test:x", ttl=5, wait=1):
        with pytest.raises(E.BusyError, match="lock another job holds"):
            async with redis_lock(redis_client, "cgb:lock:test:x", ttl=5, wait=0.1):
                pass
    assert await redis_client.exists("cgb:lock:test:x") == 0


async def test_lock_is_released_only_by_its_owner(redis_client: Any) -> None:
    async with redis_lock(redis_client, "cgb:lock:test:y", ttl=0.1, wait=1):
        await asyncio.sleep(0.15)  # expired: someone else takes it
        await redis_client.set("cgb:lock:test:y", "other")
    assert await redis_client.get("cgb:lock:test:y") == b"other"


async def test_lock_wait_ends_inside_the_try(redis_client: Any) -> None:
    """Symptom 7: the field lock waited 155 s for 3 fields, past the try's own deadline. Inside a job, a wait
    ends by the deadline less one request."""
    import time

    from cgb_worker.ratelimit import reset_deadline, set_deadline

    token = set_deadline(time.monotonic() + 2.0)
    try:
        async with redis_lock(redis_client, "cgb:lock:test:z", ttl=60, wait=60):
            started = time.monotonic()
            with pytest.raises(E.BusyError):
                async with redis_lock(redis_client, "cgb:lock:test:z", ttl=60, wait=60, request_timeout=1.0):
                    pass
            assert time.monotonic() - started < 0.7  # 2 s left, less the request's 1 s and half a second
    finally:
        reset_deadline(token)


async def test_a_process_remembers_ids_for_a_minute_and_forgets_on_404(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cgb_worker import contacts

    r = resolver(SlowClient(), redis_client)
    assert r.seen("+12025550100") is None
    await r.resolve("+12025550100")  # created: remembered
    assert r.seen("+12025550100") == "12025550100"
    await r.forget("+12025550100")
    assert r.seen("+12025550100") is None
    assert await r.cached("+12025550100") is None
    r.remember("+12025550101", "12025550101")
    import time

    monkeypatch.setattr(time, "monotonic", lambda: 10**9)  # a minute and more later
    assert r.seen("+12025550101") is None
    monkeypatch.setattr(contacts, "LOCAL_MAX", 2)
    for i in range(3):
        r.remember(f"+1202555020{i}", str(i))
    assert [r.seen(f"+1202555020{i}") for i in range(3)] == [None, "1", "2"]  # the oldest made room


class UnsubscribedClient(SlowClient):
    """CGB has the contact, and it says ``subscribed: 2``."""

    async def get_contact(self, contact_id: str) -> Contact:
        self.finds += 1
        await asyncio.sleep(0.05)
        return Contact(id=contact_id, page_id="1", channel=5, subscribed=2)


async def test_an_unsubscribed_contact_is_suppressed_once_and_every_process_and_task_is_told(
    redis_client: Any,
) -> None:
    import json

    from cgb_worker import keys

    client = UnsubscribedClient()
    resolvers = [resolver(client, redis_client) for _ in range(3)]  # three processes, each with waiting tasks
    results = await asyncio.gather(*(resolvers[i % 3].resolve("+972500000001") for i in range(9)))
    assert client.finds == 1
    assert [r.unsubscribed for r in results] == [True] * 9
    entry = json.loads(await redis_client.get(keys.suppressed(phone_key("+972500000001"))))
    assert list(entry) == ["all"]
    assert entry["all"]["reason"] == "cgb_unsubscribed"
    # read from the cache later, the contact is not read again: the job reads the entry with the cache
    again = await resolver(client, redis_client).resolve("+972500000001")
    assert (again.cached, again.unsubscribed, client.finds) == (True, False, 1)
