"""The public surface is a promise: this test changes only when the promise does."""

from __future__ import annotations

import cgb_worker


def test_public_names() -> None:
    assert sorted(cgb_worker.__all__) == sorted(
        [
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
            "TemplateMismatchError",
            "TemplateNotFoundError",
            "UnknownVariableError",
            "WorkerSettings",
            "create_pool",
            "load_settings",
            "normalize_phone",
            "worker_settings",
        ]
    )
    for name in [n for n in cgb_worker.__all__ if n != "WorkerSettings"]:
        assert getattr(cgb_worker, name).__module__.startswith("cgb_worker."), name
