"""The ``whatsapp_send`` job: validate, resolve the contact, send once, and decide retries.

Valid payloads (anything else fails at once with :class:`InvalidJobError`, before any network call):

=============================  ==========================================================================
fields given                   what is sent
=============================  ==========================================================================
``message``                    a WhatsApp text (at most 4096 characters)
``template`` [+ ``variables``] the template's flow; variables are written to the contact's custom fields
  [+ ``message``]              first. ``message`` is the fallback text if the template maps to no flow
``fileUrl`` + ``fileType``     a file (``image``, ``document``, ``video``, ``audio``; http(s) URL only)
  [+ ``message``]              then the text, as a second message (CGB's send/file has no caption)
``whatsappTemplate``           a Meta-approved template through CGB's ``send_content`` (:func:`template_message`)
  [+ ``message``]              the text instead, when the contact's 24-hour window is known to be open; if
                               WhatsApp then fails it with 131047 the receiver sends the template (once)
=============================  ==========================================================================

``to`` is always required; ``firstName``, ``lastName`` and ``email`` are used only when the contact has
to be created. ``variables`` need a ``template``, and a template cannot carry a file. Unknown fields,
wrong types and unknown ``fileType`` values are rejected by the :class:`~cgb_worker.models.SendJob` Struct.

Retries: a retryable error (transport, timeout, 429, 5xx, a busy lock, a Redis error) raises ``arq.Retry``
with full-jitter exponential backoff, ``uniform(0, min(CGB_RETRY_MAX_DELAY, CGB_RETRY_BASE_DELAY * 2 ** (try - 1)))``,
never shorter than CGB's ``Retry-After``; each retry and deferral is recorded for ``cgb-worker status``
(:func:`cgb_worker.jobstate.record_retry`: the error's class, status and code, no message). After
``CGB_RETRY_ATTEMPTS`` retries, or at once for a permanent error, the job fails with the real error (stored
for ``Job.result()`` and in the dead-letter store). Each try stops itself 30 s (or a quarter of a short
timeout) before arq's ``job_timeout`` and counts as a retryable timeout, so arq's own timeout, which is never
retried, is not reached. Deferrals by the
fleet-wide rate limit (:mod:`cgb_worker.ratelimit`) are not failures and use up no attempt.

The 24-hour window (:mod:`cgb_worker.deliveries`) is read with the contact cache, in the same command, and
goes into the result (``window``). With ``CGB_OUTSIDE_WINDOW=fail``, free text or a file to a contact whose
window is known to be closed fails at once with :class:`OutsideWindowError`, before any CGB call.

While a webhook receiver is deployed, one message per person is open at a time (:mod:`cgb_worker.sends`,
"turns"): a step that finds another message to the same person still waiting for its first status is not
sent; the job is deferred about a second (:class:`~cgb_worker.errors.TurnBusyError`), which, like a rate-limit
deferral, uses up no attempt. A job's file and its text therefore go out one after the other.

Sends are never repeated once CGB acknowledged them (:mod:`cgb_worker.sends`); the send log is read on every
try, the first included, so a job id enqueued again after arq forgot it returns its stored result. When an
earlier try of the same job may have sent (it timed out after the request left, or the worker died between sending and
recording the answer), ``CGB_UNKNOWN_OUTCOME`` decides: ``resend`` (the default: the message goes out
again, so the recipient may get it twice, and the result says ``possibleDuplicate: true``) or ``fail``
(the job fails with :class:`SendOutcomeUnknownError` and lands in the dead-letter store for a person to
decide; nothing is sent twice, but a message may be lost). Contact creation and field writes are safe
to repeat and are simply repeated.

Expiry and quiet hours. A job with ``expiresAt`` is not sent at or after it: a try that starts past it, and
every send step about to leave past it (the check is in the step's mark, the last thing before the request,
so first tries, retries, deferrals, replays, fallback templates and automatic resends are all covered), fails
with :class:`ExpiredError`, before any further CGB call. With ``QUIET_HOURS`` set, a job whose category is in
``QUIET_HOURS_CATEGORIES`` and whose recipient is in quiet hours (:mod:`cgb_worker.quiet`) is deferred, before
any CGB call, to the first minute after them (:class:`QuietHoursError`, a deferral that uses up no attempt),
or fails at once with :class:`ExpiredError` when its ``expiresAt`` would pass by then. Quiet hours are checked
once, when a try starts: a try lasts seconds, so one that starts just before quiet hours may send a minute
into them.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import msgspec
from arq import Retry
from loguru import logger
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import keys, sealed
from .catalog import TemplateCatalog, check_template
from .client import BeforeSend, CGBClient
from .contacts import ContactResolver, ResolvedContact, decode_cached
from .deadletters import DeadLetters
from .errors import (
    CGBNotFoundError,
    CGBRateLimitError,
    CGBTimeoutError,
    CGBWorkerError,
    ExpiredError,
    InvalidJobError,
    OutsideWindowError,
    QuietHoursError,
    SendOutcomeUnknownError,
    StoreUnavailableError,
    SuppressedError,
    ThrottledError,
    TurnBusyError,
    UndeliverableError,
)
from .jobstate import last_retry_of, record_retry
from .locks import redis_lock
from .metrics import Metrics
from .models import Category, FileType, Scalar, SendJob, SendResult, SetFieldValue, WhatsAppTemplate
from .phones import mask_phone, normalize_phone
from .quiet import quiet_until
from .ratelimit import reset_deadline, set_deadline
from .sends import OF, RESULT, RS, SENDING, SENT, SendLog, StepRecord, nothing_sent
from .sends import TTL as SEND_LOG_TTL
from .series import Recorder
from .settings import Settings, job_deadline
from .suppression import Entry, refusal
from .templates import TemplateResolver
from .whatsapp_errors import base_step, chain, next_step
from .window import Window, job_keys, window_state

MAX_TEXT = 4096
MAX_URL = 2048
MAX_NAME = 256
MAX_VARIABLES = 50
ARQ_MAX_TRIES = 1000
"""arq's own limit, kept far above ``CGB_RETRY_ATTEMPTS`` (at most 100) so that the job, not arq, decides
when to stop: arq's "max retries exceeded" would hide the real error."""

