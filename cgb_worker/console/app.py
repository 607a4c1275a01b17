"""The console's pages and actions, over what Redis keeps (nothing lives only in the console's memory).

Pages: the overview (``/``), a job (``/jobs/{id}``), the dead letters (``/failures``, with replay and delete
behind a confirmation page each), find by job id (``/find``). Every value shown is escaped by the templates;
every number is masked (the payload's ``to``, digit runs in free text).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from arq.connections import ArqRedis
from arq.constants import default_queue_name, in_progress_key_prefix
from arq.jobs import Job
from jinja2 import Environment, FileSystemLoader, select_autoescape
from redis.exceptions import RedisError

from .. import keys
from ..deadletters import DeadLetters, mask_payload
from ..errors import InvalidPhoneError
from ..heartbeat import live_workers
from ..jobstate import JobState, describe, locate
from ..phones import normalize_phone
from ..scripts import QueueStatsScript
from .auth import COOKIE, CSRF, FAILED_SIGN_IN_DELAY, SESSION, ConsoleAuth, safe_next
from .masking import mask

HERE = Path(__file__).parent
JOB_ID_MAX = 128
PERSON_PAGE = 50
"""A person's jobs listed at most, newest first."""
FAILURES_PAGE = 200
"""Dead letters listed at most on one page, newest first."""

_templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _masked(value: Any) -> str:
    """Text fit to show (the ``masked`` filter): every number masked in any spelling, arq's own job ids kept
    whole so that they can be read (:mod:`.masking` says what counts). Every value a client or a user chose
    (job ids, error classes and messages, payloads, the filters typed in) is shown through it; a link's
    target carries the real id, URL-quoted, so that it can be followed."""
    return mask(str(value))


_templates.filters["masked"] = _masked
_templates.filters["at"] = lambda ts: (
    "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))
)


