"""``cgb-worker forget PHONE``: remove every record of one person from Redis, for an erasure request.

A person is named in many shapes: the number itself in arq's job payloads and results, the dead-letter store
and the receiver's raw webhooks; its keyed hash (:func:`cgb_worker.keys.who`) in the contact cache, locks,
window, turn and awaiting set; its job ids in send records, wamid keys, the delivery and reaction streams. So
the walk is generic rather than a list of record types that would go stale: find the person's job ids first,
then visit every key under ``cgb:`` and ``arq:`` and delete each key, hash field, set member or stream entry
that names the number (its digits, with or without ``+``, or any form :func:`normalize_phone` reads as it),
the hash, a wamid that encodes the number, or one of those jobs. It costs a read of every key (O(keys)). The
person's suppression entry is kept (:func:`forget`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from arq.constants import (
    abort_jobs_ss,
    default_queue_name,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from redis.asyncio import Redis

from . import keys
from .errors import InvalidPhoneError
from .phones import normalize_phone
from .suppression import decode as decode_suppression

ARQ_PREFIX = "arq:"
BATCH = 500

_DEAD_ORIGINS = keys.DEAD_PAYLOADS + ":origin"  # as cgb_worker.deadletters names it
_SHARED: dict[str, str] = {
    keys.AWAITING: "awaiting sends",
    keys.AWAITING_PLACED: "awaiting sends",
    keys.ORPHANS: "held statuses",
    keys.ORPHANS_SINCE: "held statuses",
    keys.UNMATCHED: "unmatched statuses",
    keys.MALFORMED: "malformed webhooks",
    keys.INBOX: "webhook inbox",
    keys.DELIVERIES: "delivery stream",
    keys.REACTIONS: "reactions",
    keys.DEAD_INDEX: "dead letters",
    keys.DEAD_ENTRIES: "dead letters",
    keys.DEAD_PAYLOADS: "dead letters",
    _DEAD_ORIGINS: "dead letters",
    keys.DEAD_REPLAYING: "dead letters",
    default_queue_name: "queued jobs",
    abort_jobs_ss: "queued jobs",
}
"""Keys many people share: what is removed from them is a member, field or entry."""
_OWN: tuple[tuple[str, str], ...] = (
    (keys.contact(""), "contact cache"),
    (keys.contact_lock(""), "locks"),
    (keys.fields_lock(""), "locks"),
    (keys.window(""), "24-hour window"),
    (keys.turn(""), "turn"),
    (keys.bsuid(""), "BSUID map"),
    (keys.suppressed(""), "suppression list"),
    (keys.sends(""), "send records"),
    (keys.throttled(""), "throttle marks"),
    (keys.JOBS_ON_PREFIX, "job index"),
    (keys.tries(""), "job tries"),
    (keys.last_retry(""), "job tries"),
    (keys.WAMID_PREFIX, "wamid map"),
    (job_key_prefix, "queued jobs"),
    (result_key_prefix, "job results"),
    (in_progress_key_prefix, "running-job markers"),
    (retry_key_prefix, "retry counters"),
)
"""Key prefixes, each key one record: what is removed is the key."""
_JOB_KEYS = (
    job_key_prefix,
    result_key_prefix,
    in_progress_key_prefix,
    retry_key_prefix,
    keys.sends(""),
    keys.throttled(""),
)
_BY_ID = frozenset(
    {
        default_queue_name,
        abort_jobs_ss,
        keys.DEAD_INDEX,
        keys.DEAD_ENTRIES,
        keys.DEAD_PAYLOADS,
        _DEAD_ORIGINS,
        keys.DEAD_REPLAYING,
    }
)
"""Shared keys whose members or fields are job ids: one job is one record across them."""

_ID_CHAR = rb"A-Za-z0-9_.\-"
_TOKEN = re.compile(rb"[" + _ID_CHAR + rb"]+")
_WRITTEN = re.compile(rb"(?<![0-9])\+?[0-9][0-9 ().\-]{4,24}[0-9](?![0-9])")
"""A number as people write it: digits, maybe a plus, spaces, dashes, dots and brackets between."""
_WAMID = re.compile(rb"wamid\.([A-Za-z0-9+/_\-]+=*)")


@dataclass
class Forgotten:
    """What :func:`forget` removed: per kind of record, how many; never the number."""

    removed: dict[str, int] = field(default_factory=dict)
    jobs: int = 0
    """The person's jobs that were found (queued, running, finished, dead-lettered or only in send records)."""
    running: int = 0
    """Of them, running while the walk ran: what they write as they end is written after it."""
    kept_suppression: bool = False
    """The person is on the suppression list, and stays there (:func:`forget`)."""