TURN_WAIT_MAX = 8.0
"""The longest deferral, in seconds, of a job waiting for its person's turn: 1,000 tries cover over two hours."""

Kind = Literal["text", "template", "file", "whatsapp_template"]
STEPS = ("text", "file", "flow", "whatsapp_template")
"""The send steps a job's record names (an automatic resend adds ``~<n>``)."""
_result_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class Plan:
    """A payload that passed validation."""

    kind: Kind
    to: str
    message: str | None = None
    template: str | None = None
    variables: dict[str, Scalar] = field(default_factory=dict)
    file_url: str | None = None
    file_type: FileType | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    whatsapp_template: WhatsAppTemplate | None = None
    category: Category | None = None
    """As the job gave it; :func:`category_of` fills in the default."""
    expires_at: datetime | None = None


def category_of(plan: Plan, catalog: TemplateCatalog | None) -> Category:
    """The job's category: as given; else a native template's catalog ``category``, else ``utility``; a flow
    template ``utility``; a text or a file ``service``."""
    if plan.category is not None:
        return plan.category
    if plan.kind == "whatsapp_template":
        assert plan.whatsapp_template is not None
        entry = catalog.templates.get(plan.whatsapp_template.name) if catalog is not None else None
        return cast("Category", entry.category) if entry is not None and entry.category else "utility"
    return "utility" if plan.kind == "template" else "service"


def validate(raw: Any, *, default_region: str | None = None) -> Plan:
    """Check a payload and normalise its phone; :class:`InvalidJobError` names the first problem found."""
    if isinstance(raw, SendJob):
        raw = msgspec.to_builtins(raw)
    if not isinstance(raw, dict):
        raise InvalidJobError(f"payload must be a mapping of fields, got {type(raw).__name__}")
    variables = raw.get("variables")
    if variables is not None:
        if not isinstance(variables, dict):
            raise InvalidJobError("variables must be a mapping of names to values")
        for name, value in variables.items():
            if not isinstance(name, str) or not name.strip():
                raise InvalidJobError("variables must have non-empty string names")
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise InvalidJobError(
                    f"variables must be a flat mapping of scalars: {name[:40]!r} is a {type(value).__name__}"
                )
    try:
        job = msgspec.convert(raw, SendJob)
    except msgspec.ValidationError as exc:
        raise InvalidJobError(f"invalid payload: {exc}") from None

    to = normalize_phone(job.to, default_region)
    message = job.message
    if message is not None:
        if not message.strip():
            raise InvalidJobError("message is empty")
        if len(message) > MAX_TEXT:
            raise InvalidJobError(f"message is {len(message)} characters; WhatsApp allows {MAX_TEXT}")
    for name, value in (("firstName", job.first_name), ("lastName", job.last_name), ("email", job.email)):
        if value is not None and len(value) > MAX_NAME:
            raise InvalidJobError(f"{name} is longer than {MAX_NAME} characters")
    if job.email is not None and "@" not in job.email:
        raise InvalidJobError("email is not an email address")
    vars_ = dict(job.variables or {})
    if len(vars_) > MAX_VARIABLES:
        raise InvalidJobError(f"{len(vars_)} variables; at most {MAX_VARIABLES}")
    if any(isinstance(v, str) and len(v) > MAX_TEXT for v in vars_.values()):
        raise InvalidJobError(f"a variable's value is longer than {MAX_TEXT} characters")

    has_file = job.file_url is not None or job.file_type is not None
    common = {
        "to": to,
        "first_name": job.first_name,
        "last_name": job.last_name,
        "email": job.email,
        "category": job.category,
        "expires_at": _expiry(job.expires_at),
    }
    if job.whatsapp_template is not None:
        if job.template is not None or vars_ or has_file:
            raise InvalidJobError("whatsappTemplate cannot be combined with template, variables or fileUrl")
        _check_wa_template(job.whatsapp_template)
        return Plan("whatsapp_template", message=message, whatsapp_template=job.whatsapp_template, **common)  # type: ignore[arg-type]
    if job.template is not None:
        if has_file:
            raise InvalidJobError("a template cannot be combined with a file")
        if not job.template.strip() or len(job.template) > MAX_NAME:
            raise InvalidJobError("template must be a name of 1 to 256 characters")
        return Plan("template", message=message, template=job.template.strip(), variables=vars_, **common)  # type: ignore[arg-type]
    if vars_:
        raise InvalidJobError("variables need a template")
    if has_file:
        if job.file_url is None:
            raise InvalidJobError("fileType needs a fileUrl")
        if job.file_type is None:
            raise InvalidJobError("fileUrl needs a fileType (image, document, video or audio)")
        _check_url(job.file_url)
        return Plan("file", message=message, file_url=job.file_url, file_type=job.file_type, **common)  # type: ignore[arg-type]
    if message is None:
        raise InvalidJobError("no content: give message, template, or fileUrl with fileType")
    return Plan("text", message=message, **common)  # type: ignore[arg-type]


