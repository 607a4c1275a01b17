"""cgb-worker: an arq worker that delivers WhatsApp messages through the ChatGPT Builder (CGB) API."""

from typing import Any

from .client import CGBClient
from .errors import (
    CGBAPIError,
    CGBAuthError,
    CGBBadRequestError,
    CGBConnectError,
    CGBError,
    CGBNotFoundError,
    CGBRateLimitError,
    CGBResponseError,
    CGBServerError,
    CGBTimeoutError,
    CGBTransportError,
    CGBWorkerError,
    ConfigError,
    ExpiredError,
    InvalidJobError,
    InvalidPhoneError,
    JobFailedError,
    OutsideWindowError,
    QuietHoursError,
    SendOutcomeUnknownError,
    SuppressedError,
    TemplateMismatchError,
    TemplateNotFoundError,
    UndeliverableError,
    UnknownVariableError,
)
from .models import Account, Contact, CustomField, Flow, SendJob, SendResult
from .phones import normalize_phone
from .receipts.timeline import Delivery, DeliveryError, DeliveryEvent, StepDelivery, delivery
from .settings import ReceiverSettings, Settings, load_receiver_settings, load_settings
from .suppression import (
    Suppression,
    SuppressionEntry,
    is_suppressed,
    list_suppressed,
    lookup_suppression,
    suppress,
    unsuppress,
)
from .whatsapp_errors import ErrorRule, rule_for
from .worker import create_pool, worker_settings

__version__ = "0.1.0"

_worker_settings: Any = None


def __getattr__(name: str) -> Any:
    """``cgb_worker.WorkerSettings``, what ``arq cgb_worker.WorkerSettings`` loads: built on first use from the
    process environment (see :func:`cgb_worker.worker.worker_settings`), so that importing the package, as
    producers do, reads no worker configuration. A bad configuration exits with status 2 and the list of
    problems; then the start-up checks run (:mod:`cgb_worker.preflight`), each refusal one line."""
    global _worker_settings
    if name == "WorkerSettings":
        if _worker_settings is None:
            from .worker import worker_settings_or_exit

            _worker_settings = worker_settings_or_exit()
        return _worker_settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Account",
    "CGBAPIError",
    "CGBAuthError",
    "CGBBadRequestError",
    "CGBClient",
    "CGBConnectError",
    "CGBError",
    "CGBNotFoundError",
    "CGBRateLimitError",
    "CGBResponseError",
    "CGBServerError",
    "CGBTimeoutError",
    "CGBTransportError",
    "CGBWorkerError",
    "ConfigError",
    "Contact",
    "CustomField",
    "Delivery",
    "DeliveryError",
    "DeliveryEvent",
    "ErrorRule",
    "ExpiredError",
    "Flow",
    "InvalidJobError",
    "InvalidPhoneError",
    "JobFailedError",
    "OutsideWindowError",
    "QuietHoursError",
    "ReceiverSettings",
    "SendJob",
    "SendOutcomeUnknownError",
    "SendResult",
    "Settings",
    "StepDelivery",
    "SuppressedError",
    "Suppression",
    "SuppressionEntry",
    "TemplateMismatchError",
    "TemplateNotFoundError",
    "UndeliverableError",
    "UnknownVariableError",
    "WorkerSettings",
    "create_pool",
    "delivery",
    "is_suppressed",
    "list_suppressed",
    "load_receiver_settings",
    "load_settings",
    "lookup_suppression",
    "normalize_phone",
    "rule_for",
    "suppress",
    "unsuppress",
    "worker_settings",
]
