"""The arq serializer: MessagePack only, typed exceptions back out of Redis."""

from __future__ import annotations

import asyncio
import pickle

import msgspec
import pytest

from cgb_worker import errors as E
from cgb_worker.models import SendJob, SendResult
from cgb_worker.serialization import deserialize, serialize


def test_job_payloads_round_trip_as_plain_data() -> None:
    job = {"t": 1, "f": "whatsapp_send", "a": [SendJob(to="+972500000001", message="hi")], "k": {}, "et": 1}
    back = deserialize(serialize(job))
    assert back["a"] == [{"to": "+972500000001", "message": "hi"}]  # a Struct travels as a map
    assert back == deserialize(serialize({**job, "a": [{"to": "+972500000001", "message": "hi"}]}))


def test_results_round_trip() -> None:
    result = SendResult(success=True, contact_id="972500000001", to="+972500000001", timestamp="t", kind="text")
    back = deserialize(serialize({"r": result, "s": True}))
    assert back["r"]["contactId"] == "972500000001"
    assert back["r"]["messageId"] is None
    assert msgspec.convert(back["r"], SendResult) == result


@pytest.mark.parametrize(
    "error",
    [
        E.CGBRateLimitError("slow", status=429, code=429, endpoint="send_text", retry_after=2.5),
        E.CGBAuthError("No valid API key provided.", status=401, code=401, endpoint="account"),
        E.InvalidPhoneError("phone is too short"),
        E.TemplateNotFoundError("template 'x' not found"),
        E.SendOutcomeUnknownError("maybe sent"),
        E.ConfigError(["A: bad", "B: bad"]),
    ],
    ids=lambda e: type(e).__name__,
)
def test_our_exceptions_come_back_typed(error: E.CGBWorkerError) -> None:
    back = deserialize(serialize({"r": error, "s": False}))["r"]
    assert type(back) is type(error)
    assert back.to_dict() == error.to_dict()


@pytest.mark.parametrize(
    ("error", "name"),
    [(TimeoutError(), "TimeoutError"), (asyncio.CancelledError(), "CancelledError"), (KeyError("k"), "KeyError")],
)
def test_foreign_exceptions_become_job_failed_errors(error: BaseException, name: str) -> None:
    back = deserialize(serialize({"r": error}))["r"]
    assert type(back) is E.JobFailedError
    assert back.error_type == name
    assert str(back).startswith(name)


def test_nothing_is_pickled() -> None:
    data = serialize({"r": E.CGBServerError("x", status=503)})
    assert b"cgb_worker.errors" not in data
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(data)  # noqa: S301 - proving it is not a pickle


def test_unknown_objects_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot serialize object"):
        serialize({"a": object()})
    assert deserialize(serialize({"s": {1, 2}})) == {"s": [1, 2]}


def test_foreign_extension_types_pass_through() -> None:
    data = msgspec.msgpack.encode(msgspec.msgpack.Ext(9, b"x"))
    assert deserialize(data) == msgspec.msgpack.Ext(9, b"x")
