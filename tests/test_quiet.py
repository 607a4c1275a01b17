"""Quiet hours (:mod:`cgb_worker.quiet`): real time zones from phonenumbers and zoneinfo, ``now`` given or real.

The tests that use the real time pick their ranges around the recipient zone's local time now, so they hold at
any hour of the day; each wake time is also checked against a minute-by-minute walk (:func:`walk`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from cgb_worker.quiet import DAY, MINUTE, QuietHours, parse_quiet_hours, quiet_until, wake_time, zones_for

IL = "+972500000001"  # Asia/Jerusalem
US = "+12025550100"  # America/New_York
AU = "+61412345678"  # an Australian mobile: eight zones, Cocos (UTC+6:30) to Lord Howe (UTC+10:30/+11)
RU = "+79161234567"  # a Russian mobile: sixteen zones, UTC+2/+3 to UTC+12


def minute_of(at: datetime, zone: ZoneInfo) -> int:
    local = at.astimezone(zone)
    return local.hour * 60 + local.minute


def around(minute: int, before: int, after: int) -> QuietHours:
    """The range from ``before`` minutes before ``minute`` of the day to ``after`` minutes after it."""
    return QuietHours((minute - before) % DAY, (minute + after) % DAY)


def walk(zones: Sequence[ZoneInfo], quiet: QuietHours, now: datetime) -> datetime | None:
    """The definition, minute by minute: the first whole minute quiet in none of the zones."""
    t = now.astimezone(UTC).replace(second=0, microsecond=0)

    def asleep(at: datetime) -> bool:
        return any(quiet.contains(minute_of(at, zone)) for zone in zones)

    if not asleep(t):
        return None
    for _ in range(2 * DAY):
        t += MINUTE
        if not asleep(t):
            return t
    raise AssertionError("quiet for two days")


def test_the_number_zones_are_phonenumbers_own() -> None:
    assert [z.key for z in zones_for(IL)] == ["Asia/Jerusalem"]
    assert [z.key for z in zones_for(US)] == ["America/New_York"]
    assert {"Australia/Perth", "Australia/Sydney", "Australia/Lord_Howe", "Indian/Cocos"} <= {
        z.key for z in zones_for(AU)
    }
    assert len(zones_for(RU)) > 10


def test_quiet_now_in_a_real_zone_wakes_at_the_ranges_end() -> None:
    now = datetime.now(UTC)
    zone = ZoneInfo("Asia/Jerusalem")
    local = minute_of(now, zone)
    quiet = around(local, 60, 120)  # contains the local time now, whatever the hour
    wake = quiet_until(IL, quiet, now)
    assert wake is not None
    assert wake == walk([zone], quiet, now)
    assert wake.tzinfo == UTC
    assert (wake.second, wake.microsecond) == (0, 0)
    clocks_changed = wake.astimezone(zone).utcoffset() != now.astimezone(zone).utcoffset()
    assert minute_of(wake, zone) == quiet.end or clocks_changed  # the first minute of local time past the range
    minute = now.replace(second=0, microsecond=0)
    # Two hours from the minute now (one more or less only when the clocks change on the way).
    assert wake - minute in (timedelta(minutes=60), timedelta(minutes=120), timedelta(minutes=180))


def test_not_quiet_outside_the_range_in_a_real_zone() -> None:
    now = datetime.now(UTC)
    local = minute_of(now, ZoneInfo("America/New_York"))
    assert quiet_until(US, around(local, -30, 120), now) is None  # begins in half an hour
    assert quiet_until(US, around(local, 120, -30), now) is None  # ended half an hour ago
    assert quiet_until(US, around(local, 180, 0), now) is None  # ends this very minute: the end is not quiet
    starts_now = quiet_until(US, around(local, 0, 1), now)
    assert starts_now == now.replace(second=0, microsecond=0) + MINUTE  # the start is quiet: one minute of it


def test_a_range_past_midnight() -> None:
    quiet = parse_quiet_hours("21:00-08:00")
    zone = ZoneInfo("Asia/Jerusalem")  # UTC+2 in January
    evening = datetime(2026, 1, 15, 20, 30, tzinfo=UTC)  # 22:30 local
    assert wake_time([zone], quiet, evening) == datetime(2026, 1, 16, 6, 0, tzinfo=UTC)
    assert wake_time([zone], quiet, datetime(2026, 1, 16, 5, 59, 59, tzinfo=UTC)) == datetime(
        2026, 1, 16, 6, 0, tzinfo=UTC
    )
    assert wake_time([zone], quiet, datetime(2026, 1, 16, 6, 0, tzinfo=UTC)) is None  # 08:00: awake
    assert wake_time([zone], quiet, datetime(2026, 1, 15, 18, 59, tzinfo=UTC)) is None  # 20:59
    assert wake_time([zone], quiet, datetime(2026, 1, 15, 19, 0, tzinfo=UTC)) == datetime(2026, 1, 16, 6, 0, tzinfo=UTC)
    # ``now`` in any offset is the same instant.
    assert wake_time([zone], quiet, evening.astimezone(ZoneInfo("Asia/Tokyo"))) == datetime(
        2026, 1, 16, 6, 0, tzinfo=UTC
    )


def test_a_range_within_one_day() -> None:
    quiet = parse_quiet_hours("13:00-14:00")
    zone = ZoneInfo("America/New_York")  # UTC-4 in July
    assert wake_time([zone], quiet, datetime(2026, 7, 1, 17, 20, tzinfo=UTC)) == datetime(2026, 7, 1, 18, 0, tzinfo=UTC)
    assert wake_time([zone], quiet, datetime(2026, 7, 1, 18, 0, tzinfo=UTC)) is None
    assert wake_time([zone], quiet, datetime(2026, 7, 1, 3, 0, tzinfo=UTC)) is None  # 23:00 local


def test_several_zones_quiet_in_one_only_now() -> None:
    """Perth alone is in the range now (the number's other zones are 45 minutes or more away): the number is
    quiet, and wakes when Perth's range ends, the minute it is quiet in none of them."""
    now = datetime.now(UTC)
    perth = ZoneInfo("Australia/Perth")
    zones = zones_for(AU)
    quiet = around(minute_of(now, perth), 10, 10)
    assert [z.key for z in zones if quiet.contains(minute_of(now, z))] == ["Australia/Perth"]
    assert quiet_until("+61291234567", quiet, now) is None  # a Sydney landline: Sydney alone, not quiet
    wake = quiet_until(AU, quiet, now)
    assert wake == now.replace(second=0, microsecond=0) + timedelta(minutes=10)
    assert wake == walk(zones, quiet, now)


def test_several_zones_wake_when_the_last_one_does() -> None:
    """21:00-08:00 across Australia in June (no daylight saving in the west): the east is asleep first, and
    the number wakes when Cocos (UTC+6:30), the westernmost, reaches 08:00."""
    quiet = parse_quiet_hours("21:00-08:00")
    now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)  # 22:00 in Sydney, 20:00 in Perth, 18:30 on Cocos
    zones = zones_for(AU)
    assert wake_time(zones, quiet, now) == datetime(2026, 6, 2, 1, 30, tzinfo=UTC) == walk(zones, quiet, now)
    # Russia, from Kaliningrad-like UTC+3 in summer to Kamchatka's UTC+12: awake everywhere from 05:00 UTC.
    ru = zones_for(RU)
    assert wake_time(ru, quiet, datetime(2026, 6, 1, 20, 0, tzinfo=UTC)) == datetime(2026, 6, 2, 5, 0, tzinfo=UTC)
    assert walk(ru, quiet, datetime(2026, 6, 1, 20, 0, tzinfo=UTC)) == datetime(2026, 6, 2, 5, 0, tzinfo=UTC)
    # A chain: each zone enters the range as the one before leaves it.
    short = parse_quiet_hours("12:00-13:00")
    chained = [ZoneInfo("Etc/GMT-2"), ZoneInfo("Etc/GMT-1"), ZoneInfo("UTC")]  # UTC+2, UTC+1, UTC
    assert wake_time(chained, short, datetime(2026, 6, 1, 10, 30, tzinfo=UTC)) == datetime(
        2026, 6, 1, 13, 0, tzinfo=UTC
    )


