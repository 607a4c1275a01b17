"""The arq worker: ``arq cgb_worker.WorkerSettings``, and :func:`create_pool` for producers.

Both ways of starting the worker (``arq cgb_worker.WorkerSettings`` and ``cgb-worker run``) run arq's own
``Worker`` with the settings :func:`worker_settings` builds: the configuration is read from the environment
once, when the settings are built, and a bad one stops the process there (exit 2, one message listing
every problem), before anything connects anywhere; then the start-up checks of :mod:`cgb_worker.preflight` run
(Redis awaited out loud, the server, the data format, the CGB key), each refusal one line. ``on_startup``
opens the one ``aiohttp.ClientSession`` the worker has and builds the CGB client, contact resolver and template
services into ``ctx["cgb"]``, starts the worker's heartbeat (:mod:`cgb_worker.heartbeat`, ``ctx["heartbeat"]``)
and serves ``/metrics``; ``on_shutdown`` closes the session and removes the heartbeat.

Redis outages. The worker hands arq its own client (``redis_pool``, from :mod:`cgb_worker.connection`, as every
component connects: the URL's TLS options, Sentinel). Every Redis command, arq's own included, is retried by
redis-py through a lost connection or
a Redis that is restarting (:data:`REDIS_RETRY`: backoff from 50 ms to 1 s, about two minutes in all), so
a worker rides out a Redis restart instead of exiting (arq issues #435, #498); past that it exits and its
supervisor (the container's restart policy) brings it back. The one gap left, and arq's re-checking of its
own running jobs at every poll, are closed by the worker's one override of arq, :func:`survive_lost_claims`.

A killed worker. arq locks a running job for ``job_timeout + 10`` s and never renews the lock; a worker
killed outright (SIGKILL, out of memory) leaves its jobs locked that long. ``WORKER_JOB_TIMEOUT`` is
therefore short (15 s, so 25 s), which the CGB timeout justifies: a try stops itself by its deadline
(11.25 s) and sends a request only when the whole ``CGB_TIMEOUT`` (5 s) fits before it, so no try needs
more. A lease renewed while the job runs was the other way; it would rewrite arq's lock key from our code.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Mapping
from typing import Any

import aiohttp
from arq import ArqRedis
from arq.constants import default_queue_name as arq_default_queue_name
from arq.constants import expires_extra_ms as arq_expires_extra_ms
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, func
from loguru import logger
from redis.exceptions import WatchError

from . import keys
from .client import CGBClient
from .connection import REDIS_ERRORS as REDIS_ERRORS
from .connection import REDIS_RETRY as REDIS_RETRY
from .connection import (
    RedisConfig,
    arq_redis_settings,
    cause,
    connect,
    load_redis_config,
    parse_redis_url,
    redis_client,
)
from .contacts import ContactResolver
from .deadletters import DeadLetters
from .errors import ConfigError
from .heartbeat import WorkerHeartbeat
from .jobs import ARQ_MAX_TRIES, Services, whatsapp_send
from .logs import setup_logging
from .metrics import Metrics
from .preflight import StartupError, check_cgb, open_redis, wait_for_redis
from .ratelimit import RateLimiter
from .sends import SendLog
from .serialization import deserialize, serialize
from .series import Recorder
from .settings import Settings, listen_problem, load_settings
from .templates import Catalog, TemplateResolver


async def create_pool(
    redis_url: str | RedisConfig | None = None,
    *,
    conn_retries: int = 0,
    ride_out_outages: bool = True,
    default_queue_name: str = arq_default_queue_name,
    expires_extra_ms: int = arq_expires_extra_ms,
) -> ArqRedis:
    """An arq Redis pool that speaks the worker's serializer, connected as every component connects
    (:mod:`cgb_worker.connection`: the URL's TLS and socket options, Sentinel). ``redis_url`` is a URL, a
    :class:`RedisConfig` (for Sentinel), or None for ``REDIS_URL``, ``REDIS_SENTINELS`` and
    ``REDIS_SENTINEL_MASTER``; ``ride_out_outages`` retries every command, the first connection included,
    through a Redis restart (:data:`REDIS_RETRY`, about two minutes), and ``conn_retries`` adds retries of
    the first connection, a second apart, on top. A malformed configuration raises :class:`ConfigError`
    naming it."""
    if redis_url is None:
        config = load_redis_config(os.environ)
    elif isinstance(redis_url, RedisConfig):
        config = redis_url
    elif problem := parse_redis_url(redis_url):
        raise ConfigError([f"REDIS_URL: {problem}"])
    else:
        config = RedisConfig(url=redis_url.strip())
    for attempt in range(conn_retries + 1):
        try:
            return await connect(
                config,
                ride_out_outages=ride_out_outages,
                default_queue=default_queue_name,
                expires_extra=expires_extra_ms,
            )
        except REDIS_ERRORS:
            if attempt == conn_retries:
                raise
            await asyncio.sleep(1)
    raise AssertionError("unreachable")


def _stopping(sig: signal.Signals) -> None:
    if sig in (signal.SIGTERM, signal.SIGINT):  # not arq's SIGUSR1 of a close() without signal handling
        REDIS_RETRY.outage.stopping = True


def survive_lost_claims() -> None:
    """arq's ``Worker.start_jobs``, with two guarantees it lacks; the worker's one override of arq.

    * **It rides out a Redis restart.** arq 0.28 reads a job's lock under WATCH. When the connection dies
      right then, redis-py cannot retry (the WATCH died with it) and raises ``WatchError``; arq catches that
      around its EXEC but not around the two reads before it, so the error ends the worker's main loop,
      after arq has counted the job as started and taken a semaphore permit for it. Here both are given
      back and the next poll claims the job again (it is still in the queue, unclaimed).
    * **A stop during an outage is prompt.** It sets arq's ``on_stop`` hook (:func:`_stopping`): on SIGTERM or
      SIGINT every Redis command tries once, so arq's clean-up does not wait out two minutes of retries per
      command while Redis is away.
    * **It stamps the time of each poll** for the worker's heartbeat (:mod:`cgb_worker.heartbeat`), in memory.
    * **It does not ask Redis about its own running jobs.** Running jobs stay at the head of arq's queue,
      and every poll that finds a free slot checks each of them in Redis (WATCH, EXISTS, ZSCORE, UNWATCH)
      before it reaches a new one: four commands per running job per freed slot, which, with jobs waiting in
      place for rate-limit slots, came to 216 commands per message, and at ``max_jobs=100`` held a
      latency-bound worker to 0.8 of its bound. arq's own answer for such a job is "running, skip it"; here
      the ids this worker runs are skipped without asking. Other workers' jobs are checked as before.

    Installed once, by the worker's start-up (so a producer's process is untouched); ``tests/test_worker.py``
    pins both behaviours of arq's that it relies on, and ``pyproject.toml`` admits only the arq tested."""
    if getattr(Worker.start_jobs, "_cgb_survives_lost_claims", False):
        return
    original = Worker.start_jobs

    @functools.wraps(original)
    async def start_jobs(self: Worker, job_ids: list[bytes]) -> None:
        if self.on_stop is None:  # arq's hook, called from its signal handler
            self.on_stop = _stopping
        heartbeat: WorkerHeartbeat | None = self.ctx.get("heartbeat")
        if heartbeat is not None:  # the time of this poll, in memory (cgb_worker.heartbeat)
            heartbeat.polled(self)
        running = self.tasks
        fresh = [job_id for job_id in job_ids if job_id.decode() not in running]
        try:
            await original(self, fresh)
        except WatchError:
            self._release_sem_dec_counter_on_complete()  # what arq took for the job it was checking
            logger.warning("Redis went away while a job was being claimed; the next poll claims it")

    start_jobs._cgb_survives_lost_claims = True  # type: ignore[attr-defined]
    Worker.start_jobs = start_jobs  # type: ignore[method-assign]


