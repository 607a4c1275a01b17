"""Delivery receipts: what happened to each message after CGB said success, told by WhatsApp's status webhooks.

CGB returns no message id and pushes no status; ``cgb-worker webhooks`` receives Meta's signed webhooks and keeps
the truth per message. Its rooms:

* :mod:`.payload`: Meta's payload, the envelope strict and each item lenient;
* :mod:`.app`: the HTTP side (handshake, signed POSTs into the inbox, health, metrics) and ``serve``;
* :mod:`.inbox`: the processor, a consumer of the inbox stream;
* :mod:`.matching`: which send a status belongs to, or holding it until that is certain;
* :mod:`.reactions`: what statuses call for (the 131047 fallback), from an outbox, exactly once;
* :mod:`.timeline`: the read model producers use (:func:`delivery`).

The worker's side of the record (the delivery record written with each ``sending`` mark, and the per-person turn)
is in :mod:`cgb_worker.sends`; the Redis scripts both sides run are in :mod:`cgb_worker.scripts`, and every key
in :mod:`cgb_worker.keys`.
"""

from .app import create_app, serve, signature
from .inbox import Processor
from .payload import MalformedError, parse_payload
from .timeline import Delivery, DeliveryError, DeliveryEvent, StepDelivery, delivery

__all__ = [
    "Delivery",
    "DeliveryError",
    "DeliveryEvent",
    "MalformedError",
    "Processor",
    "StepDelivery",
    "create_app",
    "delivery",
    "parse_payload",
    "serve",
    "signature",
]
