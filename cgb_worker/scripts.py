"""The Redis scripts (``cgb_worker/lua/*.lua``), each read once and called through a small typed wrapper.

State that must change together changes in one script; each file's header says its keys, arguments and
answer. Scripts are sent by hash (``EVALSHA``; redis-py loads one again if the server lost it).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from . import keys, series


@functools.cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``, read from the package once per process."""
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def _queue(pipe: Pipeline, script: Any, names: list[str], args: list[Any]) -> None:
    """An ``EVALSHA`` queued on a pipeline (which loads the script first if the server lacks it)."""
    pipe.scripts.add(script)
    command: Any = pipe.evalsha
    command(script.sha, len(names), *names, *args)


def _counters(now: float) -> list[str]:
    """apply.lua's counter keys at ``now``: the hour's by-minute hash and its totals (:mod:`cgb_worker.series`)."""
    hour = series.hour_of(now)
    return [keys.series_minutes(hour), keys.series_hour(hour)]


def _counter_args(now: float) -> list[Any]:
    return [series.minute_of_hour(now), series.MINUTE_TTL, series.HOUR_TTL]


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
    user_id: str = ""


class ApplyScript:
    """``apply.lua``: a status applied to a step's record, with the stream entry, the window and any reaction."""

    def __init__(self, redis: Redis, *, stream_max: int, window_ttl: int) -> None:
        self._script = redis.register_script(source("apply"))
        self._stream_max = stream_max
        self._window_ttl = window_ttl

    async def __call__(
        self, delivery_id: str, update: StatusUpdate, *, window_key: str | None, now: float | None = None
    ) -> Applied:
        """``now`` picks the counters' buckets (the time it is applied, not WhatsApp's timestamp)."""
        u = update
        now = time.time() if now is None else now
        found = await self._script(
            keys=[keys.sends(delivery_id), keys.DELIVERIES, window_key or "", keys.REACTIONS, *_counters(now)],
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
                u.user_id,
                self._window_ttl,
                *_counter_args(now),
            ],
        )
        outcome = _text(found[0])
        assert outcome in ("changed", "kept", "duplicate", "gone")
        return Applied(outcome, _text(found[1]), int(found[2]), int(found[3]) == 1)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PlaceArgs:
    """One status as ``place.lua`` takes it: what :class:`MatchScript` and :class:`ApplyScript` take, less what
    the match decides (the step, how it was matched, the job)."""

    wamid: str
    who: str | None
    status: str
    at_ms: int
    event: bytes
    refused: bool = False
    error_code: str = ""
    error_title: str = ""
    error_details: str = ""
    user_id: str = ""


@dataclass(frozen=True, slots=True)
class Placement:
    """:class:`PlaceScript`'s answer: the match, and when it placed the status, what applying it did."""

    match: Match
    applied: Applied | None = None