def _startup(settings: Settings) -> Any:
    async def startup(ctx: dict[str, Any]) -> None:
        survive_lost_claims()
        redis: ArqRedis = ctx["redis"]
        await redis.ping()
        connector = aiohttp.TCPConnector(limit=max(100, settings.worker.max_jobs), ttl_dns_cache=300)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=settings.timeout))
        ctx["session"] = session
        metrics = Metrics()
        ctx["metrics"] = metrics
        limiter = RateLimiter(redis, rate=settings.rate_limit) if settings.rate_limit > 0 else None
        client = CGBClient(
            session,
            settings.api_key,
            base_url=settings.api_url,
            timeout=settings.timeout,
            on_request=metrics.on_request,
            limiter=limiter,
        )
        contacts = ContactResolver(client, redis, cache_ttl=settings.cache_timeout, on_cache=metrics.on_cache)
        dead_letters = DeadLetters(redis, max_entries=settings.dead_letter_max)
        recorder = Recorder(redis)
        recorder.start()
        ctx["recorder"] = recorder
        ctx["cgb"] = Services(
            settings=settings,
            redis=redis,
            client=client,
            contacts=contacts,
            templates=TemplateResolver(Catalog(client, redis, ttl=settings.template_cache_timeout), settings.templates),
            sends=SendLog(redis),
            dead_letters=dead_letters,
            metrics=metrics,
            recorder=recorder,
        )
        heartbeat = WorkerHeartbeat(
            redis,
            queue=arq_default_queue_name,
            max_jobs=settings.worker.max_jobs,
            interval=settings.worker.health_check_interval,
            job_timeout=settings.worker.job_timeout,
            poll_delay=settings.worker.poll_delay,
            where=str(settings.redis),
        )
        await heartbeat.start()
        ctx["heartbeat"] = heartbeat
        if settings.wa_templates is None:
            logger.warning(
                "WA_TEMPLATES_FILE is not set: native WhatsApp templates (whatsappTemplate) go out with their "
                "parameters unchecked, and a mismatch shows only as WhatsApp's failure after CGB's success"
            )
        if settings.metrics_port is not None:
            metrics.watch_queue(redis, arq_default_queue_name, in_progress_key_prefix, dead_letters)
            try:
                await metrics.serve(settings.metrics_port)
            except OSError as exc:
                problem = listen_problem("METRICS_PORT", "0.0.0.0", settings.metrics_port, exc)  # noqa: S104
                logger.error("cgb-worker cannot start: {}", problem)
                raise SystemExit(2) from None
            logger.info("metrics on :{}/metrics", settings.metrics_port)
        logger.info(
            "cgb-worker ready: CGB at {}, Redis at {}, rate limit {}, {} template mapping(s), max_jobs={}",
            settings.api_url,
            settings.redis,
            f"{settings.rate_limit:g}/s" if settings.rate_limit > 0 else "off",
            len(settings.templates),
            settings.worker.max_jobs,
        )

    return startup