class _Person:
    """Everything that names one person, as tests on raw bytes."""

    def __init__(self, e164: str, default_region: str | None) -> None:
        self.e164 = e164
        self.digits = e164.lstrip("+").encode()
        self.hash = keys.who(e164).encode()
        self.region = default_region
        self._bare = re.compile(rb"(?<![0-9])" + re.escape(self.digits) + rb"(?![0-9])")
        self._jobs: re.Pattern[bytes] | None = None

    def with_jobs(self, job_ids: Iterable[str]) -> None:
        ids = sorted({j.encode() for j in job_ids}, key=len, reverse=True)
        if ids:
            alternatives = b"|".join(re.escape(i) for i in ids)
            self._jobs = re.compile(rb"(?<![" + _ID_CHAR + rb"])(?:" + alternatives + rb")(?![" + _ID_CHAR + rb"])")

    def named(self, data: bytes) -> bool:
        """Whether ``data`` names the number or its hash (the job ids aside)."""
        if self.hash in data or self._bare.search(data):
            return True
        for match in _WRITTEN.finditer(data):
            if self._reads_as_it(match.group()):
                return True
        return any(self._bare.search(_unbase64(m.group(1))) for m in _WAMID.finditer(data))

    def mentioned(self, data: bytes) -> bool:
        """Whether ``data`` names the number, its hash or one of the person's jobs."""
        return self.named(data) or (self._jobs is not None and self._jobs.search(data) is not None)

    def _reads_as_it(self, written: bytes) -> bool:
        digits = re.sub(rb"[^0-9]", b"", written)
        if digits == self.digits:
            return True
        if len(digits) > 17 or digits[-6:] != self.digits[-6:]:
            return False  # cheap: only a number ending as ours can read as ours
        try:
            return normalize_phone(written.decode(), self.region) == self.e164
        except InvalidPhoneError:
            return False


def _name(key: bytes) -> Any:
    """A key as redis-py takes it: bytes, kept as read (its type hints ask for str)."""
    return cast(Any, key)


