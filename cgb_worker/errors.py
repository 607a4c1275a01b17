"""Every error cgb-worker raises, and whether trying again can help.

The tree (``retryable`` is a class attribute, decided by the base class, never by message text)::

    CGBWorkerError                      root of everything below
    ├── ConfigError                     bad or missing settings; the worker refuses to start
    ├── InvalidJobError                 a payload we can never send (permanent)
    │   ├── InvalidPhoneError           the phone cannot be turned into E.164
    │   ├── TemplateNotFoundError       no such flow (and no fallback text), or no such approved WhatsApp template
    │   ├── TemplateMismatchError       a WhatsApp template's parameters differ from the approved one
    │   ├── UnknownVariableError        a variable with no custom field, or a value its type cannot take
    │   └── UndecodableJobError         a job not in cgb-worker's MessagePack (a producer on arq's default pickle)
    ├── SendOutcomeUnknownError         a send may have gone out and policy forbids sending again (permanent)
    ├── OutsideWindowError              free-form content to a contact whose 24-hour window is closed (permanent)
    ├── SuppressedError                 the person opted out of this job's category (permanent, no CGB call)
    ├── UndeliverableError              WhatsApp said the number cannot receive (131026), not yet expired (permanent)
    ├── ExpiredError                    the job reached its send after its ``expiresAt`` (permanent)
    ├── BusyError                       another job holds this contact's lock (retryable)
    ├── ThrottledError                  our own fleet-wide rate limit says wait (retryable, not counted)
    │   ├── TurnBusyError               another message to this person awaits its first status (likewise)
    │   └── QuietHoursError             the recipient's quiet hours: deferred to their end (likewise)
    ├── StoreUnavailableError           Redis failed in the middle of a job (retryable)
    ├── JobFailedError                  the job died of an exception that is not ours (``error_type`` names it)
    └── CGBError                        talking to CGB failed
        ├── CGBTransportError           no HTTP answer (retryable)
        │   ├── CGBConnectError         the connection was never made: nothing reached CGB
        │   └── CGBTimeoutError         the request may have reached CGB: outcome unknown
        └── CGBAPIError                 CGB answered with an error (``status``, ``code``, ``endpoint``)
            ├── CGBRateLimitError       429 (retryable, ``retry_after`` from Retry-After)
            ├── CGBServerError          5xx and 408 (retryable)
            ├── CGBBadRequestError      400 and other 4xx (permanent)
            ├── CGBAuthError            401 / 403 (permanent)
            ├── CGBNotFoundError        404, or a contact with empty fields (permanent)
            └── CGBResponseError        2xx whose body is not what the contract says (permanent)

CGB also reports errors inside HTTP 200 (``{"error": {"code": 401, ...}}``); those are mapped by the code
they carry as if it were the status, and ``{"success": false}`` without a usable code is a CGBBadRequestError.

Exceptions hold only what is safe to store and log: never a request header, token or full phone number.
Each one pickles and round-trips through :func:`error_from_dict`, which is how a failed job's error travels
through Redis.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CGBWorkerError(Exception):
    """Root of cgb-worker's exceptions."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (error_from_dict, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """The error as plain data: its class name, message and fields."""
        return {"type": type(self).__name__, "message": self.message}


class ConfigError(CGBWorkerError):
    """One or more settings are invalid; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = list(problems)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "ConfigError", "message": self.message, "problems": self.problems}


class InvalidJobError(CGBWorkerError):
    """The job payload can never be sent as it is; retrying will not help."""


class InvalidPhoneError(InvalidJobError):
    """The phone number is missing, malformed, impossible or lacks a country code."""


class TemplateNotFoundError(InvalidJobError):
    """The template maps to no flow, and the job gave no fallback ``message``."""


class TemplateMismatchError(InvalidJobError):
    """A native WhatsApp template's parameters, header or buttons differ from the approved one
    (``WA_TEMPLATES_FILE``): WhatsApp would reject it after CGB answered success."""


class UnknownVariableError(InvalidJobError):
    """A template variable has no custom field of that name, or a value its field type cannot hold."""


class UndecodableJobError(InvalidJobError):
    """A job the worker's deserializer cannot read: its producer enqueued it with another serializer (arq's
    default is pickle). The message says how producers must enqueue."""


class SendOutcomeUnknownError(CGBWorkerError):
    """An earlier attempt may have sent this message; with ``CGB_UNKNOWN_OUTCOME=fail`` we do not resend."""


class OutsideWindowError(CGBWorkerError):
    """Free text or a file to a contact whose 24-hour window is known to be closed, with
    ``CGB_OUTSIDE_WINDOW=fail``: CGB would answer success and WhatsApp would drop it (131047)."""


class SuppressedError(CGBWorkerError):
    """The number is on the suppression list for this job's category (an opt-out keyword, 131050, CGB's
    ``subscribed == 2``, or an operator): nothing is sent, and trying again cannot help."""


class UndeliverableError(CGBWorkerError):
    """WhatsApp failed an earlier message to this number with 131026 (not on WhatsApp, terms not accepted, an old
    app) less than ``UNDELIVERABLE_TTL`` ago: nothing is sent."""


class ExpiredError(CGBWorkerError):
    """The job reached its send after its ``expiresAt``: the moment has passed, nothing is sent."""


class BusyError(CGBWorkerError):
    """Another job is creating this contact or writing its fields; the job is retried shortly."""

    retryable = True


class ThrottledError(CGBWorkerError):
    """The fleet-wide CGB rate limit has no slot for a while; the job is deferred by ``retry_after``.

    Such deferrals do not use up ``CGB_RETRY_ATTEMPTS``: nothing failed.
    """

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "retry_after": self.retry_after}


class TurnBusyError(ThrottledError):
    """Another send to the same person has not had its first status yet (:mod:`cgb_worker.sends`, "turns"):
    the job waits its turn as a deferral, like a rate-limit wait, and uses up no attempt."""


class QuietHoursError(ThrottledError):
    """The recipient's local time is inside ``QUIET_HOURS`` for this job's category: the job is deferred to the
    first minute after, as a deferral that uses up no attempt."""


class StoreUnavailableError(CGBWorkerError):
    """Redis (the cache, locks or send log) failed during the job; it is retried once Redis is back."""

    retryable = True


class JobFailedError(CGBWorkerError):
    """A job failed with an exception that is not one of ours: arq's job timeout, a bug, a cancellation.

    ``error_type`` is the original class name, so ``Job.result()`` still tells what happened.
    """

    def __init__(self, message: str, *, error_type: str = "Exception") -> None:
        super().__init__(message)
        self.error_type = error_type

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}" if self.message else self.error_type

    def to_dict(self) -> dict[str, Any]:
        return {"type": "JobFailedError", "message": self.message, "error_type": self.error_type}


class CGBError(CGBWorkerError):
    """Talking to CGB failed."""


class CGBTransportError(CGBError):
    """No HTTP response came back."""

    retryable = True


class CGBConnectError(CGBTransportError):
    """The connection to CGB could not be made, so the request never reached it."""


class CGBTimeoutError(CGBTransportError):
    """The request timed out or the connection broke after it was sent: CGB may have acted on it."""


class CGBAPIError(CGBError):
    """CGB answered with an error."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.endpoint = endpoint

    def __str__(self) -> str:
        where = f" on {self.endpoint}" if self.endpoint else ""
        status = f"HTTP {self.status}" if self.status is not None else "CGB"
        code = f" (code {self.code})" if self.code is not None and self.code != self.status else ""
        return f"{status}{code}{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "message": self.message,
            "status": self.status,
            "code": self.code,
            "endpoint": self.endpoint,
        }


