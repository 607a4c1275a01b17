"""Prometheus metrics, served at ``/metrics`` on ``METRICS_PORT`` when it is set (any other path is a 404).

Each worker has its own registry (so several workers in one process, as in the tests, do not collide).
What this worker counted since it started:

* ``cgb_jobs_total{kind, outcome}``: finished jobs; ``outcome`` is ``sent`` or ``failed``, ``kind`` is
  ``text``, ``template``, ``file`` or ``invalid`` (the payload never got that far);
* ``cgb_job_retries_total{error_class}``: tries that ended in a retry, by the error that caused it;
* ``cgb_request_duration_seconds{endpoint, status}``: every CGB call (``status`` is ``error`` when no HTTP
  answer came back);
* ``cgb_contact_cache_total{result}``: contact lookups, ``hit`` or ``miss``;
* ``cgb_jobs_expired_total{reason}``: jobs refused, unsent, for their ``expiresAt``: ``passed`` (it had passed
  when a send was due) or ``quiet_hours`` (it would pass during the recipient's quiet hours);
* ``cgb_quiet_deferred_total{category}``: tries deferred to the end of the recipient's quiet hours;
* ``cgb_suppressed_total{reason}``: jobs refused because the person is on the suppression list (``keyword``,
  ``131050``, ``cgb_unsubscribed``, ``operator``; :mod:`cgb_worker.suppression`), with no CGB call.

The queue and the fleet, read from Redis at each scrape (every worker serves the same values; a scrape
costs three round trips, whatever the backlog):

* ``cgb_queue_ready_jobs``: jobs due to run and not running yet (waiting for a free slot);
* ``cgb_queue_oldest_ready_seconds``: how long the oldest of them has been due (0 when there is none): the
  queue's lag;
* ``cgb_queue_deferred_jobs``: jobs scheduled for later (``_defer_by``/``_defer_until``, and retries waiting
  for their next try);
* ``cgb_jobs_in_progress``: jobs running now, fleet-wide: the sum of the live workers' heartbeats
  (:mod:`cgb_worker.heartbeat`, as of their last refresh);
* ``cgb_workers``: workers with a live heartbeat, and ``cgb_workers_stale`` those of them that stopped
  refreshing it or polling the queue;
* ``cgb_dead_letters``: entries in the dead-letter store, counted at scrape (so a replay or a purge shows at once).

When Redis does not answer within :data:`SCRAPE_TIMEOUT`, these are left out of the scrape (absent, not
stale) and the rest is served.

The scrape is served by aiohttp on the worker's own event loop, so the Redis reads above use the worker's
asyncio client and run right before the registry is rendered; prometheus_client's own HTTP server would run
its collectors in a thread of their own, away from that loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from loguru import logger
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .connection import cause
from .deadletters import DeadLetters
from .heartbeat import live_workers
from .scripts import QueueStatsScript

SCRAPE_TIMEOUT = 5.0
"""Seconds a scrape waits for Redis before serving the worker's own counters without the queue's gauges."""


class QueueGauges(Collector):
    """The queue's and the fleet's gauges: :meth:`refresh` reads them on the worker's loop right before a
    scrape renders them; :meth:`collect` (prometheus_client's side) yields what it read, or nothing."""

    def __init__(self, redis: Redis, queue_name: str, in_progress_prefix: str, dead_letters: DeadLetters) -> None:
        self._redis = redis
        self._stats = QueueStatsScript(redis, queue_name, in_progress_prefix)
        self._dead_letters = dead_letters
        self._values: dict[str, float] | None = None

    async def refresh(self) -> None:
        self._values = None
        now_ms = int(time.time() * 1000)
        stats = await self._stats(now_ms)
        workers = await live_workers(self._redis)
        dead = await self._dead_letters.count()
        # The oldest job's wait: since it fell due, or, for a job our rate limit deferred (arq holds it as
        # deferred, at its next turn), since it first fell due: a backlog the limit spreads out is a backlog.
        starts = [ms for ms in (stats.oldest_ms, stats.waiting_since_ms) if ms is not None]
        self._values = {
            "ready": stats.due - stats.running,
            "oldest": max((max(0.0, (now_ms - ms) / 1000) for ms in starts), default=0.0),
            "deferred": stats.deferred,
            "waiting": stats.due - stats.running + stats.deferred,
            "in_progress": sum(w.beat.running for w in workers),
            "workers": len(workers),
            "stale": sum(1 for w in workers if w.stale),
            "dead": dead,
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self._values
        if values is None:
            return
        for name, key, text in (
            ("cgb_queue_ready_jobs", "ready", "Jobs due to run and not running yet"),
            ("cgb_queue_jobs", "waiting", "Jobs in the queue not running: ready and deferred"),
            (
                "cgb_queue_oldest_ready_seconds",
                "oldest",
                "How long the oldest waiting job has waited since it fell due (for one the rate limit deferred, "
                "since it first fell due)",
            ),
            (
                "cgb_queue_deferred_jobs",
                "deferred",
                "Jobs scheduled for later: retries and rate-limit turns waiting included",
            ),
            ("cgb_jobs_in_progress", "in_progress", "Jobs running now, fleet-wide (workers' heartbeats)"),
            ("cgb_workers", "workers", "Workers with a live heartbeat"),
            ("cgb_workers_stale", "stale", "Workers whose heartbeat or poll is late"),
            ("cgb_dead_letters", "dead", "Entries in the dead-letter store"),
        ):
            yield GaugeMetricFamily(name, text, value=values[key])


_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self._left_out_said = -10.0
        """time.monotonic() of the last line saying the queue's gauges were left out of a scrape."""
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
        self.queue: QueueGauges | None = None
        self._runner: web.AppRunner | None = None

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

    def watch_queue(
        self, redis: Redis, queue_name: str, in_progress_prefix: str, dead_letters: DeadLetters
    ) -> QueueGauges:
        """Add the queue's and the fleet's gauges, read from ``redis`` at each scrape."""
        self.queue = QueueGauges(redis, queue_name, in_progress_prefix, dead_letters)
        self.registry.register(self.queue)
        return self.queue

    async def render(self) -> bytes:
        """The scrape: the queue's gauges read now (left out if Redis does not answer in time), then the rest."""
        if self.queue is not None:
            try:
                async with asyncio.timeout(SCRAPE_TIMEOUT):  # not wait_for: see .tasks
                    await self.queue.refresh()
            except Exception as exc:
                now = time.monotonic()
                if now - self._left_out_said >= 10:  # a scrape every few seconds through an outage: a line per 10 s
                    self._left_out_said = now
                    why = cause(exc) if isinstance(exc, TimeoutError | OSError | RedisError) else type(exc).__name__
                    logger.warning("metrics: the queue's gauges are left out of scrapes: Redis {}", why)
        return generate_latest(self.registry)

    async def _scrape(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def serve(self, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from outside the container
        """Serve ``/metrics`` (only) on the running loop; a busy port raises ``OSError``."""
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


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