async def shutdown(ctx: dict[str, Any]) -> None:
    session: aiohttp.ClientSession | None = ctx.get("session")
    if session is not None:
        await session.close()
    metrics: Metrics | None = ctx.get("metrics")
    if metrics is not None:
        await metrics.close()
    recorder: Recorder | None = ctx.get("recorder")
    if recorder is not None:  # the last counts and index entries (arq's jobs have ended by now)
        await recorder.stop()
    heartbeat: WorkerHeartbeat | None = ctx.get("heartbeat")
    if heartbeat is not None:
        await heartbeat.stop()
    logger.info("cgb-worker stopped")


def worker_settings(environ: Mapping[str, str] | None = None) -> type:
    """The arq settings class for the configuration in ``environ`` (default: the process environment).

    Reads and checks the configuration (raising :class:`ConfigError` with every problem) and sets up
    logging, arq's own loggers included, so every line is in the configured format from the first."""
    return _worker_class(load_settings(environ))


def _worker_class(settings: Settings) -> type:
    keys.use_phone_key(settings.phone_hash_key.get_secret_value())
    setup_logging(settings.log_level, json_lines=settings.log_json, diagnose=settings.log_diagnose)
    for warning in settings.warnings:
        logger.warning(warning)
    options = settings.worker

    class WorkerSettings:
        """``arq cgb_worker.WorkerSettings``. The knobs come from ``WORKER_*`` (see ``WorkerOptions``)."""

        functions = [func(whatsapp_send, name="whatsapp_send", max_tries=ARQ_MAX_TRIES)]
        on_startup = _startup(settings)
        on_shutdown = shutdown
        # The worker's client (every URL option, Sentinel, outages ridden out), made here and connected on first
        # use; arq's own settings remain for what arq connects to by itself (``arq --check``).
        redis_pool = redis_client(settings.redis)
        redis_settings = arq_redis_settings(settings.redis)
        job_serializer = serialize
        job_deserializer = deserialize
        max_jobs = options.max_jobs
        poll_delay = options.poll_delay
        job_timeout = options.job_timeout
        health_check_interval = options.health_check_interval
        job_completion_wait = options.job_completion_wait
        keep_result = options.keep_result
        max_tries = ARQ_MAX_TRIES
        log_results = False  # results carry the phone number

    return WorkerSettings