def _unbase64(text: bytes) -> bytes:
    """A wamid's body (Meta's encodes the recipient's number), or nothing."""
    body = text.rstrip(b"=").replace(b"-", b"+").replace(b"_", b"/")
    try:
        return base64.b64decode(body[: len(body) // 4 * 4])  # the number is near the start
    except (binascii.Error, ValueError):
        return b""


async def forget(redis: Redis, phone: str, *, default_region: str | None = None) -> Forgotten:
    """Remove every record of ``phone`` (any form :func:`normalize_phone` accepts) from Redis.

    All but one: the person's suppression entry (``cgb:suppressed:<hash>`` and its hash in the index), while it
    holds an opt-out, is kept. Honouring an opt-out is why it exists, and erasing it would let the next job
    message someone who asked us to stop; it holds only the keyed hash, reasons and times (``kept_suppression``
    says it was kept)."""
    person = _Person(normalize_phone(phone, default_region), default_region)
    own_suppression = keys.suppressed(person.hash.decode()).encode()
    types = await _types(redis, [k async for k in _every_key(redis)])
    # Kept while it holds an opt-out (one with only the time opt-outs were last lifted is removed); the index holds
    # hashes only, of people with an opt-out, and the walk would take the person's out of it.
    kept = own_suppression in types and bool(decode_suppression(await redis.get(_name(own_suppression)))[0])
    types.pop(keys.SUPPRESSED_INDEX.encode(), None)
    if kept:
        del types[own_suppression]
    jobs = await _jobs_of(redis, person, types)
    person.with_jobs(jobs)
    running = sum(1 for j in jobs if (in_progress_key_prefix + j).encode() in types)
    removed: dict[str, set[bytes]] = {}
    walk = _Walk(redis, person, removed)
    for key, kind in types.items():
        await walk.visit(key, kind)
    for at in walk.wamids:
        if await redis.delete(_name(at + b":at")):
            removed.setdefault("wamid map", set()).add(at)
    removed_counts = {k: len(v) for k, v in sorted(removed.items()) if v}
    return Forgotten(removed_counts, jobs=len(jobs), running=running, kept_suppression=kept)


async def _every_key(redis: Redis) -> AsyncIterator[bytes]:
    for prefix in (keys.PREFIX, ARQ_PREFIX):
        async for key in redis.scan_iter(match=prefix + "*", count=1000):
            yield key


async def _types(redis: Redis, names: list[bytes]) -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    for start in range(0, len(names), BATCH):
        chunk = names[start : start + BATCH]
        async with redis.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.type(key)
            kinds = await pipe.execute()
        for key, kind in zip(chunk, kinds, strict=True):
            name = kind.decode() if isinstance(kind, bytes) else str(kind)
            if name != "none":  # gone since the scan
                found[key] = name
    return found


async def _jobs_of(redis: Redis, person: _Person, types: dict[bytes, str]) -> set[str]:
    """The person's job ids: every job whose arq record, send record or dead letter names the number or its
    hash, every job of the person's awaiting sends and turn, and, to a fixed point, the jobs those records
    name in turn (a replay's original, a fallback's main job)."""
    every: set[str] = set()
    records: dict[str, list[bytes]] = {}
    mine: set[str] = set()

    def record(job_id: str, *data: bytes) -> None:
        records.setdefault(job_id, []).extend(data)

    for key, kind in types.items():
        name = key.decode(errors="replace")
        prefix = next((p for p in _JOB_KEYS if name.startswith(p)), None)
        if prefix is not None:
            job_id = name[len(prefix) :]
            every.add(job_id)
            if kind == "string" and prefix in (job_key_prefix, result_key_prefix):
                record(job_id, await redis.get(_name(key)) or b"")
            elif kind == "hash" and prefix == keys.sends(""):
                for f, v in (await redis.hgetall(_name(key))).items():  # type: ignore[misc]
                    record(job_id, f, v)
        elif name in _BY_ID:
            async for item in _members(redis, key, kind):
                job_id = item[0].decode(errors="replace")
                every.add(job_id)
                record(job_id, *item[1:])
        elif name == keys.AWAITING and kind == "zset":
            async for member, _score in redis.zscan_iter(_name(key), match=person.hash.decode() + "|*"):
                mine.add(member.decode().split("|", 3)[3].rpartition("|")[0])
        elif name == keys.turn(person.hash.decode()) and kind == "string":
            mine.add((await redis.get(_name(key)) or b"").decode().rpartition("|")[0])
    mine |= {j for j, data in records.items() if any(person.named(d) for d in data)}
    mine.discard("")
    new = set(mine)
    while new:
        found: set[str] = set()
        for job_id in new:
            for data in records.get(job_id, []):
                found |= {t.decode() for t in _TOKEN.findall(data)} & every
            found |= {j for j in every if j.startswith(job_id + ":")}  # its fallback
        new = found - mine
        mine |= new
    return mine


async def _members(redis: Redis, key: bytes, kind: str) -> AsyncIterator[tuple[bytes, ...]]:
    """A shared key's items as (member or field, what else it holds)."""
    if kind == "hash":
        async for f, v in redis.hscan_iter(_name(key), count=BATCH):
            yield f, v
    elif kind == "zset":
        async for member, _score in redis.zscan_iter(_name(key), count=BATCH):
            yield (member,)
    elif kind == "set":
        async for member in redis.sscan_iter(_name(key), count=BATCH):
            yield (member,)


class _Walk:
    """Deletes, key by key, what names the person, and notes it under its kind."""

    def __init__(self, redis: Redis, person: _Person, removed: dict[str, set[bytes]]) -> None:
        self.redis = redis
        self.person = person
        self.removed = removed
        self.wamids: list[bytes] = []
        """The wamid keys deleted: each may have an ``:at`` sibling that names no one."""

    def note(self, key: bytes, identity: bytes) -> None:
        name = key.decode(errors="replace")
        kind = _SHARED.get(name) or next((k for p, k in _OWN if name.startswith(p)), "other records")
        if name in _BY_ID:
            identity = identity.split(b"|")[0]
        elif name in (keys.AWAITING, keys.AWAITING_PLACED):
            identity = identity.split(b"|", 3)[-1] if name == keys.AWAITING else identity
        self.removed.setdefault(kind, set()).add(identity)

    async def visit(self, key: bytes, kind: str) -> None:
        person = self.person
        if person.mentioned(key):
            if await self.redis.delete(_name(key)):
                self.note(key, _own_identity(key))
            return
        if kind == "string":
            value = await self.redis.get(_name(key))
            if value is not None and person.mentioned(value) and await self.redis.delete(_name(key)):
                self.note(key, _own_identity(key))
                if key.startswith(keys.WAMID_PREFIX.encode()) and not key.endswith(b":at"):
                    self.wamids.append(key)
        elif kind == "hash":
            drop = [
                f async for f, v in self.redis.hscan_iter(_name(key), count=BATCH) if person.mentioned(f + b"\0" + v)
            ]
            if drop:
                await self.redis.hdel(_name(key), *drop)  # type: ignore[misc]
                for f in drop:
                    self.note(key, f)
        elif kind in ("zset", "set"):
            drop = [item[0] async for item in _members(self.redis, key, kind) if person.mentioned(item[0])]
            if drop:
                await (self.redis.zrem(_name(key), *drop) if kind == "zset" else self.redis.srem(_name(key), *drop))  # type: ignore[misc]
                for m in drop:
                    self.note(key, m)
        elif kind == "list":
            for value in set(await self.redis.lrange(_name(key), 0, -1)):  # type: ignore[misc]
                if person.mentioned(value) and await self.redis.lrem(_name(key), 0, value):  # type: ignore[misc]
                    self.note(key, value)
        elif kind == "stream":
            await self._stream(key)

    async def _stream(self, key: bytes) -> None:
        groups = [g["name"] for g in await self.redis.xinfo_groups(_name(key))]
        start = b"-"
        while page := await self.redis.xrange(_name(key), min=start, count=BATCH):
            drop = [i for i, fields in page if any(self.person.mentioned(f + b"\0" + v) for f, v in fields.items())]
            if drop:
                for group in groups:  # so that no consumer is handed an entry that is no longer there
                    await self.redis.xack(_name(key), group, *drop)
                await self.redis.xdel(_name(key), *drop)
                for i in drop:
                    self.note(key, i)
            start = b"(" + page[-1][0]


def _own_identity(key: bytes) -> bytes:
    """One record per key; a job's arq keys are one job, and a wamid's ``:at`` one wamid."""
    name = key.decode(errors="replace")
    for prefix in (job_key_prefix, default_queue_name):
        if name.startswith(prefix):
            return name[len(prefix) :].encode()
    return key[: -len(b":at")] if key.endswith(b":at") else key