class CGBRateLimitError(CGBAPIError):
    """429: too many requests. ``retry_after`` is CGB's own wait in seconds, when it sent one."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "retry_after": self.retry_after}


class CGBServerError(CGBAPIError):
    """5xx or 408: CGB could not handle the request now."""

    retryable = True


class CGBBadRequestError(CGBAPIError):
    """400 or another 4xx, or ``success: false``: CGB refused the request as made."""


class CGBAuthError(CGBAPIError):
    """401 / 403: the API key is missing, wrong or revoked."""


class CGBNotFoundError(CGBAPIError):
    """404, or a contact that came back with empty fields."""


class CGBResponseError(CGBAPIError):
    """A 2xx whose body does not have the shape the contract gives."""


_ALL: dict[str, type[CGBWorkerError]] = {
    cls.__name__: cls
    for cls in (
        CGBWorkerError,
        ConfigError,
        InvalidJobError,
        InvalidPhoneError,
        TemplateNotFoundError,
        TemplateMismatchError,
        UnknownVariableError,
        UndecodableJobError,
        SendOutcomeUnknownError,
        OutsideWindowError,
        SuppressedError,
        UndeliverableError,
        ExpiredError,
        BusyError,
        ThrottledError,
        TurnBusyError,
        QuietHoursError,
        StoreUnavailableError,
        JobFailedError,
        CGBError,
        CGBTransportError,
        CGBConnectError,
        CGBTimeoutError,
        CGBAPIError,
        CGBRateLimitError,
        CGBServerError,
        CGBBadRequestError,
        CGBAuthError,
        CGBNotFoundError,
        CGBResponseError,
    )
}


def error_to_dict(exc: BaseException) -> dict[str, Any]:
    """Any exception as plain data; one that is not ours becomes a :class:`JobFailedError`'s fields, unless it
    was raised from one of ours (arq's ``DeserializationError`` from :class:`UndecodableJobError`), which then
    tells it."""
    if isinstance(exc, CGBWorkerError):
        return exc.to_dict()
    if isinstance(exc.__cause__, CGBWorkerError):
        return exc.__cause__.to_dict()
    return {"type": "JobFailedError", "message": str(exc)[:500], "error_type": type(exc).__name__}


def error_from_dict(data: dict[str, Any]) -> CGBWorkerError:
    """Rebuild an exception from :meth:`CGBWorkerError.to_dict`; unknown types come back as the root."""
    cls = _ALL.get(str(data.get("type")), CGBWorkerError)
    message = str(data.get("message", ""))
    if issubclass(cls, ConfigError):
        return cls(list(data.get("problems") or [message]))
    if issubclass(cls, ThrottledError):
        return cls(message, retry_after=data.get("retry_after"))
    if issubclass(cls, JobFailedError):
        return cls(message, error_type=str(data.get("error_type") or "Exception"))
    if issubclass(cls, CGBAPIError):
        fields = {k: data.get(k) for k in ("status", "code", "endpoint")}
        if issubclass(cls, CGBRateLimitError):
            return cls(message, retry_after=data.get("retry_after"), **fields)
        return cls(message, **fields)
    return cls(message)


def is_retryable(error_type: str) -> bool:
    """Whether trying again can help an error of the class named ``error_type`` (a name as a dead letter
    stores it); a class that is not ours counts as permanent."""
    cls = _ALL.get(error_type)
    return cls is not None and cls.retryable
