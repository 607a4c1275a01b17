"""Each Redis script on its own, against a real Redis, through its typed wrapper."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cgb_worker import keys
from cgb_worker.scripts import ApplyScript, MatchScript, OpenWindowScript, StatusUpdate, UnsendScript
from cgb_worker.sends import StepRecord

A = "+972500000001"
B = "+12025550100"
T0 = 1_764_650_000_000  # ms
WINDOW = 600_000
SKEW = 2_000


async def _put(redis: Any, *records: StepRecord) -> None:
    for r in records:
        await redis.hset(keys.sends(r.delivery_id), mapping={**r.fields(), r.step: "sent"})
        await redis.zadd(keys.AWAITING, {r.member: 0})


def _match(redis: Any) -> Any:
    script = MatchScript(redis)

    async def call(wamid: str, phone: str | None, at: int, status: str = "sent", *, refused: bool = False) -> Any:
        who = keys.who(phone) if phone else None
        return await script(
            wamid, who, at, status=status, refused=refused, window_ms=WINDOW, skew_ms=SKEW, wamid_ttl=60
        )

    return call


# -- match.lua ----------------------------------------------------------------------------------------------


async def test_match_places_the_one_open_send_and_frees_its_turn(redis_client: Any) -> None:
    mine = StepRecord("job-1", "text", A, T0, True, open_ms=15_000, skew_ms=SKEW)
    other = StepRecord("job-2", "text", B, T0, True, open_ms=15_000, skew_ms=SKEW)
    await _put(redis_client, mine, other)
    await redis_client.set(keys.turn(keys.who(A)), mine.ref)
    found = await _match(redis_client)("wamid.1", A, T0 + 1000)
    assert (found.by, found.ref) == ("recipient", "job-1|text")
    assert await redis_client.get(keys.wamid("wamid.1")) == b"job-1|text"
    assert await redis_client.zrange(keys.AWAITING, 0, -1) == [other.member.encode()]  # type: ignore[union-attr]
    assert not await redis_client.exists(keys.turn(keys.who(A)))
    again = await _match(redis_client)("wamid.1", A, T0 + 9000)
    assert (again.by, again.ref) == ("wamid", "job-1|text")


async def test_match_leaves_another_sends_turn_alone(redis_client: Any) -> None:
    mine = StepRecord("job-1", "text", A, T0, True, open_ms=15_000)
    await _put(redis_client, mine)
    await redis_client.set(keys.turn(keys.who(A)), "job-9|text")
    assert (await _match(redis_client)("wamid.1", A, T0)).by == "recipient"
    assert await redis_client.get(keys.turn(keys.who(A))) == b"job-9|text"


@pytest.mark.parametrize(
    ("case", "at"),
    [
        ("before the request, past the skew", T0 - SKEW - 1000),
        ("after the match window and the skew", T0 + WINDOW + SKEW + 1000),
    ],
)
async def test_match_finds_none_outside_the_time_bounds(redis_client: Any, case: str, at: int) -> None:
    await _put(redis_client, StepRecord("job-1", "text", A, T0, True))
    found = await _match(redis_client)("wamid.1", A, at)
    assert found.by == "none"
    assert await redis_client.zcard(keys.AWAITING) == 1
    assert not await redis_client.exists(keys.wamid("wamid.1"))


async def test_match_finds_none_for_an_unknown_recipient(redis_client: Any) -> None:
    await _put(redis_client, StepRecord("job-1", "text", A, T0, True))
    assert (await _match(redis_client)("wamid.1", None, T0)).by == "none"
    assert (await _match(redis_client)("wamid.1", B, T0)).by == "none"


async def test_two_open_sends_to_one_person_are_ambiguous_until_time_tells_them_apart(redis_client: Any) -> None:
    first = StepRecord("job-1", "text", A, T0, True)
    second = StepRecord("job-2", "text", A, T0 + 20_000, True)
    await _put(redis_client, first, second)
    late = await _match(redis_client)("wamid.2", A, T0 + 21_000)
    assert (late.by, sorted(late.refs)) == ("ambiguous", ["job-1|text", "job-2|text"])
    assert await redis_client.zcard(keys.AWAITING) == 2  # nothing taken
    early = await _match(redis_client)("wamid.1", A, T0 + 1000)  # before the second request left: the first's
    assert (early.by, early.ref) == ("recipient", "job-1|text")
    now_alone = await _match(redis_client)("wamid.2", A, T0 + 21_000)
    assert (now_alone.by, now_alone.ref) == ("recipient", "job-2|text")


async def test_a_resent_step_is_one_candidate_with_two_messages(redis_client: Any) -> None:
    """A step sent again after an unknown outcome has two messages: each wamid closes one, and the turn is freed
    only once both are placed (found by the attack on the first version, which closed both with one wamid)."""
    first = StepRecord("job-1", "text", A, T0, True)
    again = StepRecord("job-1", "text", A, T0 + 3000, True)
    await _put(redis_client, first, again)
    await redis_client.set(keys.turn(keys.who(A)), first.ref)
    found = await _match(redis_client)("wamid.2", A, T0 + 4000)
    assert (found.by, found.ref) == ("recipient", "job-1|text")
    # which copy that was is not known: both stay candidates (found by the third attack: closing one copy left
    # the other message's window at the wrong copy's time), and the turn stays taken
    assert await redis_client.zcard(keys.AWAITING) == 2
    assert await redis_client.hget(keys.AWAITING_PLACED, "job-1|text") == b"1"
    assert await redis_client.exists(keys.turn(keys.who(A)))
    # the next job's send, later, is not the other message's candidate while the step has one open
    nxt = StepRecord("job-2", "text", A, T0 + 20_000, True)
    await _put(redis_client, nxt)
    other = await _match(redis_client)("wamid.1", A, T0 + 1000)
    assert (other.by, other.ref) == ("recipient", "job-1|text")
    assert not await redis_client.exists(keys.turn(keys.who(A)))
    assert await redis_client.zrange(keys.AWAITING, 0, -1) == [nxt.member.encode()]  # type: ignore[union-attr]
    assert not await redis_client.exists(keys.AWAITING_PLACED)


async def test_copies_far_apart_keep_the_step_a_candidate_for_either_message(redis_client: Any) -> None:
    """The third attack's case: copies 700 s apart; one wamid placed by a ``delivered``; the other message's
    ``sent``, stamped 24 s after the later copy, came out on the next job. Now it can only be ambiguous."""
    t2 = T0 + 700_000
    await _put(redis_client, StepRecord("job-y", "text", A, T0, True), StepRecord("job-y", "text", A, t2, True))
    assert (await _match(redis_client)("wamid.m1", A, t2 + 1000, "delivered")).ref == "job-y|text"
    await _put(redis_client, StepRecord("job-n", "text", A, t2 + 26_000, True))
    m2 = await _match(redis_client)("wamid.m2", A, t2 + 24_000, "sent")
    assert (m2.by, sorted(m2.refs)) == ("ambiguous", ["job-n|text", "job-y|text"])


async def test_a_copy_that_sent_nothing_does_not_take_a_later_131047(redis_client: Any) -> None:
    """The third attack's case: a copy that never went out stays open; a 131047 ``failed`` (which comes without
    ``sent``) to a later message must still find that message alone, or its fallback is lost."""
    await _put(redis_client, StepRecord("job-o", "text", A, T0, True), StepRecord("job-o", "text", A, T0 + 8000, True))
    assert (await _match(redis_client)("wamid.o", A, T0 + 9000, "sent")).ref == "job-o|text"
    later = T0 + 3 * 3600_000
    await _put(redis_client, StepRecord("job-m", "text", A, later, True))
    failed = await _match(redis_client)("wamid.m", A, later + 500, "failed", refused=True)  # 131047
    assert (failed.by, failed.ref) == ("recipient", "job-m|text")


async def test_a_foreign_messages_later_statuses_follow_its_unplaced_sent(redis_client: Any) -> None:
    """The third attack's case: an agent's message to a person we sent a flow the day before; its ``sent`` is no
    send of ours, and its ``delivered`` must not be placed on the flow (which stays open to late statuses)."""
    flow = StepRecord("job-f", "flow", A, T0, True, open_ms=15_000, skew_ms=SKEW)
    await _put(redis_client, flow)
    assert (await _match(redis_client)("wamid.f", A, T0 + 1000, "sent")).ref == "job-f|flow"
    day = T0 + 86_400_000
    assert (await _match(redis_client)("wamid.agent", A, day, "sent")).by == "none"
    assert (await _match(redis_client)("wamid.agent", A, day + 5000, "delivered")).by == "none"
    # while a delivered of a message whose sent was never seen may still be the flow's
    assert (await _match(redis_client)("wamid.f2", A, day + 5000, "delivered")).ref == "job-f|flow"


async def test_a_flow_takes_several_wamids_until_its_time_is_over(redis_client: Any) -> None:
    flow = StepRecord("job-1", "flow", A, T0, True, open_ms=15_000, skew_ms=SKEW)
    await _put(redis_client, flow)
    await redis_client.set(keys.turn(keys.who(A)), flow.ref)
    for n, at in enumerate([T0 + 500, T0 + 900, T0 + 15_000 + SKEW - 1]):
        found = await _match(redis_client)(f"wamid.{n}", A, at)
        assert (found.by, found.ref) == ("recipient", "job-1|flow")
    assert await redis_client.zcard(keys.AWAITING) == 1  # still open
    assert await redis_client.exists(keys.turn(keys.who(A)))  # a flow keeps its turn until it runs out
    assert (await _match(redis_client)("wamid.9", A, T0 + 15_000 + SKEW)).by == "none"
    # the next send, once the flow's turn (open + twice the skew) ran out, is alone for its own statuses
    nxt = StepRecord("job-2", "text", A, T0 + flow.turn_ms, True, open_ms=15_000)
    await _put(redis_client, nxt)
    found = await _match(redis_client)("wamid.10", A, nxt.request_ms - SKEW)
    assert (found.by, found.ref) == ("recipient", "job-2|text")


async def test_a_late_delivered_is_never_given_to_the_next_message(redis_client: Any) -> None:
    """Found by the second attack: a ``delivered`` stamped hours after its request (a phone off) fell outside the
    match window of its own message, whose ``sent`` had not come, and went to the person's next message. Only
    ``sent`` is stamped soon after the request; every other status may belong to any older open send."""
    old = StepRecord("job-1", "text", A, T0, True)
    new = StepRecord("job-2", "text", A, T0 + WINDOW + 60_000, True)
    await _put(redis_client, old, new)
    late = await _match(redis_client)("wamid.1", A, new.request_ms + 1000, "delivered")
    assert (late.by, sorted(late.refs)) == ("ambiguous", ["job-1|text", "job-2|text"])
    own = await _match(redis_client)("wamid.2", A, new.request_ms + 500, "sent")  # the old one is out of its window
    assert (own.by, own.ref) == ("recipient", "job-2|text")
    late = await _match(redis_client)("wamid.1", A, new.request_ms + 1000, "delivered")
    assert (late.by, late.ref) == ("recipient", "job-1|text")


async def test_metas_whole_seconds_do_not_eat_the_clock_skew(redis_client: Any) -> None:
    """Found by the second attack: Meta stamps the second a status happened in, so a worker clock ahead by less
    than the skew could still put a status before its own message's request."""
    ahead = 1900  # the worker's clock, ahead of Meta's by less than the skew
    mine = StepRecord("job-1", "text", A, T0 + 900, True)
    await _put(redis_client, mine)
    stamped = (mine.request_ms - ahead) // 1000 * 1000
    found = await _match(redis_client)("wamid.1", A, stamped)
    assert (found.by, found.ref) == ("recipient", "job-1|text")


