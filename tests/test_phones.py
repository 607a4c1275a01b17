"""Phone numbers: E.164 out, clear errors in, region never guessed."""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cgb_worker.errors import InvalidPhoneError
from cgb_worker.phones import contact_id_for, mask_phone, normalize_phone


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+972500000001", None, "+972500000001"),
        ("+972 50 000 0001", None, "+972500000001"),
        ("+972-50-000-0001", None, "+972500000001"),
        ("+972 (0)50 000 0001", None, "+972500000001"),  # trunk 0 written after the country code
        ("+9720500000001", None, "+972500000001"),
        ("050-000-0001", "IL", "+972500000001"),  # national form with the region set
        ("0500000001", "IL", "+972500000001"),
        ("972500000001", "IL", "+972500000001"),  # country code without the plus
        ("00972500000001", "IL", "+972500000001"),  # Israel's international prefix
        ("+972 972 50 000 0001", None, "+972500000001"),  # country code written twice
        ("+1 202 555 0100", None, "+12025550100"),
        ("(202) 555-0100", "US", "+12025550100"),
        ("+1 202 555 0100", "IL", "+12025550100"),  # an explicit + wins over the region
        ("\uff0b972500000001", None, "+972500000001"),  # full-width plus
        ("  +44 20 7946 0000  ", None, "+442079460000"),
    ],
)
def test_normalizes_to_e164(raw: str, region: str | None, expected: str) -> None:
    assert normalize_phone(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "region", "reason"),
    [
        ("", None, "phone is empty"),
        ("   ", None, "phone is empty"),
        ("0500000001", None, "no country code"),  # no region: never guessed
        ("972500000001", None, "no country code"),
        ("00972500000001", None, "no country code"),
        ("abc", "IL", "is not a phone number"),
        ("+", None, "is not a phone number"),
        ("+999 123 456", None, "unknown country code"),
        ("+1 202 555 01000000", None, "too long"),
        ("+972 50", None, "too short"),
        ("+972 12 345 6789", None, "not a valid number for country code +972 (IL)"),
        ("+1 202 555 0100 ext. 5", None, "extension"),
        ("+1" + "0" * 80, None, "longer than 64"),
        ("+972500000001\x00", None, "control or invisible character"),
        ("+972\u200b500000001", None, "control or invisible character"),  # zero-width space
    ],
)
def test_rejects_with_a_reason(raw: str, region: str | None, reason: str) -> None:
    with pytest.raises(InvalidPhoneError) as info:
        normalize_phone(raw, region)
    assert reason in str(info.value)


@pytest.mark.parametrize("raw", [None, 972500000001, ["+972500000001"], {"to": "x"}, 1.5])
def test_rejects_non_strings(raw: object) -> None:
    with pytest.raises(InvalidPhoneError, match="phone must be a string"):
        normalize_phone(raw)


def test_contact_id_and_mask() -> None:
    assert contact_id_for("+972500000001") == "972500000001"
    assert mask_phone("+972500000001") == "+972*******01"
    assert mask_phone("+12025550100") == "+1********00"
    national = mask_phone("050-123-4567")
    assert national.endswith("67")
    assert "12345" not in national
    assert mask_phone("12") == "***"


_REGIONS = sorted(r for r in phonenumbers.SUPPORTED_REGIONS if phonenumbers.example_number(r) is not None)


@settings(max_examples=300, deadline=None)
@given(region=st.sampled_from(_REGIONS), style=st.sampled_from(["e164", "intl", "national"]))
def test_every_written_form_of_a_valid_number_gives_one_e164(region: str, style: str) -> None:
    number = phonenumbers.example_number(region)
    assert number is not None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if style == "e164":
        written, given_region = e164, None
    elif style == "intl":
        written, given_region = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL), None
    else:
        written = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
        given_region = region
    result = normalize_phone(written, given_region)
    assert result == e164
    assert normalize_phone(result) == result  # idempotent
    masked = mask_phone(result)
    assert masked.endswith(result[-2:])
    assert result[1:-2] not in masked or len(result) <= 6


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_is_e164_or_a_clear_error(text: str) -> None:
    try:
        result = normalize_phone(text, "IL")
    except InvalidPhoneError as exc:
        message = str(exc)
        assert message.startswith("phone "), message
        return
    assert result.startswith("+")
    assert result[1:].isdigit()
    assert phonenumbers.is_valid_number(phonenumbers.parse(result))
