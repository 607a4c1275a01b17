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
    )
    for name in [n for n in cgb_worker.__all__ if n != "WorkerSettings"]:
        assert getattr(cgb_worker, name).__module__.startswith("cgb_worker."), name
