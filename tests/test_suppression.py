"""The suppression list's pure parts (the decision, the keywords) and its public API on a real Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cgb_worker import keys
from cgb_worker.errors import InvalidPhoneError
from cgb_worker.models import CATEGORIES, Category
from cgb_worker.suppression import (
    Entry,
    decode,
    is_suppressed,
    keyword_action,
    list_suppressed,
    lookup,
    normalize_keyword,
    parse_keywords,
    refusal,
    suppress,
    suppress_who,
    unsuppress,
    unsuppress_who,
)

A = "+972500000001"
B = "+12025550100"
T0 = 1_764_650_000_000


def stored(**scopes: str) -> bytes:
    return json.dumps({scope: {"reason": reason, "at": T0} for scope, reason in scopes.items()}).encode()


@pytest.mark.parametrize("category", CATEGORIES)
def test_scope_all_refuses_every_category_but_authentication(category: Category) -> None:
    found = refusal(stored(all="keyword"), category)
    assert found == (None if category == "authentication" else Entry("all", "keyword", T0))


@pytest.mark.parametrize("category", CATEGORIES)
def test_scope_marketing_refuses_marketing_only(category: Category) -> None:
    found = refusal(stored(marketing="131050"), category)
    assert found == (Entry("marketing", "131050", T0) if category == "marketing" else None)


@pytest.mark.parametrize("category", CATEGORIES)
def test_nothing_stored_or_only_a_lift_refuses_nothing(category: Category) -> None:
    assert refusal(None, category) is None
    assert refusal(json.dumps({"lifted": T0}).encode(), category) is None


def test_with_both_scopes_all_is_the_one_told() -> None:
    assert refusal(stored(all="operator", marketing="131050"), "marketing") == Entry("all", "operator", T0)


@pytest.mark.parametrize("value", [b"not json", b"[1]", b'{"all": "yes"}', b'{"all": {"reason": 3, "at": 1}}'])
def test_a_value_that_cannot_be_read_is_honoured_as_all(value: bytes) -> None:
    assert decode(value)[0] == (Entry("all", "unreadable", 0),)
    assert refusal(value, "utility") == Entry("all", "unreadable", 0)
    assert refusal(value, "authentication") is None


def test_the_error_message_gives_the_reason_and_since_when() -> None:
    assert Entry("all", "keyword", T0).message("marketing") == (
        "not sending a marketing message: the number is suppressed for all since 2025-12-02T04:33:20Z: "
        "the person sent an opt-out keyword (such as STOP)"
    )
    assert "131050" in Entry("marketing", "131050", T0).message("marketing")
    assert "subscribed = 2" in Entry("all", "cgb_unsubscribed", T0).message("utility")
    assert "an operator" in Entry("all", "operator", T0).message("utility")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("STOP", "out"),
        (" stop ", "out"),
        ("Stop", "out"),
        ("\tUNSUBSCRIBE\n", "out"),
        ("start", "in"),
        ("Subscribe ", "in"),
        ("S T O P", None),
        ("stop please", None),
        ("stopp", None),
        ("", None),
        ("STOP!", None),
        ("\uff33\uff34\uff2f\uff30", "out"),  # full-width letters
        ("STOP\u200b", "out"),  # a zero-width space
        ("\u200fstart\u200e", "in"),  # direction marks
        ("\u00a0STOP\u3000", "out"),  # no-break and ideographic spaces
        ("ST\u00adOP", "out"),  # a soft hyphen is a format character too
        ("STOP" + " " * 300 + "please", None),
    ],
)
def test_keywords_are_the_whole_text_case_and_space_insensitive(text: str, expected: str | None) -> None:
    opt_out, _ = parse_keywords("STOP,UNSUBSCRIBE")
    opt_in, _ = parse_keywords("START, SUBSCRIBE")
    assert keyword_action(text, opt_out=opt_out, opt_in=opt_in) == expected


def test_a_keyword_of_two_words_matches_with_any_spacing() -> None:
    opt_out, problem = parse_keywords("stop all, STOP")
    assert (opt_out, problem) == (frozenset({"stop all", "stop"}), None)
    assert keyword_action("  Stop \t ALL ", opt_out=opt_out, opt_in=frozenset()) == "out"
    assert normalize_keyword(" Stop \t ALL ") == "stop all"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("STOP,,END", "an empty keyword (two commas, or one at an end)."),
        ("STOP,", "an empty keyword (two commas, or one at an end)."),
        ("x" * 65, "a keyword longer than 64 characters."),
    ],
)
def test_bad_keyword_settings_are_named(value: str, problem: str) -> None:
    assert parse_keywords(value) == (frozenset(), problem)


def test_an_empty_keyword_setting_turns_the_feed_off() -> None:
    assert parse_keywords("  ") == (frozenset(), None)


# -- the public API, on a real Redis --------------------------------------------------------------------------


async def test_suppress_lookup_and_unsuppress_a_phone(redis_client: Any) -> None:
    assert await suppress(redis_client, "+972 50-000-0001", scope="marketing", at_ms=T0) is True
    found = await lookup(redis_client, A)
    assert (found.who, found.entries) == (keys.who(A), (Entry("marketing", "operator", T0),))
    assert await is_suppressed(redis_client, A, "marketing") == Entry("marketing", "operator", T0)
    assert await is_suppressed(redis_client, A, "utility") is None
    assert json.loads(await redis_client.get(keys.suppressed(keys.who(A)))) == {
        "marketing": {"reason": "operator", "at": T0}
    }
    assert await unsuppress(redis_client, A, at_ms=T0 + 1) == 1
    assert (await lookup(redis_client, A)).entries == ()
    assert await is_suppressed(redis_client, A, "marketing") is None


async def test_a_national_number_needs_its_region(redis_client: Any) -> None:
    with pytest.raises(InvalidPhoneError):
        await suppress(redis_client, "050-000-0001")
    assert await suppress(redis_client, "050-000-0001", default_region="IL") is True
    assert await is_suppressed(redis_client, A, "utility") is not None


async def test_an_opt_in_keyword_lifts_the_persons_own_opt_outs_not_an_operators(redis_client: Any) -> None:
    who = keys.who(A)
    await suppress_who(redis_client, who, scope="marketing", reason="131050", at_ms=T0)
    await suppress_who(redis_client, who, scope="all", reason="keyword", at_ms=T0)
    assert await unsuppress_who(redis_client, who, reasons=("keyword", "131050", "cgb_unsubscribed"), at_ms=T0) == 2
    assert (await lookup(redis_client, A)).entries == ()
    await suppress(redis_client, A, at_ms=T0 + 5)  # an operator's
    assert await unsuppress_who(redis_client, who, reasons=("keyword", "131050", "cgb_unsubscribed")) == 0
    assert (await lookup(redis_client, A)).entries == (Entry("all", "operator", T0 + 5),)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [({"scope": "everything"}, "scope must be one of all, marketing"), ({"reason": "whim"}, "reason must be one of")],
)
async def test_bad_arguments_are_named(redis_client: Any, kwargs: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        await suppress(redis_client, A, **kwargs)
    assert await redis_client.keys("cgb:suppressed*") == []


async def test_the_list_names_hashes_oldest_first_and_leaves_out_the_lifted(redis_client: Any) -> None:
    await suppress(redis_client, B, at_ms=T0 + 10)
    await suppress(redis_client, A, scope="marketing", at_ms=T0)
    await suppress(redis_client, "+12025550101", at_ms=T0 + 20)
    await unsuppress(redis_client, "+12025550101")
    listed = await list_suppressed(redis_client)
    assert [(s.who, s.entries) for s in listed] == [
        (keys.who(A), (Entry("marketing", "operator", T0),)),
        (keys.who(B), (Entry("all", "operator", T0 + 10),)),
    ]
