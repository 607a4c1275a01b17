"""Quiet hours: the minutes of the recipient's local day in which some messages wait (``QUIET_HOURS``).

The recipient's local time is the wall-clock time, minute by minute, in the time zones ``phonenumbers`` gives
for the number (:func:`phonenumbers.timezone.time_zones_for_number`), read through :mod:`zoneinfo` (the
``tzdata`` package supplies the zones where the system has none, as in slim container images).

* A range ``21:00-08:00`` is quiet from 21:00 up to, not including, 08:00 the next morning; ``13:00-14:00`` is
  a range within one day. A minute is quiet when its local wall-clock time is in the range, so on a day the
  clocks change the quiet period is as long as the clocks say (a jump forward past the end ends it at the jump).
* A number whose country has several zones (``+61 4…`` mobiles: Perth to Lord Howe; ``+7 9…``: Kaliningrad
  to Kamchatka) is quiet when it is quiet in ANY of its zones, and wakes at the first minute when it is quiet
  in none of them.
* When the quiet periods of its zones together cover the whole day (a very long range over a country as
  wide as Russia), there is no such minute: the number then counts as quiet only while it is quiet in ALL of
  its zones, so that its messages still go out, at the hours the fewest of its zones are asleep.
* A number with no known zone (``Etc/Unknown``, a zone ``zoneinfo`` does not have) is never quiet: nothing
  says when its night is.

:func:`wake_time` is pure (the zones and ``now`` are given); :func:`quiet_until` looks the zones up. Both
return None when it is not quiet now, else the UTC time of the first whole minute after the quiet period.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as number_zones

DAY = 24 * 60
MINUTE = timedelta(minutes=1)
HORIZON = timedelta(hours=48)
"""How far ahead a minute quiet in none of a number's zones is looked for: a day and its clock changes fit."""
UNKNOWN_ZONE = "Etc/Unknown"
_RANGE = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A range of local wall-clock minutes, ``start`` included, ``end`` excluded; it wraps past midnight when
    ``end`` is earlier than ``start``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < DAY and 0 <= self.end < DAY) or self.start == self.end:
            raise ValueError("quiet hours need two different minutes of the day")

    def contains(self, minute: int) -> bool:
        """Whether ``minute`` (of the day, from midnight) is quiet."""
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def parse_quiet_hours(text: str) -> QuietHours:
    """``HH:MM-HH:MM`` (hours 0 to 23), as in ``21:00-08:00``; a :class:`ValueError` says what is wrong."""
    match = _RANGE.fullmatch(text.strip().replace(" ", ""))
    if match is None:
        raise ValueError(f"{text[:40]!r} is not a range of local times such as 21:00-08:00.")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"{text.strip()[:40]!r}: hours go from 00 to 23 and minutes from 00 to 59.")
    if (h1, m1) == (h2, m2):
        raise ValueError(f"{text.strip()[:40]!r}: the start and the end are the same minute.")
    return QuietHours(h1 * 60 + m1, h2 * 60 + m2)


@functools.lru_cache(maxsize=8192)
def zones_for(number: str) -> tuple[ZoneInfo, ...]:
    """The time zones ``phonenumbers`` gives for an E.164 number, those ``zoneinfo`` has; () when none is known."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return ()
    zones: list[ZoneInfo] = []
    for name in number_zones.time_zones_for_number(parsed):
        if name == UNKNOWN_ZONE:
            continue
        try:
            zones.append(ZoneInfo(name))
        except (ZoneInfoNotFoundError, ValueError):
            continue
    return tuple(zones)


def quiet_until(number: str, quiet: QuietHours, now: datetime) -> datetime | None:
    """None when ``number`` (E.164) is not in quiet hours at ``now`` (an aware time), else the UTC time of the
    first minute after them (see the module's rules)."""
    return wake_time(zones_for(number), quiet, now)


def wake_time(zones: Sequence[ZoneInfo], quiet: QuietHours, now: datetime) -> datetime | None:
    """None when no zone in ``zones`` is quiet at ``now``, else the first whole UTC minute quiet in none of them
    (or, where no such minute exists, the first one some zone is awake: see the module's rules).

    Exact and cheap: from a minute quiet in some zones, the union of quiet periods lasts at least until the
    latest of those zones' own ends, so it jumps there and looks again; a zone's end is its next local ``end``
    time, found by arithmetic when its UTC offset is the same at both ends, and minute by minute (a day at
    most) across a clock change."""
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    if not zones:
        return None
    start = now.astimezone(UTC).replace(second=0, microsecond=0)
    if not any(_quiet(zone, quiet, start) for zone in zones):
        return None
    t = start
    while t < start + HORIZON:
        asleep = [zone for zone in zones if _quiet(zone, quiet, t)]
        if not asleep:
            return t
        t = max(_end(zone, quiet, t) for zone in asleep)
    # Every minute is quiet in some zone: quiet only while quiet in all of them.
    if all(_quiet(zone, quiet, start) for zone in zones):
        return min(_end(zone, quiet, start) for zone in zones)
    return None


def _quiet(zone: ZoneInfo, quiet: QuietHours, at: datetime) -> bool:
    local = at.astimezone(zone)
    return quiet.contains(local.hour * 60 + local.minute)


def _end(zone: ZoneInfo, quiet: QuietHours, at: datetime) -> datetime:
    """The first minute after ``at`` (a whole UTC minute quiet in ``zone``) that is not quiet in ``zone``."""
    local = at.astimezone(zone)
    ahead = (quiet.end - (local.hour * 60 + local.minute)) % DAY
    candidate = at + timedelta(minutes=ahead)
    if candidate.astimezone(zone).utcoffset() == local.utcoffset():
        return candidate
    t = at + MINUTE  # the clocks change on the way: walk it
    while _quiet(zone, quiet, t):
        t += MINUTE
    return t
