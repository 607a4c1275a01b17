"""Job payloads kept in Redis for the receiver to send again, sealed so that no phone or text is kept in clear.

An automatic resend (a 131056 pacing failure, a throughput limit, the 131047 template fallback) needs the job's
payload long after arq has forgotten the job. The send record keeps it sealed with Fernet (AES-128-CBC and
HMAC-SHA256, from ``cryptography``), under a key derived from ``PHONE_HASH_KEY``, which workers and receivers
already share. Rotating ``PHONE_HASH_KEY`` makes sealed payloads unreadable: their resends are then skipped and
logged, as an expired record's are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken

_fernet: Fernet | None = None


def use_key(secret: str) -> None:
    """Derive the sealing key from ``PHONE_HASH_KEY`` (called with :func:`cgb_worker.keys.use_phone_key`)."""
    global _fernet
    derived = hmac.new(secret.encode(), b"cgb-worker sealed payloads v1", hashlib.sha256).digest()
    _fernet = Fernet(base64.urlsafe_b64encode(derived))


def _key() -> Fernet:
    if _fernet is None:
        raise RuntimeError("no sealing key: PHONE_HASH_KEY was not wired (keys.use_phone_key) at start-up")
    return _fernet


def seal(data: bytes) -> bytes:
    return _key().encrypt(data)


def unseal(token: bytes) -> bytes | None:
    """The sealed bytes, or None when ``token`` was not sealed under this key (a rotated key, or not ours)."""
    try:
        return _key().decrypt(token)
    except InvalidToken:
        return None
