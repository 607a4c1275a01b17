"""Where a job is: the job locator behind ``cgb-worker status`` (and ``send --wait`` when it times out).

:func:`locate` reads arq's public data (the job and its result through ``arq.jobs.Job``, the queue
``arq:queue``, ``arq:in-progress:<id>``, ``arq:retry:<id>``) and ours (the dead-letter store, replay links,
the job's last retry and its delivery record), and says which of these the job is in, first match wins:

==================  ===============================================================================================
``succeeded``       arq holds a successful result (for ``WORKER_KEEP_RESULT``); the delivery record comes with it
``dead_lettered``   the job finally failed and its dead letter stands (error class and message)
``replayed``        the job finally failed and ``dead-letters replay`` enqueued its payload as another id
``failed``          arq holds a failed result and there is no dead letter (a job arq itself failed, such as one
                    it could not deserialize, or one whose dead letter was deleted)
``running``         a worker holds it (``arq:in-progress:<id>``); ``job_try`` is arq's try count
``retrying``        queued again after a try: ``last_retry`` is what the job recorded when it decided the retry (or
                    a deferral by the rate limit, the person's turn or quiet hours, which use up no attempt), or
                    none for a try its worker stopped; ``due_at`` is when the next try is due
``deferred``        queued, not tried yet, due later (``_defer_by`` / ``_defer_until``)
``queued``          queued and due: ``position`` counts the jobs due before it (those running included) plus one
``sent``            arq no longer holds the job or its result, and its delivery record (7 days) shows what went out
``unknown``         no trace at all: never enqueued, or older than every record
==================  ===============================================================================================

Replays are linked both ways (``replay_of`` / ``replayed_as``, written by
:meth:`~cgb_worker.deadletters.DeadLetters.replay`) for as long as a send record lives (7 days), so that a
replay's delivery record, which is its original's, is found from either id.
:meth:`JobState.failed` is what ``status`` exits 1 on: the job failed, or its delivery did.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from arq.constants import default_queue_name, in_progress_key_prefix, retry_key_prefix
from arq.jobs import Job, JobResult, SerializationError
from loguru import logger
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import keys, series
from .deadletters import DeadLetters
from .errors import CGBAPIError, CGBWorkerError, JobFailedError
from .receipts.timeline import Delivery, delivery
from .serialization import deserialize

State = Literal[
    "queued", "deferred", "running", "retrying", "succeeded", "sent", "failed", "dead_lettered", "replayed", "unknown"
]

LAST_RETRY_TTL = 86400
"""A job's last-retry record lives a day: arq's own job key expires a day after enqueue (plus any deferral)."""

RECORD_TIMEOUT = 1.0
"""Seconds the job gives the last-retry record at most: bookkeeping must not eat the try's deadline."""
TRIES_KEPT = 25
"""A job's tries that ended in a retry or deferral kept for its page, the newest (a job waiting its person's
turn may defer hundreds of times)."""
TRIES_TTL = 7 * 86400
"""As long as a send record: a week."""

CHAIN_MAX = 20
"""Replay links followed at most, either way (a replay of a replay of ...)."""


class LastRetry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"):
    """What a job recorded when it decided to try again: the error's class and, for CGB's answers, the HTTP
    status, CGB's code and the endpoint. Never the message: it could quote a phone or the text."""

    error_type: str
    attempt: int
    """The job's own attempt count (arq's tries less the deferrals that use up no attempt)."""
    job_try: int
    """arq's try that failed."""
    at: float
    """When (epoch seconds)."""
    retry_in: float
    """Seconds the job deferred itself by."""
    counted: bool
    """False for a deferral (rate limit, the person's turn, quiet hours): no attempt used up."""
    status: int | None = None
    code: int | None = None
    endpoint: str | None = None


def last_retry_of(exc: BaseException, *, attempt: int, job_try: int, retry_in: float, counted: bool) -> LastRetry:
    api = exc if isinstance(exc, CGBAPIError) else None
    return LastRetry(
        error_type=type(exc).__name__,
        attempt=attempt,
        job_try=job_try,
        at=time.time(),
        retry_in=round(retry_in, 3),
        counted=counted,
        status=api.status if api else None,
        code=api.code if api else None,
        endpoint=api.endpoint if api else None,
    )


async def tries(redis: Redis, job_id: str) -> list[LastRetry]:
    """The job's tries that ended in a retry or a deferral, newest first (at most :data:`TRIES_KEPT`); a record
    that does not decode (another version's) is skipped, not fatal."""
    found = (_last_retry(raw) for raw in await redis.lrange(keys.tries(job_id), 0, TRIES_KEPT - 1))  # type: ignore[misc]
    return [record for record in found if record is not None]