def test_the_clocks_jumping_past_the_end_end_the_quiet_hours() -> None:
    """Sydney, 5 October 2025: 02:00 becomes 03:00. Quiet 01:30-02:30 ends at the jump, 16:00 UTC, not at
    an 02:30 that never came (which an offset taken before the jump would put at 16:30)."""
    sydney = ZoneInfo("Australia/Sydney")
    quiet = parse_quiet_hours("01:30-02:30")
    now = datetime(2025, 10, 4, 15, 45, tzinfo=UTC)  # 01:45 local, UTC+10
    assert wake_time([sydney], quiet, now) == datetime(2025, 10, 4, 16, 0, tzinfo=UTC) == walk([sydney], quiet, now)
    # And 21:00-08:00 over the same night: it ends at 08:00 summer time, 21:00 UTC.
    night = parse_quiet_hours("21:00-08:00")
    assert wake_time([sydney], night, now) == datetime(2025, 10, 4, 21, 0, tzinfo=UTC)
    # New York, 1 November 2026: 02:00 summer time becomes 01:00; quiet 01:30-03:00 holds from 01:30 EDT to
    # 01:00 EST (06:00 UTC), then again from 01:30 EST.
    ny = ZoneInfo("America/New_York")
    fall = parse_quiet_hours("01:30-03:00")
    at = datetime(2026, 11, 1, 5, 40, tzinfo=UTC)  # 01:40 EDT
    assert wake_time([ny], fall, at) == datetime(2026, 11, 1, 6, 0, tzinfo=UTC) == walk([ny], fall, at)


