"""The console's pages and actions, over what Redis keeps (nothing lives only in the console's memory).

Pages: the overview (``/``), a job (``/jobs/{id}``), the dead letters (``/failures``, with replay and delete
behind a confirmation page each), find by job id (``/find``). Every value shown is escaped by the templates;
every number is masked (the payload's ``to``, digit runs in free text).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
from aiohttp import web
from arq.connections import ArqRedis
from arq.constants import default_queue_name, in_progress_key_prefix
from arq.jobs import Job
from jinja2 import Environment, FileSystemLoader, select_autoescape
from loguru import logger
from markupsafe import Markup
from redis.exceptions import RedisError, ResponseError

from .. import errors, keys, sealed, series
from ..deadletters import DeadLetter, DeadLetters, UnreadablePayloadError, mask_payload
from ..errors import InvalidPhoneError
from ..heartbeat import live_workers
from ..jobstate import JobState, LastRetry, describe, locate, tries
from ..models import SendResult
from ..phones import mask_phone, normalize_phone
from ..receipts.timeline import RANK
from ..scripts import QueueStatsScript
from ..suppression import REASONS, SCOPES, lookup_who, page_suppressed, suppress_who, unsuppress_who
from ..whatsapp_errors import next_step, rule_for
from .auth import COOKIE, CSRF, FAILED_SIGN_IN_DELAY, SESSION, ConsoleAuth, safe_next
from .charts import Layer, stacked_bars
from .masking import mask, short_wamid

HERE = Path(__file__).parent
SEALED_MAX = 4096
"""The longest sealed id the console opens (a sealed id of :data:`JOB_ID_MAX` characters is about 1,500)."""
JOB_ID_MAX = 1024
"""The longest job id the console looks up (arq takes any string; a longer one is a mistake or an attack)."""
PERSON_PAGE = 50
"""A person's jobs listed at most, newest first."""
INDEX_DAYS = 8
"""Days of the person index a search reads: a week and the day that is ending, as long as send records last."""
RELATED_MAX = 12
"""Linked jobs looked for at most on a job's page (its fallback, and a resend per step)."""
FAILURES_PAGE = 200
"""Dead letters listed at most on one page, newest first (and replayed at most at once)."""
DELIVERIES_SCANNED = 5000
"""Status changes (the deliveries stream, newest first) the failures page looks through for failed messages."""
SUPPRESSIONS_PAGE = 500
"""People a page of the suppression list asks the index for (about as many are listed)."""

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
_templates.filters["wamid"] = short_wamid


def _opaque(job_id: str) -> bool:
    """An id the masker would change (a run of five digits or more, such as a number a producer chose as its
    job id): links and forms carry it sealed, never in clear."""
    return mask(job_id) != job_id


SEALED_PREFIX = b"console job id\0"
"""What a sealed id starts with: a token sealed for anything else under the same key (a send record's kept
payload) is not one."""


def _seal(job_id: str) -> str:
    return sealed.seal(SEALED_PREFIX + job_id.encode()).decode()


def _unseal(token: str) -> str | None:
    if not token or len(token) > SEALED_MAX:
        return None
    found = sealed.unseal(token.encode())
    if found is None or not found.startswith(SEALED_PREFIX):
        return None
    return found[len(SEALED_PREFIX) :].decode(errors="replace")


def job_href(job_id: str) -> str:
    """A job's page: the id quoted whole (a ``/`` in it included); ``.`` and ``..``, which a browser would read
    as path segments, in the query; an id holding a number, sealed (``?s=``), so that no URL holds it."""
    if _opaque(job_id):
        return "/job?s=" + _seal(job_id)
    if job_id in (".", ".."):
        return "/job?id=" + quote(job_id, safe="")
    return "/jobs/" + quote(job_id, safe="")


def action_href(job_id: str, action: str) -> str:
    """A dead letter's replay or delete (its confirmation page, and the form that posts it); for ``.``, ``..``
    and sealed ids, the replay of a selection of one, or the delete with the id in the query."""
    if _opaque(job_id):
        return f"/failures/{action}?s=" + _seal(job_id)
    if job_id in (".", ".."):
        key = "job" if action == "replay" else "id"
        return f"/failures/{action}?{key}=" + quote(job_id, safe="")
    return f"/failures/{quote(job_id, safe='')}/{action}"


