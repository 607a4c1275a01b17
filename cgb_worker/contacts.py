"""Phone to CGB contact: the Redis cache, else the contact by its id, else create, exactly once across the fleet.

A WhatsApp contact's id in CGB is its E.164 digits (the contract, C2), so a number that is not cached is
first asked for by that id (``GET /contacts/{digits}``, one call, which also tells a deleted contact from a
live one), and created only when CGB does not know it. So a send to a cached contact costs no extra call,
to a known number whose cache expired one (the get), and to a new number two (the get and the create; when
CGB's answer carries no id, the digits are the id). Finding by phone (two more calls, ``+E164`` then
digits) is kept for the one case this misses: a send to the id those steps gave is answered 404
(:meth:`ContactResolver.resolve` with ``by_phone=True``).

Each process also keeps the ids it has seen for a minute (:data:`LOCAL_TTL`, at most :data:`LOCAL_MAX` of
them), so a text to a number it sent to moments ago reads nothing from Redis before its send. That is safe
because a stale id is caught where it matters: a send to an id CGB no longer knows is answered 404, and the
job then forgets the phone, here and in Redis, and finds it again.

For a new number, concurrent jobs in one process share one lookup (single-flight), and jobs in other
processes wait on a Redis lock and then read the cache the winner wrote, so 50 jobs for one new number
create one contact. Cache keys hold a hash of the phone, not the phone, so Redis monitoring and key
listings show no numbers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from . import keys
from .client import CGBClient
from .errors import CGBNotFoundError
from .locks import redis_lock
from .models import Contact, ContactAction
from .phones import contact_id_for
from .suppression import decode as decode_suppression
from .suppression import suppress_who

_NOT_READ = object()
LOCAL_TTL = 60.0
"""Seconds a process trusts an id it saw, without asking Redis (never longer than ``CGB_CACHE_TIMEOUT``)."""
LOCAL_MAX = 10_000
UNSUBSCRIBED = 2
"""CGB's ``subscribed`` for a contact who unsubscribed."""

CacheHook = Callable[[bool], None]
"""Called with True on a cache hit and False on a miss."""


@dataclass(frozen=True, slots=True)
class ResolvedContact:
    id: str
    created: bool
    """True only when this call created it, with its own ``actions`` applied."""
    cached: bool
    unsubscribed: bool = False
    """CGB's contact, read now, says ``subscribed == 2``: the resolver put the person on the suppression list
    (scope ``all``, reason ``cgb_unsubscribed``), and the job refuses every category but ``authentication``."""


def decode_cached(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


phone_key = keys.who


class ContactResolver:
    """Turns an E.164 phone into a CGB contact id."""

    def __init__(
        self,
        client: CGBClient,
        redis: Redis,
        *,
        cache_ttl: int,
        on_cache: CacheHook | None = None,
    ) -> None:
        self._client = client
        self._redis = redis
        self._cache_ttl = cache_ttl
        # Long enough for the two or three calls of a lookup, each at most the client's timeout.
        self._lock_ttl = client.timeout * 4 + 5
        self._on_cache = on_cache
        self._inflight: dict[str, asyncio.Future[ResolvedContact]] = {}
        self._local: dict[str, tuple[str, float]] = {}
        self._local_ttl = min(LOCAL_TTL, float(cache_ttl))

    def seen(self, e164: str) -> str | None:
        """The id this process saw for ``e164`` within the last :data:`LOCAL_TTL` seconds, if any."""
        entry = self._local.get(e164)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._local[e164]
            return None
        return entry[0]

    def remember(self, e164: str, contact_id: str) -> None:
        if e164 not in self._local and len(self._local) >= LOCAL_MAX:
            del self._local[next(iter(self._local))]  # the oldest
        self._local[e164] = (contact_id, time.monotonic() + self._local_ttl)

    def cache_key(self, e164: str) -> str:
        return keys.contact(phone_key(e164))

    async def cached(self, e164: str) -> str | None:
        return decode_cached(await self._redis.get(self.cache_key(e164)))

    async def forget(self, e164: str) -> None:
        """Drop a cached id that CGB no longer knows (a send answered 404)."""
        self._local.pop(e164, None)
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
        by_phone: bool = False,
    ) -> ResolvedContact:
        """The contact for ``e164``. ``cached`` is the cache's value when the caller already read it
        (the job reads it in the same round trip as its send log); ``by_phone`` skips the cache and the
        id and finds the contact by its phone (a send to the id was answered 404)."""
        if by_phone:
            cached = None
        if cached is _NOT_READ:
            cached = await self.cached(e164)
        assert cached is None or isinstance(cached, str)
        if self._on_cache is not None:
            self._on_cache(cached is not None)
        if cached is not None:
            self.remember(e164, cached)
            return ResolvedContact(cached, created=False, cached=True)
        pending = self._inflight.get(e164)
        if pending is not None:
            leader = await asyncio.shield(pending)
            return ResolvedContact(leader.id, created=False, cached=False, unsubscribed=leader.unsubscribed)
        future: asyncio.Future[ResolvedContact] = asyncio.get_running_loop().create_future()
        self._inflight[e164] = future
        try:
            resolved = await self._find_or_create(e164, first_name, last_name, email, actions, by_phone)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # followers re-raise it; mark it retrieved for the leader's sake
            raise
        else:
            future.set_result(resolved)
            return resolved
        finally:
            del self._inflight[e164]

    async def _unsubscribed(self, e164: str) -> bool:
        entries, _lifted = decode_suppression(await self._redis.get(keys.suppressed(phone_key(e164))))
        return any(e.scope == "all" and e.reason == "cgb_unsubscribed" for e in entries)

    async def _find_or_create(
        self,
        e164: str,
        first_name: str | None,
        last_name: str | None,
        email: str | None,
        actions: Sequence[ContactAction],
        by_phone: bool,
    ) -> ResolvedContact:
        lock_key = keys.contact_lock(phone_key(e164))
        async with redis_lock(
            self._redis,
            lock_key,
            ttl=self._lock_ttl,
            wait=self._lock_ttl,
            done=lambda: self.cached(e164),
            request_timeout=self._client.timeout,
        ) as winner:
            # Another process read the contact meanwhile: it wrote any cgb_unsubscribed entry before the cache.
            if winner and not by_phone:
                return ResolvedContact(winner, created=False, cached=False, unsubscribed=await self._unsubscribed(e164))
            if not by_phone and (again := await self.cached(e164)) is not None:
                return ResolvedContact(again, created=False, cached=False, unsubscribed=await self._unsubscribed(e164))
            contact_id: str | None = None
            found: Contact | None = None
            if by_phone:
                found = await self._client.find_contact_by_phone(e164)
            else:
                try:
                    found = await self._client.get_contact(contact_id_for(e164))
                except CGBNotFoundError:
                    found = None
            contact_id = found.id if found is not None else None
            unsubscribed = found is not None and found.subscribed == UNSUBSCRIBED
            if unsubscribed:
                # Before the id is cached: the jobs that read the cache from now on read this too.
                await suppress_who(self._redis, phone_key(e164), scope="all", reason="cgb_unsubscribed")
            created = contact_id is None
            if contact_id is None:
                contact_id = await self._client.create_contact(
                    e164, first_name=first_name, last_name=last_name, email=email, actions=actions
                ) or contact_id_for(e164)
            await self._redis.set(self.cache_key(e164), contact_id, ex=self._cache_ttl)
            self.remember(e164, contact_id)
            return ResolvedContact(contact_id, created=created, cached=False, unsubscribed=unsubscribed)