async def record_retry(redis: Redis, job_id: str, record: LastRetry) -> None:
    """Keep ``record`` as the job's last retry and in its list of tries (the console's job page), and count a
    counted retry in the series; never raises, and gives up after :data:`RECORD_TIMEOUT` (the retry goes ahead
    either way: this is for ``status`` and the console to show)."""
    encoded = msgspec.msgpack.encode(record)
    try:
        async with asyncio.timeout(RECORD_TIMEOUT), redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.last_retry(job_id), encoded, ex=LAST_RETRY_TTL)
            pipe.lpush(keys.tries(job_id), encoded)
            pipe.ltrim(keys.tries(job_id), 0, TRIES_KEPT - 1)
            pipe.expire(keys.tries(job_id), TRIES_TTL)
            if record.counted:
                series.count(pipe, record.at, "retried")
            await pipe.execute()
    except (RedisError, OSError, TimeoutError) as exc:
        logger.bind(job_id=job_id).warning("could not record the job's last retry: {}", type(exc).__name__)


class JobState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"):
    """Where a job is (:func:`locate`). Times are epoch seconds."""

    job_id: str
    state: State
    function: str | None = None
    enqueued_at: float | None = None
    job_try: int | None = None
    """arq's try count: the running try, the tries made so far (retrying), or the last (finished)."""
    position: int | None = None
    age: float | None = None
    """Seconds since it was enqueued (queued, deferred, retrying, running)."""
    due_at: float | None = None
    last_retry: LastRetry | None = None
    error_type: str | None = None
    error: str | None = None
    finished_at: float | None = None
    replay_of: str | None = None
    replayed_as: str | None = None
    delivery_of: str | None = None
    """The job whose delivery record this job's sends are in, when not its own (a replay's original)."""
    delivery: Delivery | None = None

    @property
    def failed(self) -> bool:
        """The job finally failed (``failed``, ``dead_lettered``), or its delivery did (and is not being sent
        again). A replayed job is judged by its replay (``status`` follows the chain)."""
        if self.state in ("failed", "dead_lettered"):
            return True
        d = self.delivery
        return d is not None and d.status == "failed" and not d.resending


def _error_fields(exc: Any) -> tuple[str, str]:
    if isinstance(exc, JobFailedError):
        return exc.error_type, exc.message
    if isinstance(exc, CGBWorkerError):
        return type(exc).__name__, str(exc)
    if isinstance(exc, BaseException):
        return type(exc).__name__, str(exc)
    return "Error", str(exc)


async def _origin(redis: Redis, job_id: str, kwargs: dict[str, Any] | None) -> str:
    """The id whose send record the job writes: a replay's (its chain's first job), a receiver's fallback
    template's or automatic resend's job; else its own."""
    for name in ("replay_of", "fallback_of", "resend_of"):
        value = (kwargs or {}).get(name)
        if isinstance(value, str) and value:
            return value
    current = job_id
    for _ in range(CHAIN_MAX):
        older = await redis.get(keys.replay_of(current))
        if older is None:
            break
        current = older.decode(errors="replace")
    return current


def _last_retry(raw: bytes | None) -> LastRetry | None:
    """A last-retry record; one that does not decode (another version's, or damaged) is shown as none rather
    than failing the job's whole answer."""
    if not raw:
        return None
    try:
        return msgspec.msgpack.decode(raw, type=LastRetry)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


async def locate(redis: Redis, job_id: str, *, unconfirmed_after: float = 86400.0) -> JobState:
    """Where ``job_id`` is now, with its delivery record when it has one (see the module's table)."""
    now = time.time()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.exists(in_progress_key_prefix + job_id)
        pipe.zscore(default_queue_name, job_id)
        pipe.get(retry_key_prefix + job_id)
        pipe.get(keys.last_retry(job_id))
        pipe.get(keys.replayed_as(job_id))
        pipe.get(keys.replay_of(job_id))
        running, score, tries_raw, last_raw, as_raw, of_raw = await pipe.execute()
    info: Any = None
    unreadable: str | None = None
    try:
        info = await Job(job_id, redis, _deserializer=deserialize).info()
    except SerializationError as exc:  # a job its producer enqueued with another serializer
        cause = exc.__cause__
        unreadable = str(cause) if cause is not None else str(exc)
    dead = await DeadLetters(redis).get(job_id)

    tries = int(tries_raw) if tries_raw and tries_raw.isdigit() else 0
    last = _last_retry(last_raw)
    common: dict[str, Any] = {
        "job_id": job_id,
        "replay_of": of_raw.decode(errors="replace") if of_raw else None,
        "replayed_as": as_raw.decode(errors="replace") if as_raw else None,
    }
    if info is not None:
        common["function"] = info.function
        common["enqueued_at"] = info.enqueue_time.timestamp()
    kwargs = info.kwargs if info is not None else None
    origin = await _origin(redis, job_id, kwargs)
    if origin != job_id:
        common["delivery_of"] = origin
    record = await delivery(redis, origin, unconfirmed_after=unconfirmed_after)
    common["delivery"] = record
    age = now - common["enqueued_at"] if "enqueued_at" in common else None

    if isinstance(info, JobResult):
        finished: dict[str, Any] = {"job_try": info.job_try, "finished_at": info.finish_time.timestamp()}
        if info.success:
            return JobState(state="succeeded", **finished, **common)
        if dead is not None:
            return JobState(state="dead_lettered", error_type=dead.error_type, error=dead.error, **finished, **common)
        error_type, error = _error_fields(info.result)
        state: State = "replayed" if common["replayed_as"] else "failed"
        return JobState(state=state, error_type=error_type, error=error, **finished, **common)
    if running:
        return JobState(state="running", job_try=tries or None, age=age, last_retry=last, **common)
    if score is not None:
        due = score / 1000
        if unreadable is not None:
            return JobState(state="queued", error_type="UndecodableJobError", error=unreadable, due_at=due, **common)
        if tries > 0:
            return JobState(state="retrying", job_try=tries, due_at=due, age=age, last_retry=last, **common)
        if due > now:
            return JobState(state="deferred", due_at=due, age=age, **common)
        ahead = await redis.zcount(default_queue_name, "-inf", f"({score}")
        return JobState(state="queued", position=int(ahead) + 1, due_at=due, age=age, **common)
    if dead is not None:
        return JobState(
            state="dead_lettered",
            error_type=dead.error_type,
            error=dead.error,
            job_try=dead.attempts,
            enqueued_at=dead.enqueued_at,
            finished_at=dead.failed_at,
            **{k: v for k, v in common.items() if k != "enqueued_at"},
        )
    if common["replayed_as"]:
        return JobState(state="replayed", **common)
    if record is not None:
        return JobState(state="sent", **common)
    return JobState(state="unknown", **common)