def test_zones_asleep_around_the_clock_count_as_quiet_only_in_all() -> None:
    """12:00-08:00 over Russia's sixteen zones leaves no minute quiet in none: quiet then means quiet in all,
    so the message still goes out."""
    quiet = parse_quiet_hours("12:00-08:00")
    zones = zones_for(RU)
    at = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)  # 15:00 in Moscow, midnight in Kamchatka: all in the range
    wake = wake_time(zones, quiet, at)
    assert wake == datetime(2026, 6, 1, 20, 0, tzinfo=UTC)  # 08:00 in Kamchatka (UTC+12)
    assert wake_time(zones, quiet, wake) is None  # Kamchatka awake: sent


def test_unknown_zones_are_never_quiet() -> None:
    everything = QuietHours(0, DAY - 1)
    assert zones_for("+80012345678") == ()  # international freephone: Etc/Unknown
    assert quiet_until("+80012345678", everything, datetime.now(UTC)) is None
    assert zones_for("not a number") == ()
    assert wake_time([], everything, datetime.now(UTC)) is None


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        quiet_until(IL, QuietHours(0, 60), datetime(2026, 1, 1, 0, 30))  # naive: the point of the test


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [("21:00-08:00", 1260, 480), ("13:00-14:00", 780, 840), (" 9:30 - 17:05 ", 570, 1025), ("00:00-23:59", 0, 1439)],
)
def test_ranges_parse(text: str, start: int, end: int) -> None:
    quiet = parse_quiet_hours(text)
    assert (quiet.start, quiet.end) == (start, end)
    assert str(parse_quiet_hours(str(quiet))) == str(quiet)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("25:00-08:00", "hours go from 00 to 23"),
        ("21:60-08:00", "minutes from 00 to 59"),
        ("21:00", "is not a range"),
        ("21:00-21:00", "the same minute"),
        ("late evening", "is not a range"),
        ("21-08", "is not a range"),
        ("", "is not a range"),
    ],
)
def test_bad_ranges(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_quiet_hours(text)