class PlaceScript:
    """``place.lua``: ``match.lua`` then, when the status is placed, ``apply.lua``, as one script; queued on a
    pipeline, one call per status, so a batch of statuses costs one round trip and keeps their order."""

    def __init__(
        self, redis: Redis, *, window_ms: int, skew_ms: int, wamid_ttl: int, stream_max: int, window_ttl: int
    ) -> None:
        text = "".join(f"local function {n}(KEYS, ARGV)\n{source(n)}\nend\n" for n in ("match", "apply"))
        self._script = redis.register_script(text + source("place"))
        self._fixed = (window_ms, skew_ms, wamid_ttl)
        self._stream_max = stream_max
        self._window_ttl = window_ttl

    def queue(self, pipe: Pipeline, a: PlaceArgs, *, now: float | None = None) -> None:
        """Add the call to ``pipe``; its answer is read with :meth:`answer`. ``now`` picks the counters' buckets."""
        window_ms, skew_ms, wamid_ttl = self._fixed
        who = a.who or ""
        names = [
            keys.wamid(a.wamid),
            keys.AWAITING,
            keys.turn(who or "-"),
            keys.wamid_sent_at(a.wamid),
            keys.AWAITING_PLACED,
            keys.DELIVERIES,
            keys.window(who) if who else "",
            keys.REACTIONS,
            *_counters(time.time() if now is None else now),
        ]
        match_args = [who, a.at_ms, window_ms, skew_ms, wamid_ttl, a.status, "1" if a.refused else ""]
        apply_args = [a.status, a.at_ms, a.event, a.wamid, "", a.error_code, a.error_title, a.error_details,
                      self._stream_max, "", a.user_id, self._window_ttl,
                      *_counter_args(time.time() if now is None else now)]  # fmt: skip
        _queue(pipe, self._script, names, [*match_args, keys.sends(""), *apply_args])

    @staticmethod
    def answer(found: list[bytes | str | int]) -> Placement:
        by = _text(found[0])  # type: ignore[arg-type]
        assert by in ("wamid", "recipient", "none", "ambiguous")
        if by in ("none", "ambiguous"):
            return Placement(Match(by, tuple(_text(r) for r in found[1:])))  # type: ignore[arg-type]
        outcome = _text(found[2])  # type: ignore[arg-type]
        assert outcome in ("changed", "kept", "duplicate", "gone")
        applied = Applied(outcome, _text(found[3]), int(found[4]), int(found[5]) == 1)  # type: ignore[arg-type]
        return Placement(Match(by, (_text(found[1]),)), applied)  # type: ignore[arg-type]


class HoldScript:
    """``hold.lua``: a status held until it can be placed, or kept as unmatched (``overflow``) when the held set
    is full; queued on a pipeline."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(source("hold"))

    def queue(
        self, pipe: Pipeline, item: bytes, *, first_try: float, now_ms: int, cap: int, kept: bytes,
        unmatched_max: int, unmatched_min_id: str,
    ) -> None:  # fmt: skip
        """The answer: 1 held, 0 held already, -1 kept as unmatched."""
        names = [keys.ORPHANS, keys.ORPHANS_SINCE, keys.UNMATCHED]
        _queue(pipe, self._script, names, [item, first_try, now_ms, cap, unmatched_max, unmatched_min_id, kept])


class ClaimDeadScript:
    """``claim_dead.lua``: a dead receiver's unfinished inbox entries taken over, and its name removed once it
    holds none."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(source("claim_dead"))

    async def __call__(self, other: str, me: str, *, count: int = 100) -> list[tuple[bytes, dict[bytes, bytes]]]:
        found = await self._script(keys=[keys.INBOX, keys.consumer(other)], args=[keys.INBOX_GROUP, other, me, count])
        out: list[tuple[bytes, dict[bytes, bytes]]] = []
        for entry in found or []:
            if not entry:
                continue
            entry_id, flat = entry[0], entry[1] or []
            out.append((entry_id, dict(zip(flat[::2], flat[1::2], strict=True))))
        return out