async def replays(redis: Redis, job_id: str, *, unconfirmed_after: float = 86400.0) -> list[JobState]:
    """The replays that followed ``job_id``'s, oldest first (each :func:`locate`\\ d); empty when none."""
    found: list[JobState] = []
    current = job_id
    for _ in range(CHAIN_MAX):
        newer = await redis.get(keys.replayed_as(current))
        if newer is None:
            break
        current = newer.decode()
        found.append(await locate(redis, current, unconfirmed_after=unconfirmed_after))
    return found


def _at(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _retry(last: LastRetry) -> str:
    what = last.error_type
    if last.status is not None:
        what += f" (HTTP {last.status}"
        what += f", code {last.code}" if last.code is not None and last.code != last.status else ""
        what += f" on {last.endpoint})" if last.endpoint else ")"
    if not last.counted:
        return f"deferred by {what} (no attempt used)"
    return f"attempt {last.attempt} failed with {what}"


def describe(job: JobState, *, now: float | None = None) -> str:
    """One line: where the job is."""
    now = time.time() if now is None else now
    head = f"{job.job_id}: "
    age = f", enqueued {_span(job.age)} ago" if job.age is not None else ""
    if job.state == "queued" and job.error_type == "UndecodableJobError":
        line = f"queued but unreadable: {job.error}"
    elif job.state == "queued":
        line = f"queued, position {job.position}{age}"
    elif job.state == "deferred":
        assert job.due_at is not None
        line = f"deferred until {_at(job.due_at)} (in {_span(job.due_at - now)}){age}"
    elif job.state == "running":
        line = f"running (try {job.job_try or 1}){age}"
        if job.last_retry is not None:
            line += f"; before it, {_retry(job.last_retry)}"
    elif job.state == "retrying":
        assert job.due_at is not None
        assert job.job_try is not None
        last = job.last_retry
        why = _retry(last) if last is not None and last.job_try == job.job_try else ""
        if not why:  # arq re-queues a try its worker stopped (SIGTERM, a cancelled task), counted as a try
            why = f"try {job.job_try} was interrupted (its worker stopped)"
            why += f"; before it, {_retry(last)}" if last is not None else ""
        when = f"due {_at(job.due_at)} (in {_span(job.due_at - now)})" if job.due_at > now else "due now"
        line = f"retrying: {why}; try {job.job_try + 1} {when}{age}"
    elif job.state == "succeeded":
        assert job.finished_at is not None
        line = f"succeeded (try {job.job_try}, finished {_at(job.finished_at)})"
    elif job.state == "sent":
        line = "finished; arq no longer holds its result, its delivery record follows"
    elif job.state == "failed":
        line = f"failed: {job.error_type}: {job.error}"
    elif job.state == "dead_lettered":
        tries = f" after {job.job_try} attempt{'' if job.job_try == 1 else 's'}" if job.job_try else ""
        line = f"failed and dead-lettered{tries}: {job.error_type}: {job.error}"
    elif job.state == "replayed":
        failed = f" ({job.error_type}: {job.error})" if job.error_type else ""
        line = f"failed{failed}, replayed as {job.replayed_as}"
    else:
        line = (
            "unknown: no queued, running or finished job, dead letter or delivery record has this id (arq keeps"
            " results WORKER_KEEP_RESULT s, delivery records last 7 days)"
        )
    if job.replay_of:
        line += f" (replay of {job.replay_of})"
    return head + line