async def test_a_flows_late_delivered_may_be_the_flows_so_it_is_not_given_to_the_next_message(
    redis_client: Any,
) -> None:
    flow = StepRecord("job-1", "flow", A, T0, True, open_ms=15_000, skew_ms=SKEW)
    nxt = StepRecord("job-2", "text", A, T0 + flow.turn_ms, True)
    await _put(redis_client, flow, nxt)
    late = await _match(redis_client)("wamid.9", A, nxt.request_ms + 5000, "read")
    assert (late.by, sorted(late.refs)) == ("ambiguous", ["job-1|flow", "job-2|text"])
    own = await _match(redis_client)("wamid.10", A, nxt.request_ms // 1000 * 1000, "sent")
    assert (own.by, own.ref) == ("recipient", "job-2|text")


async def test_a_sent_at_the_end_of_the_window_with_metas_clock_ahead_is_still_its_own(redis_client: Any) -> None:
    """The fourth attack's case: the window's far side allowed no skew, so with Meta 1.9 s ahead a ``sent`` stamped
    near the end of the window missed its own message and two messages swapped."""
    await _put(
        redis_client, StepRecord("job-m", "text", A, T0, True), StepRecord("job-n", "text", A, T0 + 590_000, True)
    )
    assert (await _match(redis_client)("wamid.N", A, T0 + 591_000)).by == "ambiguous"
    m = await _match(redis_client)("wamid.M", A, T0 + 601_000)
    assert m.by == "ambiguous"  # both could have: held, never swapped
    n = await _match(redis_client)("wamid.N", A, T0 + 591_000)
    assert n.by == "ambiguous"


async def test_a_failed_is_judged_by_its_sent_when_that_was_seen(redis_client: Any) -> None:
    """The fourth attack's case: a ``failed`` long after its ``sent`` (an expiry) was searched for only near its own
    stamp, and landed on the person's message open then."""
    await _put(
        redis_client, StepRecord("job-m", "text", A, T0, True), StepRecord("job-n", "text", A, T0 + 16_000, True)
    )
    assert (await _match(redis_client)("wamid.M", A, T0 + 17_000)).by == "ambiguous"  # its sent, held
    await _put(redis_client, StepRecord("job-p", "text", A, T0 + 3_600_000, True))
    late = await _match(redis_client)("wamid.M", A, T0 + 3_601_000, "failed")
    assert (late.by, sorted(late.refs)) == ("ambiguous", ["job-m|text", "job-n|text"])


async def test_a_failed_that_does_not_refuse_the_send_is_not_bounded_by_the_window(redis_client: Any) -> None:
    script = MatchScript(redis_client)
    await _put(redis_client, StepRecord("job-m", "text", A, T0, True))
    await _put(redis_client, StepRecord("job-n", "text", A, T0 + 3_600_000, True))
    late = T0 + 3_601_000
    who = keys.who(A)
    expired = await script("wamid.M", who, late, status="failed", window_ms=WINDOW, skew_ms=SKEW, wamid_ttl=60)
    assert expired.by == "ambiguous"  # it may be the older message's: held
    assert not await redis_client.exists(keys.wamid_sent_at("wamid.M"))  # and its time teaches nothing
    refused = await script(
        "wamid.N", who, late, status="failed", refused=True, window_ms=WINDOW, skew_ms=SKEW, wamid_ttl=60
    )
    assert (refused.by, refused.ref) == ("recipient", "job-n|text")  # a 131047 is stamped as the send is refused


async def test_more_than_fifty_open_sends_are_ambiguous(redis_client: Any) -> None:
    await _put(redis_client, *[StepRecord(f"job-{i}", "flow", A, T0 + i, True, open_ms=60_000) for i in range(51)])
    assert (await _match(redis_client)("wamid.1", A, T0 + 100)).by == "ambiguous"


# -- apply.lua ----------------------------------------------------------------------------------------------


def _update(status: str, wamid: str = "wamid.1", code: str = "", at: int = T0 + 1000) -> StatusUpdate:
    event = json.dumps({"status": status, "at": "x", "received": "x", "wamid": wamid}).encode()
    return StatusUpdate(step="text", status=status, at_ms=at, event=event, wamid=wamid, matched_by="recipient",
                        error_code=code, error_title="t" if code else "")  # fmt: skip


async def test_apply_moves_forward_only_and_streams_each_change_once(redis_client: Any) -> None:
    apply = ApplyScript(redis_client, stream_max=1000, window_ttl=60)
    await _put(redis_client, StepRecord("job-1", "text", A, T0, True))
    outcomes = [(await apply("job-1", _update(s), window_key=None)).outcome for s in ("read", "sent", "read")]
    assert outcomes == ["changed", "kept", "duplicate"]
    record = json.loads(await redis_client.hget(keys.sends("job-1"), "d:text"))
    assert (record["status"], record["wamid"], record["match"]) == ("read", "wamid.1", "recipient")
    assert [f[b"status"] for _i, f in await redis_client.xrange(keys.DELIVERIES)] == [b"read"]
    assert len((await redis_client.hget(keys.sends("job-1"), "e:text")).splitlines()) == 2


async def test_apply_counts_each_stage_once_per_message_whatever_the_order(redis_client: Any) -> None:
    from cgb_worker import series

    apply = ApplyScript(redis_client, stream_max=1000, window_ttl=60)
    await _put(redis_client, StepRecord("job-1", "text", A, T0, True), StepRecord("job-2", "text", B, T0, True))
    now = 1_800_000_000.0
    # job-1: delivered before sent (out of order), then read, a redelivered read, played, and a late failure
    # on a second device; job-2: failed twice (two wamids), then an 'unconfirmed' sweep that is no stage
    for status, wamid in [("delivered", "w1"), ("sent", "w1"), ("read", "w1"), ("read", "w1"), ("played", "w1")]:
        await apply("job-1", _update(status, wamid), window_key=None, now=now)
    await apply("job-1", _update("failed", "w1b", code="131026"), window_key=None, now=now)
    await apply("job-2", _update("failed", "w2", code="131049"), window_key=None, now=now)
    await apply("job-2", _update("failed", "w2b", code="131049"), window_key=None, now=now)
    hour = series.hour_of(now)
    # job-1's late failure is not counted: the message was delivered (failed ranks below delivered)
    want = {"sent": 1, "delivered": 1, "read": 1, "failed": 1, "code:131049": 1}
    mm = series.minute_field(now, "")
    by_minute = await redis_client.hgetall(keys.series_minutes(hour))
    assert by_minute == {f"{mm}{k}".encode(): str(v).encode() for k, v in want.items()}
    assert await redis_client.hgetall(keys.series_hour(hour)) == {k.encode(): str(v).encode() for k, v in want.items()}
    assert 0 < await redis_client.ttl(keys.series_minutes(hour)) <= series.MINUTE_TTL
    assert series.MINUTE_TTL < await redis_client.ttl(keys.series_hour(hour)) <= series.HOUR_TTL
    later = now + 3600  # another hour's: nothing more is counted for a message already counted
    await apply("job-1", _update("delivered", "w1c"), window_key=None, now=later)
    later_hour = series.hour_of(later)
    assert not await redis_client.exists(keys.series_minutes(later_hour), keys.series_hour(later_hour))


async def test_apply_in_place_counts_too(redis_client: Any) -> None:
    from cgb_worker import series
    from cgb_worker.scripts import PlaceArgs, PlaceScript

    script = PlaceScript(redis_client, window_ms=WINDOW, skew_ms=SKEW, wamid_ttl=60, stream_max=1000, window_ttl=60)
    await _put(redis_client, StepRecord("job-1", "text", A, T0, True))
    now = 1_800_000_000.0
    async with redis_client.pipeline(transaction=False) as pipe:
        script.queue(pipe, PlaceArgs("wamid.P", keys.who(A), "read", T0 + 500, b"{}"), now=now)
        (found,) = await pipe.execute()
    assert PlaceScript.answer(found).applied is not None
    totals = await redis_client.hgetall(keys.series_hour(series.hour_of(now)))
    assert totals == {b"sent": b"1", b"delivered": b"1", b"read": b"1"}


async def test_unconfirmed_is_no_event_once_a_status_came(redis_client: Any) -> None:
    apply = ApplyScript(redis_client, stream_max=1000, window_ttl=60)
    await _put(redis_client, StepRecord("job-1", "flow", A, T0, True), StepRecord("job-2", "text", B, T0, True))
    flow = StatusUpdate(step="flow", status="read", at_ms=T0, event=b"{}", wamid="wamid.1")
    assert (await apply("job-1", flow, window_key=None)).outcome == "changed"
    swept = StatusUpdate(step="flow", status="unconfirmed", at_ms=T0 + 90_000_000, event=b'{"status":"unconfirmed"}')
    assert (await apply("job-1", swept, window_key=None)).outcome == "kept"
    assert (await redis_client.hget(keys.sends("job-1"), "e:flow")).count(b"\n") == 1
    quiet = StatusUpdate(step="text", status="unconfirmed", at_ms=T0 + 90_000_000, event=b'{"status":"unconfirmed"}')
    assert (await apply("job-2", quiet, window_key=None)).outcome == "changed"


async def test_apply_to_an_expired_record_is_gone_and_writes_nothing(redis_client: Any) -> None:
    apply = ApplyScript(redis_client, stream_max=1000, window_ttl=60)
    assert (await apply("job-1", _update("sent"), window_key=None)).outcome == "gone"
    assert not await redis_client.exists(keys.sends("job-1"), keys.DELIVERIES)


async def test_a_131047_shuts_the_window_and_appends_one_reaction(redis_client: Any) -> None:
    apply = ApplyScript(redis_client, stream_max=1000, window_ttl=60)
    record = StepRecord("job-1", "text", A, T0, True, fallback={"to": A, "whatsappTemplate": {"name": "x"}})
    await _put(redis_client, record)
    window = keys.window(keys.who(A))
    first = await apply("job-1", _update("failed", code="131047"), window_key=window)
    assert (first.outcome, first.reacted) == ("changed", True)
    again = await apply("job-1", _update("failed", wamid="wamid.2", code="131047"), window_key=window)
    assert (again.outcome, again.reacted) == ("kept", False)
    assert await redis_client.get(window) == f"c:{T0 + 1000}".encode()
    [(_id, fields)] = await redis_client.xrange(keys.REACTIONS)
    at = str(T0 + 1000).encode()  # Meta's stamp, which a 131050 is judged by
    assert fields == {b"kind": b"failed", b"job": b"job-1", b"step": b"text", b"code": b"131047", b"at": at}


@pytest.mark.parametrize("code", ["131056", "131026", "999999", ""])
async def test_every_failure_appends_one_reaction_with_its_code(redis_client: Any, code: str) -> None:
    """Tried: a code the table acts on, one it does not know, and a failed status with no code at all."""
    apply = ApplyScript(redis_client, stream_max=1000, window_ttl=60)
    await _put(redis_client, StepRecord("job-1", "text", A, T0, True))
    window = keys.window(keys.who(A))
    assert (await apply("job-1", _update("failed", code=code), window_key=window)).reacted
    assert not (await apply("job-1", _update("failed", code=code), window_key=window)).reacted  # a redelivery
    assert not await redis_client.exists(window)  # only 131047 says anything of the window
    [(_id, fields)] = await redis_client.xrange(keys.REACTIONS)
    assert fields == {
        b"kind": b"failed",
        b"job": b"job-1",
        b"step": b"text",
        b"code": code.encode(),
        b"at": str(T0 + 1000).encode(),
    }


async def test_a_failure_after_delivered_appends_no_reaction(redis_client: Any) -> None:
    """With several devices, delivered on one outranks failed on another: nothing to react to."""
    apply = ApplyScript(redis_client, stream_max=1000, window_ttl=60)
    await _put(redis_client, StepRecord("job-1", "text", A, T0, True))
    await apply("job-1", _update("delivered"), window_key=None)
    assert not (await apply("job-1", _update("failed", code="131056"), window_key=None)).reacted
    assert await redis_client.xlen(keys.REACTIONS) == 0


async def test_a_flow_step_keeps_every_wamid(redis_client: Any) -> None:
    apply = ApplyScript(redis_client, stream_max=1000, window_ttl=60)
    await _put(redis_client, StepRecord("job-1", "text", A, T0, True))
    for wamid in ("wamid.1", "wamid.2", "wamid.2"):
        await apply("job-1", _update("sent", wamid=wamid), window_key=None)
    record = json.loads(await redis_client.hget(keys.sends("job-1"), "d:text"))
    assert (record["wamid"], record["more"]) == ("wamid.1", ["wamid.2"])


# -- open_window.lua ----------------------------------------------------------------------------------------


async def test_open_window_never_goes_back_in_time(redis_client: Any) -> None:
    script = OpenWindowScript(redis_client)
    who = keys.who(A)
    assert await script(who, T0, ttl=60)
    assert not await script(who, T0 - 1, ttl=60)
    await redis_client.set(keys.window(who), f"c:{T0 + 10}")
    assert not await script(who, T0 + 5, ttl=60)
    assert await script(who, T0 + 20, ttl=60)
    assert await redis_client.get(keys.window(who)) == f"o:{T0 + 20}".encode()


# -- unsend.lua ---------------------------------------------------------------------------------------------


async def test_unsend_takes_back_the_mark_the_record_the_member_and_its_own_turn(redis_client: Any) -> None:
    script = UnsendScript(redis_client)
    record = StepRecord("job-1", "text", A, T0, True)
    await redis_client.hset(keys.sends("job-1"), mapping={**record.fields(), "text": "sending", "file": "sent"})
    await redis_client.zadd(keys.AWAITING, {record.member: 0})
    await redis_client.set(keys.turn(record.who), record.ref)
    done = await script(
        "job-1", "job-1", "text", member=record.member, who=record.who, keep_mark=False, wrote_record=True
    )
    assert done
    assert await redis_client.hgetall(keys.sends("job-1")) == {b"file": b"sent"}
    assert await redis_client.zcard(keys.AWAITING) == 0
    assert not await redis_client.exists(keys.turn(record.who))


async def test_unsend_keeps_a_mark_from_an_unknown_outcome_and_anothers_turn(redis_client: Any) -> None:
    script = UnsendScript(redis_client)
    record = StepRecord("job-1", "text", A, T0, True)
    await redis_client.hset(keys.sends("job-1"), mapping={**record.fields(), "text": "sending"})
    await redis_client.set(keys.turn(record.who), "job-2|text")
    await script("job-1", "job-1", "text", member=None, who=record.who, keep_mark=True, wrote_record=False)
    assert (await redis_client.hget(keys.sends("job-1"), "text")) == b"sending"
    assert await redis_client.hexists(keys.sends("job-1"), "d:text")
    assert await redis_client.get(keys.turn(record.who)) == b"job-2|text"


async def test_unsend_touches_nothing_once_a_status_proves_the_send_went_out(redis_client: Any) -> None:
    script = UnsendScript(redis_client)
    record = StepRecord("job-1", "text", A, T0, True)
    await redis_client.hset(
        keys.sends("job-1"), mapping={"d:text": json.dumps({"status": "sent", "wamid": "w"}), "text": "sending"}
    )
    await redis_client.zadd(keys.AWAITING, {record.member: 0})
    assert not await script(
        "job-1", "job-1", "text", member=record.member, who=record.who, keep_mark=False, wrote_record=True
    )
    assert await redis_client.hget(keys.sends("job-1"), "text") == b"sending"
    assert await redis_client.zcard(keys.AWAITING) == 0  # this copy sent nothing: it is no candidate


# -- the payload, item by item (pure: no Redis) -----------------------------------------------------------


def test_a_thousand_statuses_in_one_change_are_read() -> None:
    from cgb_worker.receipts.payload import parse_payload

    statuses = [{"id": f"w{i}", "status": "sent", "timestamp": "1764650000", "recipient_id": "1"} for i in range(1000)]
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"changes": [{"field": "messages", "value": {"statuses": statuses}}]}],
    }
    parsed = parse_payload(json.dumps(body).encode())
    assert (len(parsed.changes[0].statuses), parsed.bad) == (1000, [])


