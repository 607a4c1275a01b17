"""arq's job serializer: MessagePack through msgspec, never pickle.

Nothing read from Redis can run code: job arguments and results are plain MessagePack, and a failed job's
exception travels as a MessagePack extension (code 1) holding its class name and fields, which
:func:`deserialize` rebuilds as the typed :mod:`cgb_worker.errors` exception, so ``Job.result()`` raises
e.g. ``CGBAuthError`` with its ``status``. Exceptions that are not ours come back as ``JobFailedError``
with ``error_type`` naming the original class. Structs (``SendJob``, ``SendResult``) travel as maps.

The producer and the worker must use the same pair: :func:`cgb_worker.create_pool` does that for you. A job
enqueued otherwise (``arq.create_pool`` pickles by default) cannot be read: :func:`deserialize` raises
:class:`~cgb_worker.errors.UndecodableJobError`, whose message says how producers must enqueue, and the
worker logs that one line (no traceback) and fails the job with it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import UndecodableJobError, error_from_dict, error_to_dict

ERROR_EXT = 1

_error_encoder = msgspec.msgpack.Encoder()


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        return msgspec.msgpack.Ext(ERROR_EXT, _error_encoder.encode(error_to_dict(obj)))
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == ERROR_EXT:
        return error_from_dict(msgspec.msgpack.decode(data))
    return msgspec.msgpack.Ext(code, bytes(data))


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


def serialize(obj: Any) -> bytes:
    """arq ``job_serializer``."""
    return _encoder.encode(obj)


PRODUCER_HINT = (
    "producers must enqueue with cgb_worker.create_pool(), or give arq.create_pool "
    "job_serializer=cgb_worker.serialization.serialize and job_deserializer=cgb_worker.serialization.deserialize"
)

_PICKLE_PROTO = 0x80
"""The first byte of a pickle of protocol 2 or later (arq's default serializer)."""


def deserialize(data: bytes) -> Any:
    """arq ``job_deserializer``; data in another format raises :class:`UndecodableJobError` with the hint."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        pickled = data[:1] == bytes([_PICKLE_PROTO])
        what = "a pickle (arq's default serializer)" if pickled else "not cgb-worker's MessagePack"
        raise UndecodableJobError(f"the job is {what}: {PRODUCER_HINT}") from None
