"""Phone to CGB contact: the Redis cache, else find by phone, else create, exactly once across the fleet.

A cached contact costs no CGB call. For a new number, concurrent jobs in one process share one lookup
(single-flight), and jobs in other processes wait on a Redis lock and then read the cache the winner
wrote, so 50 jobs for one new number create one contact. Cache keys hold a hash of the phone, not the
phone, so Redis monitoring and key listings show no numbers.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from .client import CGBClient
from .locks import redis_lock
from .models import ContactAction

_NOT_READ = object()

CacheHook = Callable[[bool], None]
"""Called with True on a cache hit and False on a miss."""


@dataclass(frozen=True, slots=True)
class ResolvedContact:
    id: str
    created: bool
    """True only when this call created it, with its own ``actions`` applied."""
    cached: bool


def decode_cached(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def phone_key(e164: str) -> str:
    return hashlib.blake2b(e164.encode(), digest_size=12).hexdigest()


class ContactResolver:
    """Turns an E.164 phone into a CGB contact id."""

    def __init__(
        self,
        client: CGBClient,
        redis: Redis,
        *,
        cache_ttl: int,
        lock_ttl: float,
        on_cache: CacheHook | None = None,
    ) -> None:
        self._client = client
        self._redis = redis
        self._cache_ttl = cache_ttl
        self._lock_ttl = lock_ttl
        self._on_cache = on_cache
        self._inflight: dict[str, asyncio.Future[ResolvedContact]] = {}

    def cache_key(self, e164: str) -> str:
        return f"cgb:contact:{phone_key(e164)}"

    async def cached(self, e164: str) -> str | None:
        return decode_cached(await self._redis.get(self.cache_key(e164)))

    async def forget(self, e164: str) -> None:
        """Drop a cached id that CGB no longer knows (a send answered 404)."""
        await self._redis.delete(self.cache_key(e164))

    async def resolve(
        self,
        e164: str,
        *,
        first_name: str | None = None,
        last_name: str | None = None,
        email: str | None = None,
        actions: Sequence[ContactAction] = (),
        cached: str | object | None = _NOT_READ,
    ) -> ResolvedContact:
        """The contact for ``e164``. ``cached`` is the cache's value when the caller already read it
        (the job reads it in the same round trip as its send log)."""
        if cached is _NOT_READ:
            cached = await self.cached(e164)
        assert cached is None or isinstance(cached, str)
        if self._on_cache is not None:
            self._on_cache(cached is not None)
        if cached is not None:
            return ResolvedContact(cached, created=False, cached=True)
        pending = self._inflight.get(e164)
        if pending is not None:
            leader = await asyncio.shield(pending)
            return ResolvedContact(leader.id, created=False, cached=False)
        future: asyncio.Future[ResolvedContact] = asyncio.get_running_loop().create_future()
        self._inflight[e164] = future
        try:
            resolved = await self._find_or_create(e164, first_name, last_name, email, actions)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # followers re-raise it; mark it retrieved for the leader's sake
            raise
        else:
            future.set_result(resolved)
            return resolved
        finally:
            del self._inflight[e164]

    async def _find_or_create(
        self,
        e164: str,
        first_name: str | None,
        last_name: str | None,
        email: str | None,
        actions: Sequence[ContactAction],
    ) -> ResolvedContact:
        lock_key = f"cgb:lock:contact:{phone_key(e164)}"
        async with redis_lock(
            self._redis, lock_key, ttl=self._lock_ttl, wait=self._lock_ttl, done=lambda: self.cached(e164)
        ) as winner:
            if winner:
                return ResolvedContact(winner, created=False, cached=False)
            if (again := await self.cached(e164)) is not None:
                return ResolvedContact(again, created=False, cached=False)
            found = await self._client.find_contact_by_phone(e164)
            if found is not None:
                contact_id, created = found.id, False
            else:
                contact_id = await self._client.create_contact(
                    e164, first_name=first_name, last_name=last_name, email=email, actions=actions
                )
                created = True
            await self._redis.set(self.cache_key(e164), contact_id, ex=self._cache_ttl)
            return ResolvedContact(contact_id, created=created, cached=False)