@pytest.mark.parametrize("stamp", ["999999999999", "4102444800", "²", "١٧٦٤٦٥٠٠٠٠", "-1", "", "17646500001"])
def test_a_timestamp_meta_would_not_send_is_set_aside(stamp: str) -> None:
    from cgb_worker.receipts.payload import parse_payload

    status = {"id": "w", "status": "sent", "timestamp": stamp, "recipient_id": "1"}
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"changes": [{"field": "messages", "value": {"statuses": [status]}}]}],
    }
    parsed = parse_payload(json.dumps(body).encode())
    assert parsed.changes[0].statuses == []
    assert [reason for reason, _item in parsed.bad] == ["a status without a wamid or a Unix timestamp"]


# -- place.lua, hold.lua, claim_dead.lua ------------------------------------------------------------------------


async def _place(redis: Any, *args: Any) -> list[Any]:
    from cgb_worker.scripts import PlaceScript

    script = PlaceScript(redis, window_ms=WINDOW, skew_ms=SKEW, wamid_ttl=60, stream_max=1000, window_ttl=60)
    async with redis.pipeline(transaction=False) as pipe:
        for a in args:
            script.queue(pipe, a)
        return [PlaceScript.answer(found) for found in await pipe.execute()]


async def test_place_matches_then_applies_in_one_call_and_holds_nothing_it_cannot_place(redis_client: Any) -> None:
    from cgb_worker.scripts import PlaceArgs

    mine = StepRecord("job-1", "text", A, T0, True, open_ms=15_000, skew_ms=SKEW)
    await _put(redis_client, mine)
    await redis_client.set(keys.turn(mine.who), mine.ref)
    sent = PlaceArgs("wamid.1", mine.who, "sent", T0 + 1000, b'{"status":"sent"}', user_id="US.1")
    read = PlaceArgs("wamid.1", None, "read", T0 + 2000, b'{"status":"read"}')
    nobody = PlaceArgs("wamid.2", keys.who(B), "sent", T0 + 1000, b"{}")
    first, second, third = await _place(redis_client, sent, read, nobody)
    assert (first.match.by, first.match.ref, first.applied and first.applied.outcome) == (
        "recipient",
        mine.ref,
        "changed",
    )
    assert (second.match.by, second.applied and second.applied.status) == ("wamid", "read")
    assert (third.match.by, third.applied) == ("none", None)
    record = json.loads(await redis_client.hget(keys.sends("job-1"), "d:text"))
    assert (record["status"], record["match"], record["userId"], "waId" in record) == (
        "read",
        "recipient",
        "US.1",
        False,
    )
    assert not await redis_client.exists(keys.turn(mine.who))
    assert [f[b"job"] for _i, f in await redis_client.xrange(keys.DELIVERIES)] == [b"job-1", b"job-1"]