def id_field(job_id: str) -> Markup:
    """The name and value a form field naming a job carries: ``s`` and the sealed id for an id holding a
    number, else ``job`` and the id."""
    name, value = ("s", _seal(job_id)) if _opaque(job_id) else ("job", job_id)
    return Markup('name="{}" value="{}"').format(name, value)


def _chosen(fields: Any) -> list[str]:
    """The job ids a selection names, in clear (``job``) or sealed (``s``), each once, a page at most."""
    named = [j for j in fields.getall("job", []) if isinstance(j, str)]
    named += [j for j in (_unseal(t) for t in fields.getall("s", []) if isinstance(t, str)) if j is not None]
    return list(dict.fromkeys(j for j in named if _valid_id(j)))[:FAILURES_PAGE]


_templates.filters["job_href"] = job_href
_templates.filters["action_href"] = action_href
_templates.filters["id_field"] = id_field


def _at(ts: Any) -> str:
    """A time to show; one no calendar holds (a damaged record's) shows as ``?``, not as a failed page."""
    if ts is None:
        return ""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))
    except (OverflowError, OSError, ValueError, TypeError):
        return "?"


def _shown_json(value: Any) -> str:
    """A payload or result as indented JSON, every number masked: non-ASCII written as itself (the masker sees
    the digits, whatever script), and what JSON cannot hold (bytes, keys of mixed types) as text."""
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=repr, sort_keys=False)
    except (TypeError, ValueError):
        text = repr(value)
    return mask(text)


_templates.filters["at"] = _at
_templates.filters["shown_json"] = _shown_json


