"""cgb-worker: an arq worker that delivers WhatsApp messages through the ChatGPT Builder (CGB) API."""

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
    InvalidJobError,
    InvalidPhoneError,
    JobFailedError,
    SendOutcomeUnknownError,
    TemplateNotFoundError,
    UnknownVariableError,
)
from .models import Account, Contact, CustomField, Flow, SendJob, SendResult
from .phones import normalize_phone
from .settings import Settings, load_settings
from .worker import WorkerSettings, create_pool

__version__ = "0.1.0"

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
    "Flow",
    "InvalidJobError",
    "InvalidPhoneError",
    "JobFailedError",
    "SendJob",
    "SendOutcomeUnknownError",
    "SendResult",
    "Settings",
    "TemplateNotFoundError",
    "UnknownVariableError",
    "WorkerSettings",
    "create_pool",
    "load_settings",
    "normalize_phone",
]