class OpenWindowScript:
    """``open_window.lua``: an inbound message opens the 24-hour window, never older over newer."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(source("open_window"))

    async def __call__(self, who: str, at_ms: int, *, ttl: int) -> bool:
        return int(await self._script(keys=[keys.window(who)], args=[at_ms, ttl])) == 1

    def queue(self, pipe: Pipeline, who: str, at_ms: int, *, ttl: int) -> None:
        _queue(pipe, self._script, [keys.window(who)], [at_ms, ttl])


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


class SuppressScript:
    """``suppress.lua``: an opt-out added to a person's suppression entry, or opt-outs lifted
    (:mod:`cgb_worker.suppression`); called, or queued on a pipeline (the receiver's batch)."""

    def __init__(self, redis: Redis, *, lifted_ttl: int) -> None:
        self._script = redis.register_script(source("suppress"))
        self._lifted_ttl = lifted_ttl

    def _args(self, op: str, who: str, at_ms: int, scopes: str, reasons: str, ref: str) -> tuple[list[str], list[Any]]:
        names = [keys.suppressed(who), keys.SUPPRESSED_INDEX]
        return names, [op, who, at_ms, self._lifted_ttl, scopes, reasons, ref]

    async def add(self, who: str, scope: str, reason: str, at_ms: int, *, ref: str = "") -> bool:
        """True when the opt-out was added (False: the scope had one already, opt-outs were lifted later, or
        ``ref``, the asking message's keyed hash, was seen before)."""
        names, args = self._args("add", who, at_ms, scope, reason, ref)
        return int(await self._script(keys=names, args=args)) == 1

    async def lift(
        self, who: str, at_ms: int, *, scopes: str = "all,marketing", reasons: str = "*", ref: str = ""
    ) -> int:
        """How many scopes were lifted."""
        names, args = self._args("lift", who, at_ms, scopes, reasons, ref)
        return int(await self._script(keys=names, args=args))

    def queue_add(self, pipe: Pipeline, who: str, scope: str, reason: str, at_ms: int, *, ref: str = "") -> None:
        _queue(pipe, self._script, *self._args("add", who, at_ms, scope, reason, ref))

    def queue_lift(
        self,
        pipe: Pipeline,
        who: str,
        at_ms: int,
        *,
        scopes: str = "all,marketing",
        reasons: str = "*",
        ref: str = "",
    ) -> None:
        _queue(pipe, self._script, *self._args("lift", who, at_ms, scopes, reasons, ref))


class HeartbeatScript:
    """``heartbeat.lua``: write (or remove) one worker's heartbeat and its entry in the index of workers."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(source("heartbeat"))

    async def write(self, worker_id: str, beat: bytes, *, ttl_ms: int, now_ms: int) -> None:
        await self._script(keys=[keys.worker(worker_id), keys.WORKERS], args=[worker_id, beat, ttl_ms, now_ms])

    async def remove(self, worker_id: str) -> None:
        await self._script(keys=[keys.worker(worker_id), keys.WORKERS], args=[worker_id, "", 0, 0])


class WorkersScript:
    """``workers.lua``: every live heartbeat, with the milliseconds it has left to live."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(source("workers"))

    async def __call__(self) -> list[tuple[bytes, int]]:
        found = await self._script(keys=[keys.WORKERS], args=[keys.worker("")])
        return [(found[i], int(found[i + 1])) for i in range(0, len(found), 2)]


@dataclass(frozen=True, slots=True)
class QueueStats:
    """:class:`QueueStatsScript`'s answer: jobs due (``running`` of them at the head, being run), jobs deferred to
    later, the score (ms) of the oldest due job nobody runs yet (None: there is none), and the enqueue time (ms)
    of the oldest job our rate limit deferred that is still waiting (None: none is)."""

    due: int
    deferred: int
    running: int
    oldest_ms: int | None
    waiting_since_ms: int | None = None


class QueueStatsScript:
    """``queue_stats.lua``: arq's queue, counted in one round trip."""

    def __init__(self, redis: Redis, queue_name: str, in_progress_prefix: str, *, head_limit: int = 10_000) -> None:
        self._script = redis.register_script(source("queue_stats"))
        self._queue, self._prefix, self._limit = queue_name, in_progress_prefix, head_limit

    async def __call__(self, now_ms: int) -> QueueStats:
        due, deferred, running, oldest, waiting = await self._script(
            keys=[self._queue, keys.RATE_WAITING], args=[now_ms, self._prefix, self._limit]
        )
        oldest_ms = int(float(_text(oldest)))
        waiting_ms = int(float(_text(waiting)))
        return QueueStats(
            int(due),
            int(deferred),
            int(running),
            None if oldest_ms < 0 else oldest_ms,
            None if waiting_ms < 0 else waiting_ms,
        )