def _page(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    html = _templates.get_template(name).render(
        csrf=request[CSRF], signed_in=request[SESSION].signed_in, path=request.path, **context
    )
    return web.Response(text=html, content_type="text/html", status=status)


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not job_id or len(job_id) > JOB_ID_MAX or not job_id.isprintable():
        raise web.HTTPNotFound(text="no such job\n")
    return job_id


class Console:
    """The handlers, over one Redis client (the queue's, for replays) and the dead-letter store."""

    def __init__(
        self,
        redis: ArqRedis,
        auth: ConsoleAuth,
        *,
        queue_name: str = default_queue_name,
        default_region: str | None = None,
    ) -> None:
        self.redis = redis
        self.default_region = default_region
        self.auth = auth
        self.dead = DeadLetters(redis)
        self.queue_name = queue_name
        self.stats = QueueStatsScript(redis, queue_name, in_progress_key_prefix)

    # -- signing in ---------------------------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        return _page(request, "login.html", next=safe_next(request.query.get("next")), wrong=False)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        given, target = form.get("token"), safe_next(str(form.get("next", "/")))
        if self.auth.token is None:
            raise web.HTTPSeeOther(target)
        if not isinstance(given, str) or not self.auth.token_is(given):
            await asyncio.sleep(FAILED_SIGN_IN_DELAY)
            return _page(request, "login.html", status=401, next=target, wrong=True)
        response = web.HTTPSeeOther(target)
        self.auth.set_cookie(request, response, self.auth.new_session(signed_in=True))
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    # -- the overview -------------------------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        now = time.time()
        stats = await self.stats(int(now * 1000))
        workers = await live_workers(self.redis)
        dead = await self.dead.count()
        recent = await self.dead.list(FAILURES_PAGE)
        by_error = Counter(d.error_type for d in recent).most_common()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.INBOX)
            pipe.zcard(keys.ORPHANS)
            pipe.zcard(keys.AWAITING)
            inbox, held, awaiting = await pipe.execute()
        starts = [ms for ms in (stats.oldest_ms, stats.waiting_since_ms) if ms is not None]
        oldest = max((max(0.0, now - ms / 1000) for ms in starts), default=0.0)
        return _page(
            request,
            "overview.html",
            queue={
                "ready": stats.due - stats.running,
                "deferred": stats.deferred,
                "running": stats.running,
                "oldest": oldest,
            },
            workers=workers,
            dead=dead,
            by_error=by_error,
            receiver={"inbox": inbox, "held": held, "awaiting": awaiting},
        )

    # -- a job ----------------------------------------------------------------------------------------------------

    async def job(self, request: web.Request) -> web.Response:
        job_id = _job_id(request)
        state = await locate(self.redis, job_id)
        if state.state == "unknown":
            return _page(request, "job.html", status=404, job=state, line=describe(state), payload=None, errors=[])
        payload = await self._payload(job_id)
        return _page(
            request,
            "job.html",
            job=state,
            line=describe(state),
            payload=payload,
            errors=_errors(state),
        )

    async def _payload(self, job_id: str) -> Any:
        """The job's payload, its number masked: from the queue while arq holds it, else from the dead letters."""
        try:
            info = await Job(job_id, self.redis, _deserializer=self.redis.job_deserializer).info()
        except Exception:  # a job another client pickled: shown without its payload
            info = None
        if info is not None and info.args:
            return mask_payload(info.args[0])
        entry = await self.dead.get(job_id)
        return entry.payload if entry is not None else None

    # -- finding --------------------------------------------------------------------------------------------------

    async def find_person(self, request: web.Request) -> web.Response:
        """A person's jobs, newest first, by the keyed hash of the number typed in. A POST, so that the number
        is in no URL (nor any log of one); the page does not repeat it."""
        form = await request.post()
        raw = form.get("phone")
        try:
            e164 = normalize_phone(raw if isinstance(raw, str) else None, self.default_region)
        except InvalidPhoneError:
            return _page(request, "find.html", status=400, problem="that is not a phone number", results=None)
        found = await self.redis.zrevrange(keys.jobs_of(keys.who(e164)), 0, PERSON_PAGE - 1, withscores=True)
        results = []
        for member, score in found:
            job_id = member.decode() if isinstance(member, bytes) else str(member)
            state = await locate(self.redis, job_id)
            line, failed = describe(state), state.failed
            results.append({"job_id": job_id, "first_tried": score / 1000, "line": line, "failed": failed})
        return _page(request, "find.html", problem=None, results=results)

    async def find(self, request: web.Request) -> web.Response:
        job_id = request.query.get("job", "").strip()
        if job_id:
            if len(job_id) <= JOB_ID_MAX and job_id.isprintable() and "/" not in job_id:
                raise web.HTTPSeeOther("/jobs/" + quote(job_id, safe=""))
            return _page(request, "find.html", status=400, problem="that is not a job id", results=None)
        return _page(request, "find.html", problem=None, results=None)

    # -- failures -------------------------------------------------------------------------------------------------

    async def failures(self, request: web.Request) -> web.Response:
        error = request.query.get("error", "").strip() or None
        entries = await self.dead.list(FAILURES_PAGE, error_type=error)
        total = await self.dead.count()
        return _page(request, "failures.html", entries=entries, error=error, total=total)

    async def confirm(self, request: web.Request) -> web.Response:
        job_id, action = _job_id(request), request.match_info["action"]
        entry = await self.dead.get(job_id)
        if entry is None:
            raise web.HTTPNotFound(text="no such dead letter\n")
        return _page(request, "confirm.html", entry=entry, action=action)

    async def act(self, request: web.Request) -> web.Response:
        job_id, action = _job_id(request), request.match_info["action"]
        if action == "replay":
            new_id = await self.dead.replay(self.redis, job_id)
            if new_id is None:
                raise web.HTTPNotFound(text="no such dead letter (replayed or deleted already)\n")
            raise web.HTTPSeeOther(f"/jobs/{new_id}")
        if not await self.dead.remove(job_id):
            raise web.HTTPNotFound(text="no such dead letter (replayed or deleted already)\n")
        raise web.HTTPSeeOther("/failures")

    async def stylesheet(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(HERE / "console.css", headers={"Cache-Control": "max-age=3600"})


def _errors(state: JobState) -> list[dict[str, Any]]:
    """The job's errors, the latest first: the final one, then the last retry's."""
    errors: list[dict[str, Any]] = []
    if state.error_type:
        errors.append({"kind": "final", "type": state.error_type, "text": state.error or ""})
    if state.last_retry is not None:
        errors.append({"kind": "last retry", "type": state.last_retry.error_type, "text": ""})
    return errors


PAGE_TIMEOUT = 10.0
"""Seconds a page or an action may take, Redis included: past it the answer is a 503 (a frozen or unreachable
Redis, whose commands would wait forever, as the console's pool sets no socket timeout of its own)."""


@web.middleware
async def _headers(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every answer within :data:`PAGE_TIMEOUT` (a 503 past it), with the security headers. ``asyncio.timeout``,
    not ``wait_for``: Python 3.11's ``wait_for`` can lose a cancellation that arrives as it times out."""
    try:
        async with asyncio.timeout(PAGE_TIMEOUT):
            response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        response = exc
        _secure(response)
        raise
    except RedisError as exc:
        response = web.Response(status=503, text=f"Redis did not answer: {type(exc).__name__}\n")
    except TimeoutError:
        response = web.Response(status=503, text=f"Redis did not answer in {PAGE_TIMEOUT:g} s\n")
    _secure(response)
    return response


def _secure(response: web.StreamResponse) -> None:
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    )


def create_console(redis: ArqRedis, auth: ConsoleAuth, *, default_region: str | None = None) -> web.Application:
    """The console's app: :mod:`.auth`'s gate first, then the pages. ``default_region`` reads numbers typed
    without their country code, as the workers do (``CGB_DEFAULT_REGION``)."""
    console = Console(redis, auth, default_region=default_region)
    app = web.Application(middlewares=[_headers, auth.middleware], client_max_size=64 * 1024)
    app.add_routes(
        [
            web.get("/login", console.login_form),
            web.post("/login", console.login),
            web.post("/logout", console.logout),
            web.get("/", console.overview),
            web.get("/jobs/{job_id}", console.job),
            web.get("/find", console.find),
            web.post("/find", console.find_person),
            web.get("/failures", console.failures),
            web.get("/failures/{job_id}/{action:replay|delete}", console.confirm),
            web.post("/failures/{job_id}/{action:replay|delete}", console.act),
            web.get("/static/console.css", console.stylesheet),
        ]
    )
    return app