async def test_hold_keeps_one_copy_and_overflows_into_unmatched(redis_client: Any) -> None:
    from cgb_worker.scripts import HoldScript

    hold = HoldScript(redis_client)
    async with redis_client.pipeline(transaction=False) as pipe:
        for item in (b"a", b"a", b"b", b"c"):
            hold.queue(pipe, item, first_try=1.0, now_ms=5, cap=2, kept=b'["x"]', unmatched_max=10,
                       unmatched_min_id="0-0")  # fmt: skip
        assert await pipe.execute() == [1, 0, 1, -1]
    assert await redis_client.zrange(keys.ORPHANS, 0, -1) == [b"a", b"b"]
    assert await redis_client.hgetall(keys.ORPHANS_SINCE) == {b"a": b"5", b"b": b"5"}
    [(_id, fields)] = await redis_client.xrange(keys.UNMATCHED)
    assert (fields[b"reason"], fields[b"status"]) == (b"overflow", b'["x"]')


async def test_claim_dead_takes_only_a_dead_consumers_entries_then_forgets_it(redis_client: Any) -> None:
    from cgb_worker.scripts import ClaimDeadScript

    claim = ClaimDeadScript(redis_client)
    await redis_client.xgroup_create(keys.INBOX, keys.INBOX_GROUP, id="0", mkstream=True)
    entry_id = await redis_client.xadd(keys.INBOX, {"body": b"x"})
    await redis_client.xreadgroup(keys.INBOX_GROUP, "other", {keys.INBOX: ">"})
    await redis_client.set(keys.consumer("other"), "1")
    assert await claim("other", "me") == []  # alive: never taken, however long it has held it
    await redis_client.delete(keys.consumer("other"))
    assert await claim("other", "me") == [(entry_id, {b"body": b"x"})]
    names = [c["name"] for c in await redis_client.xinfo_consumers(keys.INBOX, keys.INBOX_GROUP)]
    assert names == [b"me"]  # forgotten in the same call that took its last entry
    assert await claim("other", "me") == []  # a second survivor finds nothing left to take


