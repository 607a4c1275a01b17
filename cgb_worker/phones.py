"""Phone numbers: one canonical form, E.164 (``+972500000001``), through ``phonenumbers``.

Rules, in order:

* a number written with ``+`` is read as international; one written without it needs
  ``CGB_DEFAULT_REGION`` (national trunk prefixes and that region's international prefix, such as
  ``00`` in Israel, are then understood). The region is never guessed;
* extensions are refused (WhatsApp has none);
* a country code written twice (``+972 972 50…``) is repaired when the number after the first one is
  valid for that same country; any other invalid or impossible number is refused with the reason.

CGB's WhatsApp contact id is the E.164 digits without ``+`` (:func:`contact_id_for`).
"""

from __future__ import annotations

import functools
import unicodedata

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumber, PhoneNumberFormat, ValidationResult

from .errors import InvalidPhoneError

_MAX_INPUT = 64
_IMPOSSIBLE = {
    ValidationResult.INVALID_COUNTRY_CODE: "has an unknown country code",
    ValidationResult.TOO_SHORT: "is too short",
    ValidationResult.TOO_LONG: "is too long",
    ValidationResult.INVALID_LENGTH: "has a length no number in its country has",
}
_PARSE_ERRORS = {
    NumberParseException.INVALID_COUNTRY_CODE: "has an unknown country code",
    NumberParseException.NOT_A_NUMBER: "is not a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "is too short after the international prefix",
    NumberParseException.TOO_SHORT_NSN: "is too short",
    NumberParseException.TOO_LONG: "is too long",
}


def normalize_phone(raw: object, default_region: str | None = None) -> str:
    """Return ``raw`` as E.164, or raise :class:`InvalidPhoneError` naming the problem."""
    if not isinstance(raw, str):
        raise InvalidPhoneError(f"phone must be a string, got {type(raw).__name__}")
    return _normalize(raw, default_region)


@functools.lru_cache(maxsize=8192)
def _normalize(raw: str, default_region: str | None) -> str:
    # Cached: the same numbers come back again and again, and parsing is the costliest step of a cached
    # send after the network. Errors are not cached (lru_cache does not keep exceptions).
    text = raw.strip()
    if not text:
        raise InvalidPhoneError("phone is empty")
    if len(text) > _MAX_INPUT:
        raise InvalidPhoneError(f"phone is longer than {_MAX_INPUT} characters")
    if any(unicodedata.category(c).startswith("C") for c in text):
        raise InvalidPhoneError("phone contains a control or invisible character")
    international = text.startswith(("+", "\uff0b"))  # ASCII or full-width plus
    if not international and default_region is None:
        raise InvalidPhoneError(
            "phone has no country code: write it as +<country code><number>, "
            "or set CGB_DEFAULT_REGION for numbers written the national way"
        )
    try:
        number = phonenumbers.parse(text, None if international else default_region)
    except NumberParseException as exc:
        reason = _PARSE_ERRORS.get(exc.error_type, "cannot be read")
        raise InvalidPhoneError(f"phone {reason}") from None
    if number.extension:
        raise InvalidPhoneError("phone has an extension, which WhatsApp cannot dial")
    number = _undouble_country_code(number)
    possible = phonenumbers.is_possible_number_with_reason(number)
    if possible not in (ValidationResult.IS_POSSIBLE, ValidationResult.IS_POSSIBLE_LOCAL_ONLY):
        raise InvalidPhoneError(f"phone {_IMPOSSIBLE.get(possible, 'is impossible')}")
    if not phonenumbers.is_valid_number(number):
        region = phonenumbers.region_code_for_country_code(number.country_code or 0)
        raise InvalidPhoneError(f"phone is not a valid number for country code +{number.country_code} ({region})")
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def _undouble_country_code(number: PhoneNumber) -> PhoneNumber:
    if phonenumbers.is_valid_number(number):
        return number
    cc = str(number.country_code)
    national = str(number.national_number)
    if not national.startswith(cc):
        return number
    try:
        repaired = phonenumbers.parse(f"+{national}")
    except NumberParseException:
        return number
    if repaired.country_code == number.country_code and phonenumbers.is_valid_number(repaired):
        return repaired
    return number


def contact_id_for(e164: str) -> str:
    """CGB's id for a WhatsApp contact: the E.164 digits without the plus."""
    return e164.lstrip("+")


@functools.lru_cache(maxsize=8192)
def mask_phone(phone: str) -> str:
    """A phone number fit for logs: the country code and the last two digits, the rest hidden.

    Works on E.164 and on raw input alike; anything too short to mask safely becomes ``***``.
    """
    digits = "".join(c for c in phone if c.isdigit())
    if len(digits) < 6:
        return "***"
    try:
        cc = str(phonenumbers.parse("+" + digits).country_code)
    except NumberParseException:
        cc = digits[:1]
    if not digits.startswith(cc):
        cc = ""
    hidden = len(digits) - len(cc) - 2
    return f"+{cc}{'*' * hidden}{digits[-2:]}"