def _page(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    html = _templates.get_template(name).render(
        csrf=request[CSRF], signed_in=request[SESSION].signed_in, path=request.path, **context
    )
    return web.Response(text=html, content_type="text/html", status=status)


def _job_id(request: web.Request) -> str:
    """The job id in the path (``/jobs/<id>``, quoted whole), or in the query: ``?id=`` for ``.`` and ``..``,
    ``?s=`` sealed for an id holding a number."""
    job_id = request.match_info.get("job_id") or request.query.get("id", "") or _unseal(request.query.get("s", ""))
    if not job_id or not _valid_id(job_id):
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
        by_error = [(name, n, error_meaning(name)) for name, n in Counter(d.error_type for d in recent).most_common()]
        hour, day = await series.read(self.redis, now)
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
            charts={
                "sends_hour": _sends(hour, 60.0, "messages CGB accepted, per minute, the last hour"),
                "sends_day": _sends(day, 3600.0, "messages CGB accepted, per hour, the last day"),
                "status_hour": _statuses(hour, 60.0, "statuses, per minute, the last hour"),
                "status_day": _statuses(day, 3600.0, "statuses, per hour, the last day"),
            },
            funnels=[("the last hour", _funnel(hour)), ("the last day", _funnel(day))],
            codes=[(code, n, rule_for(code).meaning) for code, n in day.codes()],
        )

    # -- a job ----------------------------------------------------------------------------------------------------

    async def job(self, request: web.Request) -> web.Response:
        job_id = _job_id(request)
        state = await locate(self.redis, job_id)
        if state.state == "unknown":
            return _page(
                request, "job.html", status=404, job=state, line=describe(state), payload=None, errors=[],
                tries=[], related=[], events=[], result=None,
            )  # fmt: skip
        payload = await self._payload(job_id)
        return _page(
            request,
            "job.html",
            job=state,
            line=describe(state),
            payload=payload,
            errors=_errors(state),
            tries=_tries(state, await tries(self.redis, job_id)),
            result=await self._result(state),
            related=await self._related(state),
            events=_events(state),
        )

    async def _result(self, state: JobState) -> dict[str, Any] | None:
        """What the job returned (arq's result while it keeps it, else the one the send record keeps for a week),
        its number masked; None when it has not succeeded."""
        if state.state not in ("succeeded", "sent"):
            return None
        value: Any = None
        try:
            info = await Job(state.job_id, self.redis, _deserializer=self.redis.job_deserializer).result_info()
        except Exception:  # a result another client pickled: the send record's, below
            info = None
        if info is not None and info.success:
            value = info.result
        else:
            raw = await self.redis.hget(keys.sends(state.delivery_of or state.job_id), "result")  # type: ignore[misc]
            try:
                value = msgspec.msgpack.decode(raw, type=SendResult) if raw else None
            except (msgspec.DecodeError, msgspec.ValidationError):
                value = None
        if isinstance(value, msgspec.Struct):
            value = msgspec.to_builtins(value)
        if not isinstance(value, dict):
            return None
        shown = dict(value)
        if isinstance(shown.get("to"), str):
            shown["to"] = mask_phone(shown["to"])
        return shown

    async def _related(self, state: JobState) -> list[dict[str, str]]:
        """The jobs this one is linked to besides its replays (which :class:`JobState` carries): what it falls
        back or resends for, and its own fallback and resends (ids that name their origin, see
        :mod:`cgb_worker.receipts.reactions`), each shown only when arq or the send log still knows it."""
        job_id = state.job_id
        out: list[dict[str, str]] = []
        origin, kind = _origin(job_id)
        if origin is not None:
            out.append({"rel": f"{kind} of", "job_id": origin})
        candidates = [(f"{job_id}:fallback", "fallback template")]
        steps = state.delivery.steps if state.delivery is not None else []
        for step in sorted({next_step(s.step) for s in steps}):
            candidates.append((f"{job_id}:resend:{step}", f"automatic resend ({step})"))
        for candidate, rel in candidates[:RELATED_MAX]:
            if (await locate(self.redis, candidate)).state != "unknown":
                out.append({"rel": rel, "job_id": candidate})
        return out

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
        job = form.get("job")
        if isinstance(job, str) and "phone" not in form:  # a job by id, posted so that no URL holds it
            job_id = job.strip()
            if _valid_id(job_id):
                raise web.HTTPSeeOther(job_href(job_id))
            return _page(request, "find.html", status=400, problem="that is not a job id", results=None)
        raw = form.get("phone")
        try:
            e164 = normalize_phone(raw if isinstance(raw, str) else None, self.default_region)
        except InvalidPhoneError:
            return _page(request, "find.html", status=400, problem="that is not a phone number", results=None)
        found = await self._jobs_of(keys.who(e164))
        # at once, not one after the other: each job's answer is a few round trips, and the page lists 50
        states = await asyncio.gather(*(locate(self.redis, job_id) for job_id, _ms in found))
        results = [
            {"job_id": job_id, "enqueued": ms / 1000, "line": describe(state), "failed": state.failed}
            for (job_id, ms), state in zip(found, states, strict=True)
        ]
        return _page(request, "find.html", problem=None, results=results)

    async def _jobs_of(self, who: str) -> list[tuple[str, int]]:
        """The person's newest jobs (at most :data:`PERSON_PAGE`), newest first, from the last days of the
        person index (:func:`cgb_worker.keys.jobs_on`): one lexicographic range per day, one round trip."""
        today = int(time.time() // 86400)
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in range(today, today - INDEX_DAYS, -1):
                pipe.zrevrangebylex(
                    keys.jobs_on(day), f"[{who}|".encode() + b"\xff", f"[{who}|", start=0, num=PERSON_PAGE
                )
            days = await pipe.execute()
        found: dict[str, int] = {}
        for members in days:
            for member in members:
                parts = (member.decode(errors="replace") if isinstance(member, bytes) else str(member)).split("|", 2)
                if len(parts) == 3 and parts[1].isascii() and parts[1].isdigit():  # else not an entry of ours
                    found.setdefault(parts[2], int(parts[1]))
        return sorted(found.items(), key=lambda item: (-item[1], item[0]))[:PERSON_PAGE]

    async def find(self, request: web.Request) -> web.Response:
        job_id = request.query.get("job", "").strip()
        if job_id:
            if _valid_id(job_id):
                raise web.HTTPSeeOther(job_href(job_id))
            return _page(request, "find.html", status=400, problem="that is not a job id", results=None)
        return _page(request, "find.html", problem=None, results=None)

    # -- failures -------------------------------------------------------------------------------------------------

    async def failures(self, request: web.Request) -> web.Response:
        """Dead letters filtered by error class, code and age, newest first; and the messages WhatsApp failed
        among the newest status changes, filtered alike."""
        f = _Filters.of(request.query)
        now = time.time()
        entries = await self._dead_letters(f, now)
        total = await self.dead.count()
        failed = await self._failed_messages(f, now)
        return _page(
            request, "failures.html", entries=entries, total=total, f=f, ages=AGES, failed=failed,
            replayed=request.query.get("replayed"), gone=request.query.get("gone"),
            unreadable=request.query.get("unreadable"),
        )  # fmt: skip

    async def _dead_letters(self, f: _Filters, now: float) -> list[DeadLetter]:
        """The dead letters the filters show (a page at most, newest first): what the failures page lists and
        what "replay all" replays."""
        return await self.dead.list(
            FAILURES_PAGE, error_type=f.error, code=f.code, failed_after=f.after(now), failed_before=f.before(now)
        )

    async def _failed_messages(self, f: _Filters, now: float) -> list[dict[str, Any]]:
        if f.error is not None:  # a job error class names dead letters only
            return []
        after, before = f.after(now), f.before(now)
        out: list[dict[str, Any]] = []
        later: dict[str, str] = {}
        """Job → the best status a newer change of it reached (the stream is read newest first)."""
        for _id, fields in await self.redis.xrevrange(keys.DELIVERIES, count=DELIVERIES_SCANNED):
            job_id = fields.get(b"job", b"").decode(errors="replace")
            status = fields.get(b"status", b"").decode(errors="replace")
            if status != "failed":
                if RANK.get(status, 0) > RANK.get(later.get(job_id, ""), 0):
                    later[job_id] = status
                continue
            code_raw, at_raw = fields.get(b"error", b""), fields.get(b"at", b"")
            code = int(code_raw) if code_raw.isdigit() else None
            if not at_raw.isdigit():
                continue  # not an entry of ours: one bad entry never spoils the list
            at = int(at_raw) / 1000
            if (f.code is not None and code != f.code) or (after is not None and at < after):
                continue
            if before is not None and at > before:
                continue
            if len(out) >= FAILURES_PAGE:
                break
            # a later change of the job (a resend's, a fallback template's, another device's) may have delivered
            # what failed here: said beside it, from the same read, with no command more
            then = later.get(job_id, "")
            out.append({
                "job_id": job_id, "step": fields.get(b"step", b"").decode(errors="replace"), "code": code,
                "meaning": rule_for(code).meaning if code is not None else "", "at": at,
                "now": then if RANK.get(then, 0) >= RANK["delivered"] else "",
            })  # fmt: skip
        return out

    async def confirm(self, request: web.Request) -> web.Response:
        job_id, action = _job_id(request), request.match_info["action"]
        entry = await self.dead.get(job_id)
        if entry is None:
            raise web.HTTPNotFound(text="no such dead letter\n")
        return _page(request, "confirm.html", entry=entry, action=action)

    async def act(self, request: web.Request) -> web.Response:
        job_id, action = _job_id(request), request.match_info["action"]
        if action == "replay":
            try:
                new_id = await self.dead.replay(self.redis, job_id)
            except UnreadablePayloadError as exc:
                raise web.HTTPConflict(text=f"{exc}\n") from None
            if new_id is None:
                raise web.HTTPNotFound(text="no such dead letter (replayed or deleted already)\n")
            raise web.HTTPSeeOther(job_href(new_id))
        if not await self.dead.remove(job_id):
            raise web.HTTPNotFound(text="no such dead letter (replayed or deleted already)\n")
        raise web.HTTPSeeOther("/failures")

    async def confirm_selection(self, request: web.Request) -> web.Response:
        """The replay of several dead letters, confirmed: the ones ticked on the failures page, or with
        ``all=1`` every one the filters show (at most a page)."""
        if request.query.get("all") == "1":
            entries = await self._dead_letters(_Filters.of(request.query), time.time())
        else:
            found = [await self.dead.get(j) for j in _chosen(request.query)]
            entries = [e for e in found if e is not None]
        if not entries:
            return _page(request, "failures_confirm.html", status=400, entries=[])
        return _page(request, "failures_confirm.html", entries=entries)

    async def replay_selection(self, request: web.Request) -> web.Response:
        form = await request.post()
        replayed = gone = unreadable = 0
        # the ids the form names, or the one a single replay's confirmation posts in its address (sealed)
        for job_id in list(dict.fromkeys(_chosen(form) + _chosen(request.query)))[:FAILURES_PAGE]:
            try:
                new_id = await self.dead.replay(self.redis, job_id)
            except UnreadablePayloadError:
                unreadable += 1  # left as it is, for a person to look at and delete; the others go on
                continue
            if new_id is None:
                gone += 1  # replayed or deleted by someone else meanwhile
            else:
                replayed += 1
        more = f"&unreadable={unreadable}" if unreadable else ""
        raise web.HTTPSeeOther(f"/failures?replayed={replayed}&gone={gone}{more}")

    # -- the suppression list --------------------------------------------------------------------------------

    async def suppressions(
        self, request: web.Request, *, status: int = 200, problem: str | None = None
    ) -> web.Response:
        """The list a page at a time (an ``SSCAN`` cursor in ``?page=``), so a view costs the same however many
        people opted out."""
        raw = request.query.get("page", "0")
        cursor = int(raw) if raw.isdigit() and len(raw) <= 20 else 0
        listed, after, total = await page_suppressed(self.redis, cursor, SUPPRESSIONS_PAGE)
        return _page(request, "suppressions.html", status=status, listed=listed, total=total, after=after,
                     first=cursor == 0, problem=problem, reasons=REASONS)  # fmt: skip

    async def suppression_lookup(self, request: web.Request) -> web.Response:
        """A number's entry, and the form to add it (confirmed on the next page): a POST, the number in no URL,
        shown back masked only."""
        form = await request.post()
        raw = form.get("phone")
        try:
            e164 = normalize_phone(raw if isinstance(raw, str) else None, self.default_region)
        except InvalidPhoneError:
            return await self.suppressions(request, status=400, problem="that is not a phone number")
        found = await lookup_who(self.redis, keys.who(e164))
        return _page(request, "suppression.html", entry=found, shown=mask_phone(e164), reasons=REASONS)

    async def suppression_confirm(self, request: web.Request) -> web.Response:
        who, action = _who(request), request.match_info["action"]
        scope = request.query.get("scope", "all")
        if scope not in SCOPES:
            raise web.HTTPBadRequest(text="scope must be all or marketing\n")
        entry = await lookup_who(self.redis, who)
        if action == "remove" and not entry.entries:
            raise web.HTTPNotFound(text="not suppressed\n")
        return _page(request, "suppression_confirm.html", entry=entry, action=action, scope=scope, reasons=REASONS)

    async def suppression_act(self, request: web.Request) -> web.Response:
        who, action = _who(request), request.match_info["action"]
        if action == "add":
            form = await request.post()
            scope = form.get("scope")
            if scope not in SCOPES:
                raise web.HTTPBadRequest(text="scope must be all or marketing\n")
            await suppress_who(self.redis, who, scope=scope, reason="operator")
        elif not await unsuppress_who(self.redis, who):
            raise web.HTTPNotFound(text="not suppressed (lifted already)\n")
        raise web.HTTPSeeOther("/suppressions")

    async def stylesheet(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(HERE / "console.css", headers={"Cache-Control": "max-age=3600"})


def _sends(window: series.Window, step: float, title: str) -> Markup:
    layers = [Layer("accepted", "#2f6f9f", window.series("accepted")), Layer("dead", "#a40000", window.series("dead"))]
    return stacked_bars(window.starts, layers, step=step, title=title)


def _statuses(window: series.Window, step: float, title: str) -> Markup:
    layers = [
        Layer("sent", "#9bb7d4", window.series("sent")),
        Layer("delivered", "#3c8d5a", window.series("delivered")),
        Layer("read", "#1f5f3a", window.series("read")),
        Layer("failed", "#c0392b", window.series("failed")),
    ]
    return stacked_bars(window.starts, layers, step=step, title=title)


def _funnel(window: series.Window) -> list[dict[str, Any]]:
    """accepted → sent → delivered → read, and failed, each with its share of accepted (None when nothing
    was accepted in the window)."""
    accepted = window.totals.get("accepted", 0)
    rows = []
    for stage in (*series.FUNNEL, "failed"):
        n = window.totals.get(stage, 0)
        rows.append({"stage": stage, "n": n, "rate": (100.0 * n / accepted) if accepted else None})
    return rows


def error_meaning(name: str) -> str:
    """What a job error class means: the first sentence of its docstring in :mod:`cgb_worker.errors` (the
    console shows it beside the count); a class that is not ours (a producer's bug, a library's) says so."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)) or cls.__module__ != errors.__name__:
        return "not one of cgb-worker's errors: see the job's message"
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.replace("``", "").split()).split(". ")[0].rstrip(".")


AGES: dict[str, tuple[float | None, float | None]] = {
    "": (None, None),
    "1h": (None, 3600.0),
    "24h": (None, 86400.0),
    "7d": (None, 7 * 86400.0),
    "older-24h": (86400.0, None),
    "older-7d": (7 * 86400.0, None),
}
"""The failures page's age filter: (at least, at most) seconds ago."""


@dataclass(frozen=True, slots=True)
class _Filters:
    error: str | None
    code: int | None
    age: str

    @classmethod
    def of(cls, query: Any) -> _Filters:
        error = (query.get("error") or "").strip()  # a class name, or none
        code = (query.get("code") or "").strip()
        age = query.get("age") or ""
        return cls(
            error=error if error.isidentifier() and len(error) <= ERROR_MAX and mask(error) == error else None,
            code=int(code) if code.isascii() and code.isdigit() and len(code) <= 9 else None,
            age=age if age in AGES else "",
        )

    def after(self, now: float) -> float | None:
        newest = AGES[self.age][1]
        return None if newest is None else now - newest

    def before(self, now: float) -> float | None:
        oldest = AGES[self.age][0]
        return None if oldest is None else now - oldest

    @property
    def any(self) -> bool:
        return bool(self.error or self.code is not None or self.age)


ERROR_MAX = 128
"""The longest error class name the failures page filters by (one the masker would change is ignored: no class of
ours holds a number, and so none is echoed back in the form)."""


def _valid_id(job_id: str) -> bool:
    """Any id arq could hold, but not an empty or an overlong one, nor one with a lone surrogate (undecodable
    bytes in the URL)."""
    return 0 < len(job_id) <= JOB_ID_MAX and not any("\ud800" <= c <= "\udfff" for c in job_id)


_WHO = re.compile(r"[0-9a-f]{32}")


def _who(request: web.Request) -> str:
    """A person's keyed hash from the path (what the suppression pages name people by)."""
    who = request.match_info["who"]
    if not _WHO.fullmatch(who):
        raise web.HTTPNotFound(text="no such entry\n")
    return who


def _origin(job_id: str) -> tuple[str | None, str]:
    """The job a fallback or an automatic resend was made for, from its id."""
    if job_id.endswith(":fallback"):
        return job_id.removesuffix(":fallback"), "fallback template"
    head, sep, _step = job_id.rpartition(":resend:")
    return (head, "automatic resend") if sep and head else (None, "")


def _tries(state: JobState, retried: list[LastRetry]) -> list[dict[str, Any]]:
    """Every try the job recorded, the latest first: how it ended (when it has), then each retry or deferral
    with its time and error (HTTP status and CGB's code for CGB's answers)."""
    rows: list[dict[str, Any]] = []
    if state.finished_at is not None:
        ended = "failed" if state.error_type else "succeeded"
        # arq's try number while arq keeps the result; once it is gone (a dead letter counts attempts, which
        # deferrals do not use up), the try after the last one recorded
        last_try = state.job_try if state.state != "dead_lettered" or not retried else retried[0].job_try + 1
        rows.append({"at": state.finished_at, "try": last_try, "outcome": ended, "error": state.error_type or "",
                     "detail": state.error or "", "next": ""})  # fmt: skip
    for r in retried:
        detail = " ".join(
            part for part in (
                f"HTTP {r.status}" if r.status else "", f"CGB code {r.code}" if r.code is not None else "",
                f"on {r.endpoint}" if r.endpoint else "",
            ) if part
        )  # fmt: skip
        rows.append({
            "at": r.at, "try": r.job_try, "outcome": "retried" if r.counted else "deferred", "error": r.error_type,
            "detail": detail, "next": f"again in {r.retry_in:.1f} s",
        })  # fmt: skip
    return rows


def _events(state: JobState) -> list[dict[str, Any]]:
    """The delivery timeline, in the order the statuses arrived, each failure with its code's meaning."""
    if state.delivery is None:
        return []
    steps = {s.step: s for s in state.delivery.steps}
    rows = []
    for e in state.delivery.events:
        code, title = _meta_error(e.meta)
        step = steps.get(e.step)
        rows.append({
            "status": e.status, "at": e.at, "received": e.received, "step": e.step, "wamid": e.wamid or "",
            # the worker's own events were not matched: they are the send itself, and the sweep's 'unconfirmed'
            "matched_by": (step.matched_by or "") if step is not None and e.status not in OWN_EVENTS else "",
            "code": code, "title": title, "meaning": rule_for(code).meaning if code is not None else "",
        })  # fmt: skip
    return rows


OWN_EVENTS = frozenset({"accepted", "unconfirmed"})


def _meta_error(meta: dict[str, Any] | None) -> tuple[int | None, str]:
    """The first error of a status as WhatsApp sent it (lenient: any shape)."""
    found = (meta or {}).get("errors")
    if not isinstance(found, list) or not found or not isinstance(found[0], dict):
        return None, ""
    code = found[0].get("code")
    title = found[0].get("title") or found[0].get("message") or ""
    return (code if isinstance(code, int) and not isinstance(code, bool) else None), str(title)[:200]


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
    except ResponseError as exc:  # Redis answered, with an error: a key of another type than expected (WRONGTYPE)
        logger.warning(
            "console: {} {}: Redis refused a command: {}", request.method, mask(request.path), mask(str(exc))
        )
        response = web.Response(status=500, text=f"Redis refused a command: {mask(str(exc).splitlines()[0])[:200]}\n")
    except RedisError as exc:
        response = web.Response(status=503, text=f"Redis did not answer: {type(exc).__name__}\n")
    except TimeoutError:
        response = web.Response(status=503, text=f"Redis did not answer in {PAGE_TIMEOUT:g} s\n")
    except Exception as exc:  # a bug, or a record no reader expected: a page of its own, the headers on it
        logger.exception("console: {} {} failed", request.method, mask(request.path))
        response = web.Response(
            status=500, text=f"this page failed ({type(exc).__name__}); the console's log says more\n"
        )
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
            web.get("/job", console.job),
            web.get("/find", console.find),
            web.post("/find", console.find_person),
            web.get("/failures", console.failures),
            web.get("/failures/replay", console.confirm_selection),
            web.post("/failures/replay", console.replay_selection),
            web.get("/failures/{job_id}/{action:replay|delete}", console.confirm),
            web.post("/failures/{job_id}/{action:replay|delete}", console.act),
            web.get("/failures/{action:delete}", console.confirm),
            web.post("/failures/{action:delete}", console.act),
            web.get("/suppressions", console.suppressions),
            web.post("/suppressions", console.suppression_lookup),
            web.get("/suppressions/{who}/{action:add|remove}", console.suppression_confirm),
            web.post("/suppressions/{who}/{action:add|remove}", console.suppression_act),
            web.get("/static/console.css", console.stylesheet),
        ]
    )
    return app