async def test_claim_dead_takes_a_batch_at_a_time_and_forgets_the_name_with_the_last(redis_client: Any) -> None:
    from cgb_worker.scripts import ClaimDeadScript

    claim = ClaimDeadScript(redis_client)
    await redis_client.xgroup_create(keys.INBOX, keys.INBOX_GROUP, id="0", mkstream=True)
    ids = [await redis_client.xadd(keys.INBOX, {"body": str(i).encode()}) for i in range(3)]
    await redis_client.xreadgroup(keys.INBOX_GROUP, "other", {keys.INBOX: ">"})

    async def names() -> set[bytes]:
        return {c["name"] for c in await redis_client.xinfo_consumers(keys.INBOX, keys.INBOX_GROUP)}

    assert [e for e, _f in await claim("other", "me", count=2)] == ids[:2]
    assert await names() == {b"me", b"other"}  # still holds one: kept
    assert [e for e, _f in await claim("other", "me", count=2)] == ids[2:]
    assert await names() == {b"me"}
    pending = await redis_client.xpending_range(keys.INBOX, keys.INBOX_GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(i, b"me") for i in ids]


# -- suppress.lua -------------------------------------------------------------------------------------------------


async def _entry(redis: Any, who: str) -> Any:
    raw = await redis.get(keys.suppressed(who))
    return None if raw is None else json.loads(raw)


