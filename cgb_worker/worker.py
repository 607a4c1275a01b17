"""The arq worker: ``arq cgb_worker.WorkerSettings``, and :func:`create_pool` for producers.

``python -m cgb_worker.worker`` (what ``cgb-worker run`` starts) runs the same settings. Both run on
:class:`CGBWorker`, an arq ``Worker`` that takes jobs off the queue with fewer Redis round trips: arq's
command line builds arq's own Worker, which ``on_startup`` turns into one before its first poll.

``on_startup`` reads the settings (a bad configuration stops the worker at once with one message listing
every problem), sets up logging, opens the one ``aiohttp.ClientSession`` the worker has, checks Redis and
builds the CGB client, contact resolver and template services into ``ctx["cgb"]``. ``on_shutdown``
closes the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
from collections.abc import Iterable
from typing import Any, cast

import aiohttp
import hiredis
from arq import ArqRedis
from arq import create_pool as arq_create_pool
from arq.connections import RedisSettings
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.utils import timestamp_ms, to_ms
from arq.worker import Worker, func, get_kwargs
from loguru import logger
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import DataError
from redis.typing import EncodableT

from .client import CGBClient
from .contacts import ContactResolver
from .deadletters import DeadLetters
from .errors import ConfigError
from .jobs import ARQ_MAX_TRIES, Services, whatsapp_send
from .logs import setup_logging
from .metrics import Metrics
from .ratelimit import RateLimiter
from .sends import FINISH_WRITES, SendLog
from .serialization import deserialize, serialize
from .settings import load_settings, peek_worker_options, redact_url
from .templates import Catalog, TemplateResolver

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def redis_settings(url: str) -> RedisSettings:
    try:
        return RedisSettings.from_dsn(url)
    except (RuntimeError, ValueError):
        return RedisSettings()  # load_settings reports the bad URL at start-up


async def create_pool(redis_url: str | None = None, *, conn_retries: int = 5, **kwargs: Any) -> ArqRedis:
    """An arq Redis pool that speaks the worker's serializer. ``redis_url`` defaults to ``REDIS_URL``;
    ``conn_retries`` is how many times a failed first connection is retried, a second apart."""
    settings = RedisSettings.from_dsn(redis_url or os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
    settings.conn_retries = conn_retries
    return await arq_create_pool(settings, job_serializer=serialize, job_deserializer=deserialize, **kwargs)


async def startup(ctx: dict[str, Any]) -> None:
    try:
        settings = load_settings()
    except ConfigError as exc:
        setup_logging("INFO")
        logger.error("cgb-worker cannot start: {}", exc)
        raise SystemExit(2) from None
    setup_logging(settings.log_level, json_lines=settings.log_json, diagnose=os.environ.get("LOG_DIAGNOSE") == "true")
    redis: ArqRedis = ctx["redis"]
    quick_checkout(redis)
    worker = _calling_worker(ctx)
    if worker is not None and type(worker) is Worker:  # arq's own: ``arq cgb_worker.WorkerSettings``
        CGBWorker.adopt(worker)
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
    contacts = ContactResolver(
        client, redis, cache_ttl=settings.cache_timeout, lock_ttl=settings.timeout * 4 + 5, on_cache=metrics.on_cache
    )
    dead_letters = DeadLetters(redis, max_entries=settings.dead_letter_max)
    ctx["cgb"] = Services(
        settings=settings,
        redis=redis,
        client=client,
        contacts=contacts,
        templates=TemplateResolver(Catalog(client, redis, ttl=settings.template_cache_timeout), settings.templates),
        sends=SendLog(redis),
        dead_letters=dead_letters,
        metrics=metrics,
    )
    metrics.dead_letters.set(await dead_letters.count())
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port)
        logger.info("metrics on :{}/metrics", settings.metrics_port)
    logger.info(
        "cgb-worker ready: CGB at {}, Redis at {}, {} template mapping(s), max_jobs={}",
        settings.api_url,
        redact_url(settings.redis_url),
        len(settings.templates),
        settings.worker.max_jobs,
    )
    settle_gc()


GC_YOUNG_THRESHOLD = 7000
"""Allocations between collections of the young generation (CPython's default is 700)."""


def settle_gc() -> None:
    """Tune the cyclic garbage collector for a long-lived worker, once its start-up is done.

    What exists by now (modules, phone metadata, sessions, services) lives as long as the process, yet every
    full collection walked it again: :func:`gc.freeze` moves it out of the collector's sight. And with a
    hundred jobs in flight, more than 700 young objects are alive at any moment, so CPython's default
    collected the young generation every dozen jobs and promoted what was in flight; every 7,000
    allocations it runs about fifty times less often. Objects are still freed the moment their last
    reference goes, as always; only reference cycles wait for the collector. Measured in BENCHMARKS.md."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(GC_YOUNG_THRESHOLD, young), middle, old)


def _calling_worker(ctx: dict[str, Any]) -> Worker | None:
    """The Worker whose ``main`` is running ``on_startup`` with this ``ctx``, found among the frames that
    await it; None when there is none (``startup`` called some other way).

    arq's command line builds a plain ``Worker`` and has no setting for the class, and ``on_startup`` is
    the first code of ours it runs, with only ``ctx``: this is how ``arq cgb_worker.WorkerSettings`` gets
    :class:`CGBWorker` too. A Worker is taken only if its ``ctx`` is this very dict."""
    frame = sys._getframe(1)
    for _ in range(8):
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Worker) and candidate.ctx is ctx:
            return candidate
        if frame.f_back is None:
            break
        frame = frame.f_back
    return None


async def shutdown(ctx: dict[str, Any]) -> None:
    session: aiohttp.ClientSession | None = ctx.get("session")
    if session is not None:
        await session.close()
    metrics: Metrics | None = ctx.get("metrics")
    if metrics is not None:
        metrics.close()
    logger.info("cgb-worker stopped")


_REDIS_URL, _OPTIONS = peek_worker_options()


class WorkerSettings:
    """``arq cgb_worker.WorkerSettings``. The knobs come from ``WORKER_*`` (see ``WorkerOptions``)."""

    functions = [func(whatsapp_send, name="whatsapp_send", max_tries=ARQ_MAX_TRIES)]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = redis_settings(_REDIS_URL)
    job_serializer = serialize
    job_deserializer = deserialize
    max_jobs = _OPTIONS.max_jobs
    poll_delay = _OPTIONS.poll_delay
    job_timeout = _OPTIONS.job_timeout
    health_check_interval = _OPTIONS.health_check_interval
    job_completion_wait = _OPTIONS.job_completion_wait
    keep_result = _OPTIONS.keep_result
    max_tries = ARQ_MAX_TRIES
    log_results = False  # results carry the phone number


_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
return score
"""


class QuickCheckoutPool(ConnectionPool):
    """redis-py's pool, handing out connections without three costs that redis-py 5.3 adds to every command.

    * redis-py checks each connection it hands out while holding a pool-wide ``asyncio.Lock``, so every
      Redis command in the process waits in line behind the check of the one before (redis-py issue
      #3692). Here the lock covers only picking the connection, and the caller checks the connection it now
      owns, as redis-py's own ``BlockingConnectionPool`` does.
    * The check is a read with a zero timeout: an extra event-loop turn, a timer and an exception per
      command. It looks for bytes left over from an earlier reply; redis-py already drops a connection whose
      command was interrupted, so leftovers are a last line of defence. Here the check looks at what has
      arrived without waiting (the stream's buffer and hiredis's, and whether the server has closed the
      socket), as later redis-py releases do (redis-py pull request #4063), and such a connection is
      reconnected as before. Without hiredis, or on a connection that is not connected, redis-py's own
      check runs.
    * redis-py's asyncio connections build every command in Python, argument by argument; its synchronous
      client has hiredis do it in C. Here the asyncio connections do the same (:func:`pack_command`,
      :func:`pack_commands`; the bytes are identical), unless the pool was given an encoding other than strict UTF-8.

    Together, in the benchmark's profile, a fifth and then about a tenth off the worker's CPU per job, and
    Redis round trips at ``max_jobs=200`` down from 10 to 20 ms to 1 to 3 ms.
    """

    def make_connection(self) -> AbstractConnection:
        connection: AbstractConnection = super().make_connection()  # type: ignore[no-untyped-call]
        _pack_in_c(connection)
        return connection

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        async with self._lock:
            connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        parser = getattr(connection, "_parser", None)
        if not (isinstance(parser, _AsyncHiredisParser) and connection.is_connected and parser._reader):
            await super().ensure_connection(connection)
            return
        stream = connection._reader
        assert stream is not None  # connected
        if connection._socket_is_empty() and not parser._reader.has_data() and not stream.at_eof():
            return
        # Leftover bytes, or the server closed the connection (Redis restarted): start afresh.
        await connection.disconnect()
        await connection.connect()


def pack_command(*args: EncodableT) -> list[bytes]:
    """A Redis command in the wire protocol, built by hiredis: what redis-py's synchronous client does
    (``HiredisRespSerializer``), for the asyncio connections that build it in Python. A value of a type
    Redis cannot take (``bool``, ``None``, a list) raises ``DataError``, as redis-py does."""
    first = args[0]
    if isinstance(first, str):
        args = (*first.encode().split(), *args[1:])
    elif isinstance(first, bytes) and b" " in first:
        args = (*first.split(), *args[1:])
    try:
        return [hiredis.pack_command(args)]  # type: ignore[arg-type]  # the stub types a 1-tuple
    except TypeError as exc:
        raise DataError(f"{exc} Convert to a bytes, string, int or float first.") from None


def pack_commands(commands: Iterable[Iterable[EncodableT]]) -> list[bytes]:
    """A pipeline's commands, each built by :func:`pack_command`, in one buffer."""
    return [b"".join([pack_command(*command)[0] for command in commands])]


def _pack_in_c(connection: AbstractConnection) -> None:
    encoder = connection.encoder
    if encoder.encoding.lower().replace("-", "").replace("_", "") == "utf8" and encoder.encoding_errors == "strict":
        connection.pack_command = pack_command  # type: ignore[method-assign]
        connection.pack_commands = pack_commands  # type: ignore[method-assign]


def quick_checkout(redis: ArqRedis) -> None:
    """Switch a plain redis-py pool to :class:`QuickCheckoutPool` (same state, three methods differ);
    Sentinel and blocking pools are left as they are."""
    pool = redis.connection_pool
    if type(pool) is ConnectionPool:
        pool.__class__ = QuickCheckoutPool
        for connection in [*pool._available_connections, *pool._in_use_connections]:
            _pack_in_c(connection)


class CGBWorker(Worker):
    """arq's Worker with fewer Redis round trips per job; which jobs run, and when, is unchanged.

    * Claiming: arq reads the head of the queue on every poll, and jobs stay there while they run. For each
      id it then asks Redis, with WATCH, EXISTS, ZSCORE and a MULTI/PSETEX/EXEC (three round trips), whether
      the job is free and claims it, one job after another. Here the jobs this worker is already running are
      dropped from the list without asking, and the claim is one atomic script (one round trip) that does
      the same checks and sets the same ``arq:in-progress`` key with the same TTL. It runs in the job's own
      task, up to :attr:`claims_in_flight` at once: a chain of claims one round trip apart held a worker
      at ``max_jobs=200`` to about 0.85 of its bound.
    * Polling: arq sleeps ``poll_delay`` between polls, so a slot freed just after a poll stays empty until
      the next one. Here a finishing job ends the wait early (no sooner than a fifth of the interval after
      the last poll began, so that jobs finishing together share a poll). And while the ids the last poll
      read are younger than the interval, a freed slot takes the next of them at once, without a poll.
    * Redis connections: the pool hands out connections without queueing every command behind one lock
      (:class:`QuickCheckoutPool`).
    * Finishing: a job's last send-log mark (see :mod:`cgb_worker.sends`) is written in arq's own finish
      transaction, beside the result, instead of in a round trip of its own.

    Written against arq 0.28's ``Worker._poll_iteration``, ``start_jobs`` and ``finish_job``, and, for
    :meth:`adopt`, its ``Worker.main``, which runs ``on_startup`` before it reads ``poll_delay``.
    """

    claims_in_flight = 8
    """Claims sent before the first of them is answered. One at a time, claiming was what limited a
    worker at ``max_jobs=200``; all at once, jobs freed together restart together and stay in step."""
    _claim: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_up()
        # The pool is switched before the first poll, whatever on_startup the settings bring (or none).
        on_startup = self.on_startup

        async def switch_pool(ctx: dict[str, Any]) -> None:
            quick_checkout(ctx["redis"])
            if on_startup is not None:
                await on_startup(ctx)

        self.on_startup = switch_pool

    def _set_up(self) -> None:
        self._finish_writes: dict[str, tuple[str, dict[str | bytes, bytes]]] = {}
        self.ctx[FINISH_WRITES] = self._finish_writes
        # arq's loop sleeps poll_delay between polls; here the wait is in _poll_iteration and ends early when
        # a job finishes, so that a freed slot does not sit empty for the rest of the interval.
        self._poll_wait = self.poll_delay_s
        self.poll_delay_s = 0
        self._slot_freed = asyncio.Event()
        self._claims = asyncio.Semaphore(self.claims_in_flight)

    @classmethod
    def adopt(cls, worker: Worker) -> CGBWorker:
        """Turn a Worker that arq built (``arq cgb_worker.WorkerSettings``) into a CGBWorker, from its
        ``on_startup``: before its first poll, which is the last moment that works."""
        worker.__class__ = cls
        adopted = cast(CGBWorker, worker)
        adopted._set_up()
        return adopted

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._slot_freed.set()

    async def _poll_iteration(self) -> None:
        started = self.loop.time()
        await super()._poll_iteration()
        # At least a fifth of the interval between polls, so that jobs finishing together share one poll.
        elapsed = self.loop.time() - started
        if elapsed < self._poll_wait / 5:
            await asyncio.sleep(self._poll_wait / 5 - elapsed)
        if not self._slot_freed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self._poll_wait - (self.loop.time() - started))):
                    await self._slot_freed.wait()
        self._slot_freed.clear()

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        write = self._finish_writes.pop(job_id, None)
        if write is None:
            await super().finish_job(
                job_id, finish, result_data, result_timeout_s, keep_result_forever, incr_score, keep_in_progress
            )
            return
        # arq's finish_job, plus the HSET. Written whether or not the job is finishing: the step went out (a
        # try cancelled just after its send is run again, and must find it recorded).
        async with self.pool.pipeline(transaction=True) as tr:
            key, fields = write
            tr.hset(key, mapping=fields)
            delete_keys = []
            in_progress_key = in_progress_key_prefix + job_id
            if keep_in_progress is None:
                delete_keys.append(in_progress_key)
            else:
                tr.pexpire(in_progress_key, to_ms(keep_in_progress))
            if finish:
                if result_data:
                    expire = None if keep_result_forever else result_timeout_s
                    tr.set(result_key_prefix + job_id, result_data, px=to_ms(expire))
                delete_keys += [retry_key_prefix + job_id, job_key_prefix + job_id]
                tr.zrem(abort_jobs_ss, job_id)
                tr.zrem(self.queue_name, job_id)
            elif incr_score:
                tr.zincrby(self.queue_name, incr_score, job_id)
            if delete_keys:
                tr.delete(*delete_keys)
            await tr.execute()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if self._claim is None:
            self._claim = self.pool.register_script(_CLAIM)
        fresh_until = self.loop.time() + self._poll_wait
        for job_id_b in job_ids:
            job_id = job_id_b.decode()
            if job_id in self.tasks:
                continue  # running here
            # Every slot busy: wait for one on this list while it is younger than a poll interval, rather
            # than return and read the head of the queue again once a slot frees.
            while self.job_counter >= self.max_jobs:
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, fresh_until - self.loop.time())):
                        await self._slot_freed.wait()
                if not self._slot_freed.is_set():
                    return
            await self.sem.acquire()  # a permit per running job, as arq's own start_jobs takes
            self.job_counter += 1
            # The claim runs in the job's task, so the next one need not wait for its round trip. (A task
            # cancelled before it starts, which happens only when the worker stops, keeps its permit.)
            await self._claims.acquire()
            task = self.loop.create_task(self._claim_and_run(job_id))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _claim_and_run(self, job_id: str) -> None:
        try:
            score = await self._claim(
                keys=[in_progress_key_prefix + job_id, self.queue_name],
                args=[job_id, timestamp_ms(), int(self.in_progress_timeout_s * 1000)],
            )
        finally:
            self._claims.release()
        if score is not None:  # None: running elsewhere, finished, or deferred by another worker meanwhile
            await self.run_job(job_id, int(float(score)))


def main() -> None:
    """What ``cgb-worker run`` starts: the worker on :class:`CGBWorker`, built directly."""
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"), json_lines=os.environ.get("LOG_JSON", "").lower() == "true")
    CGBWorker(**get_kwargs(WorkerSettings)).run()  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
