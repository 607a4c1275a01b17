"""Prometheus metrics, served on ``METRICS_PORT`` when it is set.

Each worker has its own registry (so several workers in one process, as in the tests, do not collide):

* ``cgb_jobs_total{kind, outcome}``: finished jobs; ``outcome`` is ``sent`` or ``failed``, ``kind`` is
  ``text``, ``template``, ``file`` or ``invalid`` (the payload never got that far);
* ``cgb_job_retries_total{error_class}``: tries that ended in a retry, by the error that caused it;
* ``cgb_request_duration_seconds{endpoint, status}``: every CGB call (``status`` is ``error`` when no HTTP
  answer came back);
* ``cgb_contact_cache_total{result}``: contact lookups, ``hit`` or ``miss``;
* ``cgb_dead_letters``: entries in the dead-letter store, refreshed at start-up and on every new entry;
* ``cgb_jobs_expired_total{reason}``: jobs refused, unsent, for their ``expiresAt``: ``passed`` (it had passed
  when a send was due) or ``quiet_hours`` (it would pass during the recipient's quiet hours);
* ``cgb_quiet_deferred_total{category}``: tries deferred to the end of the recipient's quiet hours;
* ``cgb_suppressed_total{reason}``: jobs refused because the person is on the suppression list (``keyword``,
  ``131050``, ``cgb_unsubscribed``, ``operator``; :mod:`cgb_worker.suppression`), with no CGB call.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("cgb_jobs", "Finished whatsapp_send jobs", ["kind", "outcome"], registry=self.registry)
        self.retries = Counter(
            "cgb_job_retries", "Job tries that ended in a retry", ["error_class"], registry=self.registry
        )
        self.requests = Histogram(
            "cgb_request_duration_seconds",
            "CGB API request latency",
            ["endpoint", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cache = Counter("cgb_contact_cache", "Contact cache lookups", ["result"], registry=self.registry)
        self.suppressed = Counter(
            "cgb_suppressed", "Jobs refused by the suppression list", ["reason"], registry=self.registry
        )
        self.dead_letters = Gauge("cgb_dead_letters", "Entries in the dead-letter store", registry=self.registry)
        self.expired = Counter(
            "cgb_jobs_expired", "Jobs refused, unsent, for their expiresAt", ["reason"], registry=self.registry
        )
        self.quiet_deferred = Counter(
            "cgb_quiet_deferred",
            "Tries deferred to the end of the recipient's quiet hours",
            ["category"],
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, int | None], Any] = {}
        self._job_children: dict[tuple[str, str], Any] = {}
        self._cache_hit, self._cache_miss = self.cache.labels("hit"), self.cache.labels("miss")
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def on_request(self, endpoint: str, status: int | None, seconds: float) -> None:
        child = self._request_children.get((endpoint, status))
        if child is None:  # .labels() is a lookup with locking; keep the children it hands out
            child = self.requests.labels(endpoint, str(status) if status is not None else "error")
            self._request_children[(endpoint, status)] = child
        child.observe(seconds)

    def on_cache(self, hit: bool) -> None:
        (self._cache_hit if hit else self._cache_miss).inc()

    def job_done(self, kind: str, outcome: str) -> None:
        child = self._job_children.get((kind, outcome))
        if child is None:
            child = self._job_children[(kind, outcome)] = self.jobs.labels(kind, outcome)
        child.inc()

    def suppressed_job(self, reason: str) -> None:
        self.suppressed.labels(reason).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from outside the container
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


_DELIVERY_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400)


class ReceiverMetrics:
    """The webhook receiver's metrics, served on its own ``/metrics``:

    * ``cgb_deliveries_total{status}``: changes of a message's status (``sent``, ``delivered``, ``read``,
      ``failed``, ``played``, ``unconfirmed``);
    * ``cgb_webhook_requests_total{outcome}``: POSTs, ``ok``, ``bad_signature``, ``malformed``, ``too_large``,
      or ``duplicate`` (every status in it had been seen), and ``store_failed`` (Redis down: answered 503);
    * ``cgb_webhook_statuses_unmatched_total{reason}``: statuses placed on no message: ``none`` (no send of
      ours could have produced it: another sender's message), ``ambiguous`` (several could: unresolved, never
      guessed), ``gone`` (its message's record had expired);
    * ``cgb_webhook_statuses_held``: statuses held now, waiting to be placed;
    * ``cgb_webhook_items_malformed_total``: statuses, messages or changes set aside in a signed POST whose
      other items were used;
    * ``cgb_reactions_total{kind}``: what statuses called for, carried out: the action of the code's row in
      :mod:`cgb_worker.whatsapp_errors` (``fallback``, ``resend``, ``throttle``, ``marketing_cap``, ``suppress``,
      ``undeliverable``, ``fail``), or ``given_up`` when a step ran out of automatic resends;
    * ``cgb_whatsapp_errors_total{code}``: failed messages by WhatsApp's error code (at most 64 codes, then
      ``other``);
    * ``cgb_delivery_seconds``: from the request to WhatsApp's ``delivered``;
    * the backlog, sampled about once a second: ``cgb_webhook_inbox_length`` (stored webhooks not yet processed),
      ``cgb_webhook_inbox_pending`` (taken by a receiver, not yet done), ``cgb_webhook_inbox_oldest_seconds`` (the
      age of the oldest), ``cgb_webhook_held`` (statuses held), ``cgb_webhook_awaiting_sends`` (sends waiting for a
      first status), ``cgb_webhook_malformed`` and ``cgb_webhook_unmatched`` (entries kept in those streams)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "cgb_deliveries", "Changes of a message's delivery status", ["status"], registry=self.registry
        )
        self.requests = Counter(
            "cgb_webhook_requests", "WhatsApp webhook POSTs, by outcome", ["outcome"], registry=self.registry
        )
        self._request_children: dict[str, Any] = {}
        self.unmatched = Counter(
            "cgb_webhook_statuses_unmatched", "Statuses placed on no message", ["reason"], registry=self.registry
        )
        self.held = Gauge("cgb_webhook_statuses_held", "Statuses held, waiting to be placed", registry=self.registry)
        self.malformed_items = Counter(
            "cgb_webhook_items_malformed", "Items set aside from signed POSTs", registry=self.registry
        )
        self.reactions = Counter("cgb_reactions", "Reactions carried out", ["kind"], registry=self.registry)
        self.whatsapp_errors = Counter(
            "cgb_whatsapp_errors", "Failed messages by WhatsApp's error code", ["code"], registry=self.registry
        )
        self._error_codes: set[int] = set()
        self.delivery_seconds = Histogram(
            "cgb_delivery_seconds",
            "Seconds from the request to WhatsApp's delivered",
            buckets=_DELIVERY_BUCKETS,
            registry=self.registry,
        )

        self.inbox_length = Gauge(
            "cgb_webhook_inbox_length", "Stored webhooks not yet processed", registry=self.registry
        )
        self.inbox_pending = Gauge(
            "cgb_webhook_inbox_pending", "Stored webhooks taken by a receiver, not yet done", registry=self.registry
        )
        self.inbox_oldest = Gauge(
            "cgb_webhook_inbox_oldest_seconds",
            "Age of the oldest stored webhook not yet processed",
            registry=self.registry,
        )
        self.held_sampled = Gauge("cgb_webhook_held", "Statuses held, waiting to be placed", registry=self.registry)
        self.awaiting = Gauge("cgb_webhook_awaiting_sends", "Sends waiting for a first status", registry=self.registry)
        self.malformed_kept = Gauge(
            "cgb_webhook_malformed", "Entries kept in the malformed stream", registry=self.registry
        )
        self.unmatched_kept = Gauge(
            "cgb_webhook_unmatched", "Entries kept in the unmatched stream", registry=self.registry
        )

    def whatsapp_error(self, code: int, *, limit: int = 64) -> None:
        if code not in self._error_codes and len(self._error_codes) < limit:
            self._error_codes.add(code)
        self.whatsapp_errors.labels(str(code) if code in self._error_codes else "other").inc()

    def request(self, outcome: str) -> None:
        """Count one request (or stored webhook) by outcome; on the public port's every request."""
        child = self._request_children.get(outcome)
        if child is None:  # .labels() is a lookup with locking; keep the children it hands out
            child = self._request_children[outcome] = self.requests.labels(outcome)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