async def test_suppress_adds_a_scope_keeps_the_first_and_indexes_the_person(redis_client: Any) -> None:
    from cgb_worker.scripts import SuppressScript

    script = SuppressScript(redis_client, lifted_ttl=60)
    who = keys.who(A)
    assert await script.add(who, "all", "keyword", T0) is True
    assert await script.add(who, "all", "keyword", T0 + 5000) is False  # a redelivered STOP: still since T0
    assert await script.add(who, "marketing", "131050", T0 + 1000) is True
    assert await _entry(redis_client, who) == {
        "all": {"reason": "keyword", "at": T0},
        "marketing": {"reason": "131050", "at": T0 + 1000},
    }
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == {who.encode()}
    assert await redis_client.ttl(keys.suppressed(who)) == -1  # no expiry: an opt-out stands until lifted
    assert await redis_client.type(keys.suppressed(who)) == b"string"  # read with the job's MGET


async def test_suppress_an_operators_word_replaces_a_keywords_and_is_not_replaced(redis_client: Any) -> None:
    from cgb_worker.scripts import SuppressScript

    script = SuppressScript(redis_client, lifted_ttl=60)
    who = keys.who(A)
    await script.add(who, "all", "keyword", T0)
    assert await script.add(who, "all", "operator", T0 + 1) is True
    assert await script.add(who, "all", "cgb_unsubscribed", T0 + 2) is False
    assert (await _entry(redis_client, who))["all"] == {"reason": "operator", "at": T0 + 1}


