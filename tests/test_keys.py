"""The phone's name in Redis: keyed, so that it cannot be reversed by hashing every number."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from cgb_worker import keys

from .conftest import PHONE_KEY

A = "+12025550100"


def test_who_is_an_hmac_of_the_e164_under_the_phone_key() -> None:
    expected = hmac.new(PHONE_KEY.encode(), A.encode(), hashlib.sha256).hexdigest()[:32]
    assert keys.who(A) == keys.who(A.lstrip("+")) == expected
    assert keys.who("+972500000001") != expected


def test_another_key_gives_another_name(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = keys.who(A)
    monkeypatch.setattr(keys, "_phone_mac", None)
    keys.use_phone_key("another-phone-hash-key-0000")
    assert keys.who(A) != ours
    assert hashlib.blake2b(A.encode(), digest_size=12).hexdigest() not in (ours, keys.who(A))  # the old name


def test_without_a_key_who_refuses_rather_than_hash_unkeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "_phone_mac", None)
    with pytest.raises(RuntimeError, match="PHONE_HASH_KEY"):
        keys.who(A)
    with pytest.raises(ValueError, match="at least 16"):
        keys.use_phone_key("too-short")
    with pytest.raises(RuntimeError):
        keys.who(A)  # a refused key left none behind
