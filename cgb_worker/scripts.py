"""The Redis scripts (``cgb_worker/lua/*.lua``), each read once and called through a small typed wrapper.

State that must change together changes in one script; each file's header says its keys, arguments and
answer. Scripts are sent by hash (``EVALSHA``; redis-py loads one again if the server lost it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from redis.asyncio import Redis

from . import keys


@functools.cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``, read from the package once per process."""
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Match:
    """:class:`MatchScript`'s answer. ``refs``: the step found (one), or every candidate when ``ambiguous``."""

    by: Literal["wamid", "recipient", "none", "ambiguous"]
    refs: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return self.refs[0]


class MatchScript:
    """``match.lua``: the send a status belongs to, by its wamid or by the attribution rule."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(source("match"))

    async def __call__(
        self,
        wamid: str,
        who: str | None,
        at_ms: int,
        *,
        status: str = "sent",
        refused: bool = False,
        window_ms: int,
        skew_ms: int,
        wamid_ttl: int,
    ) -> Match:
        found = await self._script(
            keys=[
                keys.wamid(wamid),
                keys.AWAITING,
                keys.turn(who or "-"),
                keys.wamid_sent_at(wamid),
                keys.AWAITING_PLACED,
            ],
            args=[who or "", at_ms, window_ms, skew_ms, wamid_ttl, status, "1" if refused else ""],
        )
        by = _text(found[0])
        assert by in ("wamid", "recipient", "none", "ambiguous")
        return Match(by, tuple(_text(r) for r in found[1:]))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: Literal["changed", "kept", "duplicate", "gone"]
    status: str
    sent_at_ms: int
    reacted: bool


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """One status for one step, as ``apply.lua`` takes it."""

    step: str
    status: str
    at_ms: int
    event: bytes
    wamid: str = ""
    matched_by: str = ""
    error_code: str = ""
    error_title: str = ""
    error_details: str = ""
    wa_id: str = ""
    user_id: str = ""


class ApplyScript:
    """``apply.lua``: a status applied to a step's record, with the stream entry, the window and any reaction."""

    def __init__(self, redis: Redis, *, stream_max: int, window_ttl: int) -> None:
        self._script = redis.register_script(source("apply"))
        self._stream_max = stream_max
        self._window_ttl = window_ttl

    async def __call__(self, delivery_id: str, update: StatusUpdate, *, window_key: str | None) -> Applied:
        u = update
        found = await self._script(
            keys=[keys.sends(delivery_id), keys.DELIVERIES, window_key or "", keys.REACTIONS],
            args=[
                u.step,
                u.status,
                u.at_ms,
                u.event,
                u.wamid,
                u.matched_by,
                u.error_code,
                u.error_title,
                u.error_details,
                self._stream_max,
                delivery_id,
                u.wa_id,
                u.user_id,
                self._window_ttl,
            ],
        )
        outcome = _text(found[0])
        assert outcome in ("changed", "kept", "duplicate", "gone")
        return Applied(outcome, _text(found[1]), int(found[2]), int(found[3]) == 1)  # type: ignore[arg-type]


class OpenWindowScript:
    """``open_window.lua``: an inbound message opens the 24-hour window, never older over newer."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(source("open_window"))

    async def __call__(self, who: str, at_ms: int, *, ttl: int) -> bool:
        return int(await self._script(keys=[keys.window(who)], args=[at_ms, ttl])) == 1


class UnsendScript:
    """``unsend.lua``: a step's marks taken back when nothing went out; False when a status proves it did."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(source("unsend"))

    async def __call__(
        self,
        log_id: str,
        delivery_id: str,
        step: str,
        *,
        member: str | None,
        who: str,
        keep_mark: bool,
        wrote_record: bool,
    ) -> bool:
        done = await self._script(
            keys=[keys.sends(log_id), keys.sends(delivery_id), keys.AWAITING, keys.turn(who)],
            args=[step, member or "", f"{delivery_id}|{step}", int(keep_mark), int(wrote_record)],
        )
        return int(done) == 1