async def test_suppress_lift_takes_only_the_reasons_given_and_remembers_when(redis_client: Any) -> None:
    from cgb_worker.scripts import SuppressScript

    script = SuppressScript(redis_client, lifted_ttl=60)
    who, other = keys.who(A), keys.who(B)
    await script.add(who, "all", "operator", T0)
    await script.add(who, "marketing", "131050", T0)
    await script.add(other, "all", "keyword", T0)
    assert await script.lift(who, T0 + 10, reasons="keyword,131050,cgb_unsubscribed") == 1
    assert await _entry(redis_client, who) == {"all": {"reason": "operator", "at": T0}, "lifted": T0 + 10}
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == {who.encode(), other.encode()}
    assert await script.lift(who, T0 + 20) == 1  # '*': an operator's removal takes any reason
    assert await _entry(redis_client, who) == {"lifted": T0 + 20}
    assert 0 < await redis_client.ttl(keys.suppressed(who)) <= 60  # only the lift time is left, for a while
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == {other.encode()}


async def test_suppress_an_opt_out_older_than_the_last_lift_changes_nothing(redis_client: Any) -> None:
    from cgb_worker.scripts import SuppressScript

    script = SuppressScript(redis_client, lifted_ttl=60)
    who = keys.who(A)
    await script.add(who, "all", "keyword", T0)  # STOP
    assert await script.lift(who, T0 + 60_000) == 1  # START a minute later
    assert await script.add(who, "all", "keyword", T0) is False  # the STOP, redelivered
    assert await _entry(redis_client, who) == {"lifted": T0 + 60_000}
    assert await script.lift(who, T0 + 1, reasons="keyword") == 0  # an older START lifts nothing new
    assert await _entry(redis_client, who) == {"lifted": T0 + 60_000}
    assert await script.add(who, "all", "keyword", T0 + 60_000) is True  # the same second as the START: kept
    assert await redis_client.ttl(keys.suppressed(who)) == -1


async def test_suppress_a_lift_never_takes_an_opt_out_newer_than_itself(redis_client: Any) -> None:
    from cgb_worker.scripts import SuppressScript

    script = SuppressScript(redis_client, lifted_ttl=60)
    who = keys.who(A)
    await script.add(who, "all", "keyword", T0 + 5000)
    assert await script.lift(who, T0) == 0  # a START sent before the STOP, processed after it
    assert (await _entry(redis_client, who))["all"] == {"reason": "keyword", "at": T0 + 5000}


async def test_suppress_queued_calls_keep_their_order_in_one_pipeline(redis_client: Any) -> None:
    from cgb_worker.scripts import SuppressScript

    script = SuppressScript(redis_client, lifted_ttl=60)
    who = keys.who(A)
    async with redis_client.pipeline(transaction=False) as pipe:
        script.queue_add(pipe, who, "all", "keyword", T0)
        script.queue_lift(pipe, who, T0, reasons="keyword")
        assert await pipe.execute() == [1, 1]
    assert await _entry(redis_client, who) == {"lifted": T0}