def worker_settings_or_exit() -> type:
    """:func:`worker_settings` for a command line: a bad configuration prints its problems and exits 2; then
    the start-up checks (:mod:`cgb_worker.preflight`) run, each refusal one line and its exit code.

    They run here, synchronously, because this is where ``arq cgb_worker.WorkerSettings`` first calls our code:
    arq's ``Worker.main`` connects (``create_pool``, ``log_redis_info``) before ``on_startup``, and its command
    lets any exception out as a traceback. Under ``arq --check`` Redis is tried once and nothing else is checked:
    no wait, no CGB call (the image's HEALTHCHECK is ``cgb-worker health``, which checks this host's worker)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        setup_logging("INFO", json_lines=os.environ.get("LOG_JSON", "").strip().lower() in ("true", "1", "yes"))
        logger.error("cgb-worker cannot start: {}", exc)
        sys.exit(2)
    worker_class = _worker_class(settings)
    sys.excepthook = _redis_lost_in_one_line(sys.excepthook)
    try:
        asyncio.run(preflight(settings, health_check="--check" in sys.argv[1:]))
    except StartupError as exc:
        logger.error("cgb-worker cannot start: {}", exc)
        sys.exit(exc.code)
    except KeyboardInterrupt:  # Ctrl-C while it waits for Redis
        logger.error("cgb-worker interrupted before it started")
        sys.exit(130)
    return worker_class


def _redis_lost_in_one_line(previous: Any) -> Any:
    """A ``sys.excepthook`` for the worker's process: Redis lost for longer than :data:`REDIS_RETRY` rides out
    ends arq's loop with redis-py's error, which arq's command lets out as a traceback; it is told in one line
    (exit 1, for the supervisor to restart the worker). Any other error keeps its traceback: it is a bug."""

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        if not issubclass(kind, REDIS_ERRORS):
            previous(kind, error, trace)
            return
        down = REDIS_RETRY.outage.down_since
        lasted = f" for {time.monotonic() - down:.0f} s" if down is not None else ""
        logger.error(
            "cgb-worker stopped: Redis at {} unreachable{}: {}", REDIS_RETRY.outage.url or "REDIS_URL", lasted,
            cause(error, REDIS_RETRY.outage.url),
        )  # fmt: skip

    return hook


async def preflight(settings: Settings, *, health_check: bool = False) -> None:
    """The worker's start-up checks: Redis reachable (said while it is not), the server and the data format,
    then the CGB key. With ``health_check``, only one attempt at Redis."""

    def connect() -> Awaitable[ArqRedis]:
        return create_pool(settings.redis, ride_out_outages=False)

    where = str(settings.redis)  # the redacted URL, or the sentinels
    if health_check:
        redis = await wait_for_redis(connect, where, give_up_after=0, say=logger.warning)
    else:
        redis = await open_redis(
            connect, where, role="worker", give_up_after=settings.redis_connect_timeout, say=logger.warning
        )
    await redis.aclose()
    if not health_check:
        await check_cgb(settings, logger.warning)


def main() -> None:
    """What ``cgb-worker run`` starts: arq's worker, exactly as ``arq cgb_worker.WorkerSettings`` runs it."""
    from arq.worker import run_worker

    settings = worker_settings_or_exit()
    try:
        run_worker(settings)
    except REDIS_ERRORS as exc:  # told as arq's own command tells it (the excepthook above): one line, exit 1
        _redis_lost_in_one_line(sys.__excepthook__)(type(exc), exc, exc.__traceback__)
        sys.exit(1)


if __name__ == "__main__":
    main()