def _expiry(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidJobError(f"expiresAt is not an ISO 8601 time: {value[:40]!r}") from None
    if at.tzinfo is None:
        raise InvalidJobError("expiresAt needs an offset (such as Z or +02:00): a local time is ambiguous")
    try:
        return at.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 pushed past the calendar by its offset
        raise InvalidJobError(f"expiresAt is out of range: {value[:40]!r}") from None


MAX_BUTTONS = 10


def _check_wa_template(t: WhatsAppTemplate) -> None:
    """The shape of a native template, as far as it can be checked without the account's catalog."""
    if not t.name.strip() or len(t.name) > 512:
        raise InvalidJobError("whatsappTemplate.name must be a template name of 1 to 512 characters")
    if not t.language.strip() or len(t.language) > 16:
        raise InvalidJobError(f"whatsappTemplate {t.name!r}: language must be a code such as 'he' or 'en_US'")
    if t.header is not None:
        kinds = t.header.kinds
        if len(kinds) != 1:
            raise InvalidJobError(
                f"whatsappTemplate {t.name!r}: header must be exactly one of text, image, video or document"
            )
        media = t.header.media
        if media is not None:
            _check_url(media.url, f"whatsappTemplate {t.name!r}: the {kinds[0]} header's url")
            if media.filename is not None and kinds[0] != "document":
                raise InvalidJobError(f"whatsappTemplate {t.name!r}: only a document header takes a filename")
    seen: set[int] = set()
    for button in t.buttons or []:
        if not 0 <= button.index < MAX_BUTTONS or button.index in seen:
            raise InvalidJobError(f"whatsappTemplate {t.name!r}: button indexes must be distinct, from 0 to 9")
        seen.add(button.index)
        if (button.url is None) == (button.payload is None):
            raise InvalidJobError(
                f"whatsappTemplate {t.name!r}: button {button.index} needs a url suffix or a payload, not both"
            )


def template_message(to: str, t: WhatsAppTemplate) -> dict[str, Any]:
    """The Cloud API template object CGB's ``send_content`` takes, for E.164 ``to``; empty components are left
    out."""
    components: list[dict[str, Any]] = []
    if t.header is not None:
        media = t.header.media
        if media is None:
            components.append({"type": "header", "parameters": [{"type": "text", "text": t.header.text}]})
        else:
            kind = t.header.kinds[0]
            obj: dict[str, str] = {"link": media.url}
            if media.filename is not None:
                obj["filename"] = media.filename
            components.append({"type": "header", "parameters": [{"type": kind, kind: obj}]})
    if isinstance(t.body, dict) and t.body:
        parameters = [{"type": "text", "parameter_name": k, "text": v} for k, v in t.body.items()]
        components.append({"type": "body", "parameters": parameters})
    elif isinstance(t.body, list) and t.body:
        components.append({"type": "body", "parameters": [{"type": "text", "text": v} for v in t.body]})
    for button in sorted(t.buttons or [], key=lambda b: b.index):
        if button.url is not None:
            sub_type, parameter = "url", {"type": "text", "text": button.url}
        else:
            sub_type, parameter = "quick_reply", {"type": "payload", "payload": str(button.payload)}
        components.append(
            {"type": "button", "sub_type": sub_type, "index": str(button.index), "parameters": [parameter]}
        )
    template: dict[str, Any] = {"name": t.name, "language": {"code": t.language}}
    if components:
        template["components"] = components
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to.lstrip("+"),
        "type": "template",
        "template": template,
    }