async def test_suppress_a_value_it_cannot_read_is_replaced(redis_client: Any) -> None:
    from cgb_worker.scripts import SuppressScript

    who = keys.who(A)
    await redis_client.set(keys.suppressed(who), b"not json")
    assert await SuppressScript(redis_client, lifted_ttl=60).add(who, "marketing", "operator", T0) is True
    assert await _entry(redis_client, who) == {"marketing": {"reason": "operator", "at": T0}}


async def test_suppress_a_stop_redelivered_in_the_second_of_the_start_changes_nothing(redis_client: Any) -> None:
    """Meta stamps whole seconds: STOP and START in one second, then the STOP redelivered (the same message), ends
    lifted; a new STOP in that second, a message of its own, still counts."""
    from cgb_worker.scripts import SuppressScript

    script = SuppressScript(redis_client, lifted_ttl=60)
    who = keys.who(A)
    assert await script.add(who, "all", "keyword", T0, ref="m1") is True  # STOP
    assert await script.lift(who, T0, reasons="keyword", ref="m2") == 1  # START, the same second
    assert await script.add(who, "all", "keyword", T0, ref="m1") is False  # the STOP, redelivered
    assert await script.lift(who, T0, reasons="keyword", ref="m2") == 0  # the START, redelivered
    assert (await _entry(redis_client, who))["lifted"] == T0
    assert "all" not in await _entry(redis_client, who)
    assert await script.add(who, "all", "keyword", T0, ref="m3") is True  # a new STOP, the same second
    assert (await _entry(redis_client, who))["all"] == {"reason": "keyword", "at": T0}
    assert (await _entry(redis_client, who))["seen"] == ["m1", "m2", "m3"]


async def test_suppress_remembers_a_message_it_refused_and_only_the_last_eight(redis_client: Any) -> None:
    from cgb_worker.scripts import SuppressScript

    script = SuppressScript(redis_client, lifted_ttl=60)
    who = keys.who(A)
    await script.add(who, "all", "keyword", T0, ref="m0")
    assert await script.add(who, "all", "keyword", T0 + 1000, ref="m1") is False  # already suppressed: kept as seen
    await script.lift(who, T0 + 2000, reasons="keyword", ref="m2")
    assert await script.add(who, "all", "keyword", T0 + 2000, ref="m1") is False  # m1 redelivered after the lift
    for n in range(3, 12):
        await script.add(who, "marketing", "131050", T0, ref=f"m{n}")
    assert (await _entry(redis_client, who))["seen"] == [f"m{n}" for n in range(4, 12)]


# -- heartbeat.lua, workers.lua -----------------------------------------------------------------------------------


async def test_heartbeat_writes_the_key_and_its_index_entry_together(redis_client: Any) -> None:
    from cgb_worker.scripts import HeartbeatScript

    script = HeartbeatScript(redis_client)
    await script.write("host:1:aa", b'{"a":1}', ttl_ms=30_000, now_ms=T0)
    await script.write("host:2:bb", b'{"b":2}', ttl_ms=30_000, now_ms=T0)
    assert await redis_client.get(keys.worker("host:1:aa")) == b'{"a":1}'
    assert 0 < await redis_client.pttl(keys.worker("host:1:aa")) <= 30_000
    assert await redis_client.zrange(keys.WORKERS, 0, -1, withscores=True) == [
        (b"host:1:aa", T0 + 30_000),
        (b"host:2:bb", T0 + 30_000),
    ]
    # a worker killed outright: its key expires; the next write after its time drops its index entry
    await redis_client.delete(keys.worker("host:1:aa"))
    await script.write("host:2:bb", b'{"b":3}', ttl_ms=30_000, now_ms=T0 + 40_000)
    assert await redis_client.zrange(keys.WORKERS, 0, -1) == [b"host:2:bb"]
    await script.remove("host:2:bb")
    assert await redis_client.exists(keys.worker("host:2:bb"), keys.WORKERS) == 0


async def test_workers_lists_live_heartbeats_and_drops_the_index_entries_of_expired_ones(redis_client: Any) -> None:
    from cgb_worker.scripts import HeartbeatScript, WorkersScript

    beats = HeartbeatScript(redis_client)
    await beats.write("host:1:aa", b"one", ttl_ms=30_000, now_ms=T0)
    await beats.write("host:2:bb", b"two", ttl_ms=30_000, now_ms=T0)
    await redis_client.delete(keys.worker("host:1:aa"))  # expired before any write could drop its entry
    [(beat, left_ms)] = await WorkersScript(redis_client)()
    assert beat == b"two"
    assert 0 < left_ms <= 30_000
    assert await redis_client.zrange(keys.WORKERS, 0, -1) == [b"host:2:bb"]


# -- format.lua ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "answer", "after"),
    [
        (None, None, b"3"),  # none: ours is recorded
        (b"2", b"2", b"3"),  # older: ours is recorded
        (b"3", b"3", b"3"),
        (b"4", b"4", b"4"),  # newer: never lowered (the caller refuses to start)
        (b"-1", b"-1", b"-1"),  # no format number: left as found (the caller refuses)
        (b"1.5", b"1.5", b"1.5"),
        (b"garbage", b"garbage", b"garbage"),
    ],
)
async def test_format_records_ours_only_over_nothing_or_an_older_one(
    redis_client: Any, held: bytes | None, answer: bytes | None, after: bytes
) -> None:
    from cgb_worker.scripts import source

    if held is not None:
        await redis_client.set(keys.FORMAT, held)
    try:
        script = redis_client.register_script(source("format"))
        assert await script(keys=[keys.FORMAT], args=[3]) == answer
        assert await redis_client.get(keys.FORMAT) == after
    finally:
        await redis_client.delete(keys.FORMAT)  # a format this release refuses would stop the next test's commands