def _check_url(url: str, what: str = "fileUrl") -> None:
    if len(url) > MAX_URL:
        raise InvalidJobError(f"{what} is longer than {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise InvalidJobError(f"{what} must be an http:// or https:// URL")


def retry_delay(
    job_try: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Full-jitter exponential backoff for the try that just failed; ``retry_after`` is a floor."""
    delay: float = rand() * min(cap, base * float(2 ** max(0, job_try - 1)))
    return max(delay, retry_after) if retry_after is not None else delay


def utc_now() -> datetime:
    """The time expiry and quiet hours are judged by (``Services.clock``)."""
    return datetime.now(UTC)


def _utc(at: datetime) -> str:
    """An aware time in UTC to the second, as ``2026-11-26T14:32:20Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class Services:
    """What the job needs, built once in the worker's ``on_startup`` and kept in ``ctx["cgb"]``."""

    settings: Settings
    redis: Redis
    client: CGBClient
    contacts: ContactResolver
    templates: TemplateResolver
    sends: SendLog
    dead_letters: DeadLetters
    metrics: Metrics | None = None
    recorder: Recorder | None = None
    """The console's counts and person index, written in batches (:mod:`cgb_worker.series`)."""
    clock: Callable[[], datetime] = field(default=utc_now)
    """Now, as an aware datetime: what ``expiresAt`` and quiet hours are judged by (a test may give its own)."""

    def expired(self, reason: str, message: str) -> ExpiredError:
        """The error for a job refused for its ``expiresAt``, counted (``reason``: ``passed`` or ``quiet_hours``)."""
        if self.metrics is not None:
            self.metrics.expired.labels(reason).inc()
        return ExpiredError(message)


async def whatsapp_send(
    ctx: dict[str, Any],
    payload: Any = None,
    *,
    replay_of: str | None = None,
    fallback_of: str | None = None,
    resend_of: str | None = None,
    resend_step: str | None = None,
    resend_code: int | None = None,
    **fields: Any,
) -> SendResult:
    """Send one WhatsApp message. ``payload`` is a dict or a :class:`SendJob`; keyword fields work too.

    ``replay_of`` is set by a dead-letter replay: the id of the job whose send record this one continues.
    ``fallback_of`` is set by the webhook receiver: the id of the job whose text WhatsApp failed with 131047,
    whose delivery record the template this job sends joins. ``resend_of``, ``resend_step`` and ``resend_code``
    are set by the receiver too, for an automatic resend (:mod:`cgb_worker.whatsapp_errors`): the job, its step
    that WhatsApp failed and the code; the payload is that job's own, kept sealed in its record, and the step
    goes into the same record under its next name (``text~1``)."""
    services: Services = ctx["cgb"]
    settings = services.settings
    job_id: str = ctx["job_id"]
    job_try: int = ctx["job_try"]
    raw: Any = payload if payload is not None else fields
    started = time.monotonic()
    deadline = job_deadline(settings.worker.job_timeout)
    event = _Event()
    attempt = job_try  # arq's try count, less the rate-limit deferrals (read only when there were tries)
    log = logger.bind(job_id=job_id, job_try=job_try)
    token = set_deadline(started + deadline)
    try:
        if job_try > 1:
            attempt -= await _throttled(services, job_id)
        if payload is not None and fields:
            raise InvalidJobError("give the payload as one mapping or as keyword fields, not both")
        if replay_of is not None and (not isinstance(replay_of, str) or not 0 < len(replay_of) <= MAX_NAME):
            raise InvalidJobError("replay_of must be the id of the job being replayed")
        if fallback_of is not None and (not isinstance(fallback_of, str) or not 0 < len(fallback_of) <= MAX_NAME):
            raise InvalidJobError("fallback_of must be the id of the job whose text failed")
        resend: tuple[str, int] | None = None
        if resend_of is not None:
            resend = _check_resend(resend_of, resend_step, resend_code)
            raw = await _resend_payload(services, resend_of, resend, job_id)
        try:
            async with asyncio.timeout(deadline):
                result = await _send(
                    services,
                    replay_of or job_id,
                    attempt,
                    raw,
                    log,
                    event,
                    replay=bool(replay_of),
                    fallback_of=fallback_of or resend_of,
                    resend=resend,
                    job_id=job_id,
                    enqueued_ms=_enqueued_ms(ctx),
                )
        except TimeoutError:
            raise CGBTimeoutError(f"the job did not finish within {deadline:.0f} s") from None
        except RedisError as exc:
            raise StoreUnavailableError(f"Redis failed during the job: {type(exc).__name__}") from exc
    except ThrottledError as exc:
        if job_try >= ARQ_MAX_TRIES:
            # arq drops a job picked up past its tries ("max retries exceeded", no dead letter): fail it here,
            # with its own error, while it can still be kept for a person to replay.
            await _dead_letter(services, ctx, raw, exc, attempt, origin=replay_of or job_id)
            event.finish(log, started, "failed", type(exc).__name__).error(
                "failed after {} deferrals: {}: {}", job_try, type(exc).__name__, exc
            )
            if services.metrics is not None:
                services.metrics.job_done(event.kind, "failed")
            raise
        # Our own rate limit had no slot within this try: not a failure, and no retry is used up. If Redis
        # cannot count the deferral, the job is deferred all the same and this try counts as an attempt.
        try:
            async with services.redis.pipeline(transaction=False) as pipe:
                pipe.incr(_throttle_key(job_id))
                pipe.expire(_throttle_key(job_id), 86400)
                if type(exc) is ThrottledError:  # the rate limit's backlog (not a turn, not quiet hours)
                    _wait_for_the_rate(pipe, job_id, ctx.get("score"))
                else:  # waiting for its person or for the morning is no lag of the queue's
                    pipe.zrem(keys.RATE_WAITING, job_id)
                await pipe.execute()
        except RedisError as store_error:
            log.warning("could not count a deferral: {}", type(store_error).__name__)
        delay = exc.retry_after or 1.0
        if isinstance(exc, TurnBusyError):
            # About a second while the person's previous message awaits its first status; longer the longer a
            # job has waited (a queue of messages to one person), so that waiting does not use up arq's tries.
            delay *= min(TURN_WAIT_MAX, 1.15 ** min(job_try - 1, 40)) * random.uniform(1.0, 1.25)  # noqa: S311
        await record_retry(
            services.redis, job_id, last_retry_of(exc, attempt=attempt, job_try=job_try, retry_in=delay, counted=False)
        )
        if isinstance(exc, QuietHoursError):
            # Exactly to the first minute after the recipient's quiet hours, however many hours away.
            event.finish(log, started, "throttled", type(exc).__name__).info("{}; deferred {:.0f}s", exc, delay)
            raise Retry(defer=delay) from exc
        waiting = isinstance(exc, TurnBusyError)
        event.finish(log, started, "throttled", type(exc).__name__).info(
            "{}; deferred {:.1f}s", "waiting for the person's turn" if waiting else "throttled", delay
        )
        raise Retry(defer=delay) from exc
    except Exception as exc:
        error_class = type(exc).__name__
        if isinstance(exc, CGBWorkerError) and exc.retryable and attempt <= settings.retry_attempts:
            delay = retry_delay(
                attempt,
                base=settings.retry_base_delay,
                cap=settings.retry_max_delay,
                retry_after=exc.retry_after if isinstance(exc, CGBRateLimitError) else None,
            )
            event.finish(log, started, "retry", error_class).warning(
                "attempt {} failed with {}: {}; retrying in {:.1f}s", attempt, error_class, exc, delay
            )
            if services.metrics is not None:
                services.metrics.retries.labels(error_class).inc()
            await record_retry(
                services.redis,
                job_id,
                last_retry_of(exc, attempt=attempt, job_try=job_try, retry_in=delay, counted=True),
            )
            raise Retry(defer=delay) from exc
        if resend_of is not None and isinstance(resend_step, str) and _is_the_resend(job_id, resend_of, resend_step):
            await _drop_resend_flag(services, resend_of, resend_step)
        await _dead_letter(services, ctx, raw, exc, attempt, origin=replay_of or job_id)
        event.finish(log, started, "failed", error_class).error(
            "failed after {} attempt{}: {}: {}", attempt, "" if attempt == 1 else "s", error_class, exc
        )
        if services.metrics is not None:
            services.metrics.job_done(event.kind, "failed")
        raise
    finally:
        reset_deadline(token)
    if not result.success:  # an automatic resend that was no longer needed
        event.finish(log, started, "skipped", None).info("not sent: {}", result.error)
        if services.metrics is not None:
            services.metrics.job_done(result.kind or event.kind, "skipped")
        return result
    event.finish(log, started, "sent", None).info(
        "sent {} to {}{}",
        result.kind,
        mask_phone(result.to),
        " (possible duplicate)" if result.possible_duplicate else "",
    )
    if services.metrics is not None:
        services.metrics.job_done(result.kind or event.kind, "sent")
    return result


_throttle_key = keys.throttled


def _step_kind(step: str, kind: Kind) -> Kind:
    """What an automatic resend of ``step`` sends: a file job's text is a text."""
    return "text" if base_step(step) == "text" else kind


def _is_the_resend(job_id: str, resend_of: str, step: str) -> bool:
    """Whether ``job_id`` is the id the receiver gives the resend of ``step`` of ``resend_of``."""
    return job_id == f"{resend_of}:resend:{next_step(step)}"


async def _drop_resend_flag(services: Services, resend_of: str, step: str) -> None:
    """A resend that will not go out (refused for good): the record no longer says one is on its way."""
    try:
        await services.redis.hdel(keys.sends(resend_of), f"r:{step}")  # type: ignore[misc]
    except RedisError as exc:
        logger.warning("could not clear a resend's flag: {}", type(exc).__name__)


def delivered_since(state: bytes) -> bool:
    """Whether a step's delivery record (``d:<step>``) says WhatsApp delivered it (or more)."""
    status = msgspec.json.decode(state).get("status")
    return status in ("delivered", "read", "played")


def _check_resend(resend_of: Any, step: Any, code: Any) -> tuple[str, int]:
    if not isinstance(resend_of, str) or not 0 < len(resend_of) <= MAX_NAME:
        raise InvalidJobError("resend_of must be the id of the job whose step is sent again")
    if not isinstance(step, str) or base_step(step) not in STEPS:
        raise InvalidJobError("resend_step must name the step that failed (text, file, flow or whatsapp_template)")
    if not isinstance(code, int) or isinstance(code, bool):
        raise InvalidJobError("resend_code must be WhatsApp's error code")
    return step, code


async def _resend_payload(services: Services, job_id: str, resend: tuple[str, int], own_id: str) -> Any:
    """The payload of the job whose step is sent again, unsealed from its record. The resend's own send log says
    what it is (``rs``), so that a replay of it from the dead-letter store, which carries the payload alone, is
    that resend again."""
    step, code = resend
    async with services.redis.pipeline(transaction=False) as pipe:
        pipe.hget(keys.sends(job_id), f"p:{step}")
        pipe.hset(keys.sends(own_id), RS.decode(), f"{job_id}|{step}|{code}")
        pipe.expire(keys.sends(own_id), SEND_LOG_TTL)
        stored, *_ = await pipe.execute()
    payload = sealed.unseal(stored) if stored else None
    if payload is None:
        raise InvalidJobError(f"the {step} of job {job_id[:80]} is no longer kept (or was sealed under another key)")
    return msgspec.json.decode(payload)


def _wait_for_the_rate(pipe: Any, job_id: str, due_ms: Any) -> None:
    """Note a job deferred by the rate limit, by when it first fell due (arq's score for this try: a job
    scheduled for later is no lag before its time), for the queue's age gauge (no round trip of its own: it
    rides the deferral's pipeline). Kept a day at most."""
    now_ms = int(time.time() * 1000)
    since_ms = min(int(due_ms), now_ms) if isinstance(due_ms, int | float) else now_ms
    pipe.zadd(keys.RATE_WAITING, {job_id: since_ms}, nx=True)
    pipe.zremrangebyscore(keys.RATE_WAITING, "-inf", now_ms - 86_400_000)
    pipe.expire(keys.RATE_WAITING, 86400)


async def _throttled(services: Services, job_id: str) -> int:
    """How many of this job's tries were rate-limit deferrals (they do not count as attempts)."""
    try:
        return int(await services.redis.get(_throttle_key(job_id)) or 0)
    except RedisError:
        return 0


@dataclass(slots=True)
class _Event:
    """What the one log line per job event carries (and what the JSON log shows as fields)."""

    kind: str = "invalid"

    def finish(self, log: Any, started: float, outcome: str, error_class: str | None) -> Any:
        return log.bind(
            event="job",
            kind=self.kind,
            outcome=outcome,
            error_class=error_class,
            elapsed_ms=round((time.monotonic() - started) * 1000, 1),
        )


def _enqueued_ms(ctx: dict[str, Any]) -> int | None:
    enqueued = ctx.get("enqueue_time")
    return int(enqueued.timestamp() * 1000) if isinstance(enqueued, datetime) else None


async def _dead_letter(
    services: Services, ctx: dict[str, Any], raw: Any, exc: BaseException, attempts: int, *, origin: str
) -> None:
    enqueued = ctx.get("enqueue_time")
    try:
        await services.dead_letters.add(
            job_id=ctx["job_id"],
            function="whatsapp_send",
            payload=raw,
            error=exc,
            attempts=attempts,
            enqueued_at=enqueued.timestamp() if isinstance(enqueued, datetime) else None,
            origin=origin,
        )
    except Exception as store_error:  # the job's own error matters more than the bookkeeping
        logger.error("could not record a dead letter: {}", type(store_error).__name__)


async def _send(
    services: Services,
    log_id: str,
    attempt: int,
    raw: Any,
    log: Any,
    event: _Event,
    *,
    replay: bool = False,
    fallback_of: str | None = None,
    resend: tuple[str, int] | None = None,
    job_id: str | None = None,
    enqueued_ms: int | None = None,
) -> SendResult:
    settings = services.settings
    plan = validate(raw, default_region=settings.default_region)
    event.kind = plan.kind
    if fallback_of is not None and resend is None and (plan.kind != "whatsapp_template" or plan.message is not None):
        raise InvalidJobError("a fallback job sends a whatsappTemplate alone")
    if plan.whatsapp_template is not None and settings.wa_templates is not None:
        check_template(plan.whatsapp_template, settings.wa_templates)  # before any CGB call
    redis = services.redis
    cache_key = services.contacts.cache_key(plan.to)
    # The send log (first try included: a producer may enqueue a job id again after arq forgot it), the contact
    # (unless this worker has it in memory), the window, the receiver's lease, the person's turn, their opt-outs
    # and whether they can receive: one round trip.
    known: Any = services.contacts.seen(plan.to)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.sends(log_id))
        pipe.mget(job_keys(plan.to) if known is not None else [*job_keys(plan.to), cache_key])
        if resend is not None and fallback_of is not None:
            # every earlier send of the step, as they stand now, and the receiver's word that it asked for this one
            pipe.hmget(keys.sends(fallback_of), [*(f"d:{name}" for name in chain(resend[0])), f"r:{resend[0]}"])
        answers = await pipe.execute()
    if job_id is not None and services.recorder is not None:  # the console's find-by-number, written in batches
        services.recorder.index(keys.who(plan.to), job_id, enqueued_ms or int(time.time() * 1000))
    record, (window, since, tracking, turn, suppressed, undeliverable, *rest), *resent = answers
    cached_contact: Any = known if known is not None else rest[0]
    if RESULT in record:
        # This job already finished (the worker died before arq stored the result): no CGB call at all.
        return msgspec.msgpack.decode(record[RESULT], type=SendResult)
    if resend is not None and fallback_of is not None and resent:
        *states, asked = resent[0]
        new_step = next_step(resend[0])
        if not replay and (asked != new_step.encode() or not _is_the_resend(log_id, fallback_of, resend[0])):
            # only the receiver's own resend (or a person's replay of one) may send a job's kept payload again
            raise InvalidJobError(f"job {fallback_of[:80]} has no resend of its {resend[0][:40]} queued as this job")
        delivered = next(
            (name for name, state in zip(chain(resend[0]), states, strict=True) if state and delivered_since(state)),
            None,
        )
        if delivered is not None:
            # With several devices WhatsApp can report failed on one and delivered on another, in either order: a
            # message delivered anywhere was delivered, and is not sent again.
            await redis.hdel(keys.sends(fallback_of), f"r:{resend[0]}")  # type: ignore[misc]
            return SendResult(
                success=False,
                contact_id=None,
                to=plan.to,
                timestamp=_now(),
                kind=_step_kind(resend[0], plan.kind),
                error=f"not sent again: the {delivered} it would replace was delivered after all",
                category=category_of(plan, settings.wa_templates),
            )
    category = category_of(plan, settings.wa_templates)
    now = services.clock()
    if plan.expires_at is not None and now >= plan.expires_at:
        raise services.expired("passed", f"the job expired at {_utc(plan.expires_at)} (expiresAt): not sent")
    if (refused := refusal(suppressed, category)) is not None:
        raise _suppressed(services, log, plan.to, refused, category)
    if undeliverable is not None:
        raise UndeliverableError(
            "WhatsApp said this number cannot receive messages (131026); not sending until UNDELIVERABLE_TTL passes"
        )
    _check_quiet_hours(services, plan, category, now)
    if resend is None and RS in record:  # a replay of an automatic resend: the same resend again
        of, step, code = record[RS].decode().rsplit("|", 2)
        fallback_of, resend = of, (step, int(code))
    if fallback_of is None and OF in record:
        # A replay of a fallback template: it joins the original job's record, as the template itself did.
        fallback_of = record[OF].decode()
    window_now = window_state(window, since)
    run = _Run(
        services,
        log_id,
        attempt,
        record,
        log,
        replay=replay,
        to=plan.to,
        delivery_id=fallback_of or log_id,
        tracking=tracking is not None,
        window=window_now,
        turn=turn.decode() if turn else None,
        category=category,
        raw=raw,
        expires_at=plan.expires_at,
    )
    if resend is not None:
        run.resend(*resend)

    kind: Kind = plan.kind
    # With both a message and a whatsappTemplate: the text when the window is known to be open, the template
    # otherwise; a retry keeps to the choice an earlier try made, so that one job never sends both.
    if (
        plan.kind == "whatsapp_template"
        and plan.message is not None
        and (
            run.only == "text"
            or (
                run.only is None
                and (b"text" in record or (b"whatsapp_template" not in record and window_now == "open"))
            )
        )
    ):
        kind = "text"
        run.fallback = {"to": plan.to, "whatsappTemplate": msgspec.to_builtins(plan.whatsapp_template)}
        for key, given in (
            ("firstName", plan.first_name),
            ("lastName", plan.last_name),
            ("email", plan.email),
            ("category", plan.category),
            ("expiresAt", raw.get("expiresAt") if isinstance(raw, dict) else None),
        ):
            if given is not None:
                run.fallback[key] = given
    if fallback_of is not None and resend is None:
        run.fallback_for = "text"
    if kind in ("text", "file") and window_now == "closed" and settings.outside_window == "fail":
        raise OutsideWindowError(
            f"the contact's 24-hour window is closed: WhatsApp would drop this {kind} (131047); "
            "send a whatsappTemplate, or set CGB_OUTSIDE_WINDOW=send"
        )
    flow_id: str | None = None
    fields = _Fields()
    if plan.kind == "template":
        assert plan.template is not None
        flow_id = await services.templates.flow_id(plan.template)
        if flow_id is None:
            if plan.message is None:
                raise await services.templates.not_found(plan.template)
            log.warning("template {!r} not found: sending the fallback text", plan.template)
            kind = "text"
        else:
            for custom_field, value in await services.templates.fields_for(plan.variables):
                fields.writes.append(SetFieldValue(custom_field.name, value))
                fields.ids.append((custom_field.id, value))

    if kind == "template" and fields.ids and not run.sent("flow"):
        # Hold the phone's field lock from before the contact is resolved (or created, with the fields as
        # its actions) until the flow is sent, so that no other job's variables land in between: CGB
        # templates read the contact's fields when the flow runs.
        ttl = services.client.timeout * (len(fields.ids) + 4) + 5
        async with redis_lock(
            services.redis,
            keys.fields_lock(keys.who(plan.to)),
            ttl=ttl,
            wait=ttl,
            request_timeout=services.client.timeout,
        ):
            await _resolve_and_deliver(services, run, plan, kind, decode_cached(cached_contact), flow_id, fields)
    else:
        await _resolve_and_deliver(services, run, plan, kind, decode_cached(cached_contact), flow_id, fields)
    assert run.result is not None, "the last send step sets the result"
    return run.result


def _check_quiet_hours(services: Services, plan: Plan, category: Category, now: datetime) -> None:
    """Defer a job of a quiet category to the end of its recipient's quiet hours (:class:`QuietHoursError`), or fail
    it (:class:`ExpiredError`) when its ``expiresAt`` would pass by then: an ``expiresAt`` inside the quiet period
    wins. Checked once per try, before any CGB call (see the module's docstring)."""
    settings = services.settings
    quiet = settings.quiet_hours
    if quiet is None or category not in settings.quiet_categories:
        return
    wake = quiet_until(plan.to, quiet, now)
    if wake is None:
        return
    if plan.expires_at is not None and plan.expires_at <= wake:
        raise services.expired(
            "quiet_hours",
            f"the job would expire (expiresAt {_utc(plan.expires_at)}) during the recipient's quiet hours "
            f"({quiet} local, until {_utc(wake)}): not sent",
        )
    if services.metrics is not None:
        services.metrics.quiet_deferred.labels(category).inc()
    raise QuietHoursError(
        f"quiet hours for the recipient ({quiet} local) until {_utc(wake)}",
        retry_after=(wake - now).total_seconds(),
    )


def _suppressed(services: Services, log: Any, to: str, entry: Entry, category: Category) -> SuppressedError:
    """A job refused by the suppression list: counted, told in a log line (the number masked), and its error."""
    if services.metrics is not None:
        services.metrics.suppressed_job(entry.reason)
    log.bind(event="suppressed", scope=entry.scope, reason=entry.reason, category=category).warning(
        "not sending a {} message to {}: suppressed for {} ({})", category, mask_phone(to), entry.scope, entry.reason
    )
    return SuppressedError(entry.message(category))


async def _resolve_and_deliver(
    services: Services,
    run: _Run,
    plan: Plan,
    kind: Kind,
    cached: str | None,
    flow_id: str | None,
    fields: _Fields,
) -> None:
    by_phone = False
    for pass_ in (1, 2):
        contact = await services.contacts.resolve(
            plan.to,
            first_name=plan.first_name,
            last_name=plan.last_name,
            email=plan.email,
            actions=fields.writes,
            cached=cached,
            by_phone=by_phone,
        )
        if contact.unsubscribed and run.category != "authentication":
            # CGB says the contact unsubscribed (the resolver put them on the suppression list as it read them).
            entry = Entry("all", "cgb_unsubscribed", int(time.time() * 1000))
            raise _suppressed(services, run.log, plan.to, entry, run.category or "utility")
        try:
            await _deliver(services, run, plan, kind, contact, flow_id, fields)
            return
        except CGBNotFoundError:
            if pass_ == 2 or contact.created:
                raise
            # The id from the cache or from the phone's digits is not a contact CGB knows (deleted, merged,
            # or not a WhatsApp id): find the phone itself, once.
            run.log.warning("contact id not found in CGB: finding the phone instead")
            await services.contacts.forget(plan.to)
            cached, by_phone = None, True


@dataclass(slots=True)
class _Fields:
    """A template's variables: as ``set_field_value`` actions for a contact being created, and as
    (field id, value) writes for one that exists."""

    writes: list[SetFieldValue] = field(default_factory=list)
    ids: list[tuple[str, str | int | float]] = field(default_factory=list)


class _Run:
    """One try of one job: marks each send step immediately before its request leaves, records what
    CGB acknowledged, and builds the result."""

    def __init__(
        self,
        services: Services,
        log_id: str,
        attempt: int,
        record: dict[bytes, bytes],
        log: Any,
        *,
        replay: bool,
        to: str,
        delivery_id: str | None = None,
        tracking: bool = False,
        window: Window = "unknown",
        turn: str | None = None,
        category: Category | None = None,
        raw: Any = None,
        expires_at: datetime | None = None,
    ) -> None:
        self.services = services
        self.category = category
        self.expires_at = expires_at
        self.raw = raw
        self.only: str | None = None
        """For an automatic resend: the one step it sends, under :attr:`resent_as`."""
        self.resent_as: str | None = None
        self.resend_of: tuple[str, int] | None = None
        self.delivery_id = delivery_id or log_id
        self.tracking = tracking
        self.turn = turn
        """Who held the person's turn when the try began (:mod:`cgb_worker.sends`)."""
        self.window: Window = window
        self.fallback: dict[str, Any] | None = None
        self.fallback_for: str | None = None
        self.log_id = log_id
        self.attempt = attempt
        self.record = record
        self.log = log
        self.replay = replay
        self.possible_duplicate = False
        self.result: SendResult | None = None
        self.to = to

    def resend(self, step: str, code: int) -> None:
        """This try sends ``step`` of the delivery record again, under its next name, and nothing else."""
        self.only = base_step(step)
        self.resent_as = next_step(step)
        self.resend_of = (step, code)

    def name(self, step: str) -> str:
        return self.resent_as if self.resent_as is not None and step == self.only else step

    def sealed_payload(self) -> bytes | None:
        """The job's payload, sealed, for the receiver to send this step again (:mod:`cgb_worker.whatsapp_errors`)."""
        return sealed.seal(msgspec.json.encode(self.raw)) if self.raw is not None else None

    def sent(self, name: str) -> bool:
        return self.record.get(self.name(name).encode()) == SENT

    def check_expiry(self) -> None:
        """Refuse a step due at or after the job's ``expiresAt`` (:class:`ExpiredError`); nothing is sent."""
        if self.expires_at is not None and self.services.clock() >= self.expires_at:
            raise self.services.expired("passed", f"the job expired at {_utc(self.expires_at)} (expiresAt): not sent")

    def check_turn(self, name: str) -> None:
        """Another message to this person (this job's own file, before its text) awaits its first status: wait as a
        deferral, before a rate-limit slot is taken or a flow's fields are written."""
        name = self.name(name)
        if self.tracking and self.turn is not None and self.turn != f"{self.delivery_id}|{name}":
            raise TurnBusyError("another message to this person awaits its first status", retry_after=1.0)

    async def step(self, name: str, call: Callable[[BeforeSend], Awaitable[None]], final: SendResult | None) -> None:
        if self.only is not None and name != self.only:
            return  # an automatic resend sends the failed step alone
        name = self.name(name)
        state = self.record.get(name.encode())
        if state == SENT:
            return
        self.check_expiry()
        self.check_turn(name)
        if state == SENDING:
            # An earlier try may have sent this step. A replay is a person's decision to send it anyway.
            if self.services.settings.unknown_outcome == "fail" and not self.replay:
                raise SendOutcomeUnknownError(
                    f"an earlier try may have sent the {name} already (outcome unknown); not sending it again"
                )
            self.possible_duplicate = True
            self.log.warning("an earlier try may have sent the {} already: sending it again", name)
        sends = self.services.sends
        marked: StepRecord | None = None
        own = self.delivery_id == self.log_id
        new_record = (b"d:" + name.encode()) not in self.record if own else state is None

        async def mark() -> None:
            nonlocal marked
            self.check_expiry()  # the last moment before the request leaves: a rate-limit wait may have crossed it
            record = StepRecord(
                self.delivery_id,
                name,
                self.to,
                int(time.time() * 1000),
                self.tracking,
                open_ms=int((self.services.client.timeout + self.services.settings.turn_wait) * 1000),
                skew_ms=int(self.services.settings.clock_skew * 1000),
                fallback=self.fallback if base_step(name) == "text" else None,
                fallback_for=self.fallback_for,
                category=self.category,
                payload=self.sealed_payload() if self.tracking else None,
                resend_of=self.resend_of[0] if self.resend_of else None,
                resend_code=self.resend_of[1] if self.resend_of else None,
            )
            await sends.mark_sending(self.log_id, name, record, new_record=new_record)
            marked = record

        try:
            await call(mark)
        except Exception as exc:
            # Cleared only when the failure proves nothing went out, and no earlier try left it unknown; then only
            # this copy's place among the sends awaiting a status goes.
            if marked is not None and nothing_sent(exc):
                if state != SENDING:
                    await sends.clear(self.log_id, name, marked, new_record=new_record)
                else:
                    await sends.forget_copy(marked)
            raise
        assert marked is not None, "the client marks a step before its request leaves"
        self.turn = marked.ref if self.tracking else None
        encoded: bytes | None = None
        if final is not None:
            final = msgspec.structs.replace(
                final,
                possible_duplicate=self.possible_duplicate,
                timestamp=_now(),
                window=self.window,
                category=self.category,
            )
            self.result = final
            encoded = _result_encoder.encode(final)
        # Shielded: once CGB has acknowledged the step, the record is written even if the try's deadline
        # falls now, so that the next try finds the step sent.
        await asyncio.shield(sends.mark_sent(self.log_id, name, result=encoded, record=marked))
        self.record[name.encode()] = SENT
        if self.services.recorder is not None:
            self.services.recorder.count("accepted")


async def _deliver(
    services: Services,
    run: _Run,
    plan: Plan,
    kind: Kind,
    contact: ResolvedContact,
    flow_id: str | None,
    fields: _Fields,
) -> None:
    client = services.client
    cid = contact.id
    native = plan.whatsapp_template if kind == "whatsapp_template" else None
    result = SendResult(
        success=True,
        contact_id=cid,
        to=plan.to,
        timestamp="",
        kind=_step_kind(run.only, kind) if run.only else kind,
        flow_id=flow_id,
        fallback=kind == "text" and plan.kind == "template",
        attempts=run.attempt,
        template_name=native.name if native is not None else None,
        language=native.language if native is not None else None,
    )
    if native is not None:
        content = template_message(plan.to, native)
        await run.step("whatsapp_template", lambda mark: client.send_content(cid, [content], before_send=mark), result)
    elif kind == "text":
        assert plan.message is not None
        message = plan.message
        await run.step("text", lambda mark: client.send_text(cid, message, before_send=mark), result)
    elif kind == "file":
        assert plan.file_url is not None
        assert plan.file_type is not None
        url, file_type, message_after = plan.file_url, plan.file_type, plan.message
        await run.step(
            "file",
            lambda mark: client.send_file(cid, url, file_type, before_send=mark),
            None if message_after and run.only != "file" else result,
        )
        if message_after:
            await run.step("text", lambda mark: client.send_text(cid, message_after, before_send=mark), result)
    else:
        assert flow_id is not None
        flow = flow_id
        if not run.sent("flow"):
            run.check_expiry()
            run.check_turn("flow")
        if not run.sent("flow") and not contact.created:
            # A new contact got its fields as the actions of its creation; any other is written here, under
            # the field lock its caller holds.
            for fid, value in fields.ids:
                await client.set_custom_field(cid, fid, value)
        await run.step("flow", lambda mark: client.send_flow(cid, flow, before_send=mark), result)


def _now() -> str:
    """UTC now as ``2026-11-26T14:32:20.123Z``."""
    now = time.time()
    second = int(now)
    return f"{_utc_second(second)}.{int((now - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=2)
def _utc_second(second: int) -> str:
    # Kept: most calls in a busy second share it, and strftime is the costly part.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
