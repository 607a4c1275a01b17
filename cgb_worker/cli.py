"""``cgb-worker``: the operator's command line.

Every command reads the same environment as the worker. Exit codes: 0 success, 1 the thing checked or
asked for failed, 2 bad usage or configuration (and ``status`` 3: no record of the job); a failure prints one
line (or the list of configuration problems) on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar, cast

import aiohttp
import click
import msgspec
from redis.exceptions import RedisError

from . import __version__, keys
from .client import CGBClient
from .connection import RedisConfig, load_redis_config
from .deadletters import DeadLetters
from .errors import CGBWorkerError, ConfigError, InvalidJobError
from .settings import (
    Settings,
    load_connect_timeout,
    load_phone_key,
    load_settings,
    parse_duration,
)
from .tasks import cancel_and_wait
from .templates import normalize_name

_T = TypeVar("_T")


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"cgb-worker: {message}", err=True)
    sys.exit(code)


def _settings() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail(str(exc), 2)
    keys.use_phone_key(settings.phone_hash_key.get_secret_value())
    return settings


def _phone_key(*, required: bool) -> None:
    """Wire ``PHONE_HASH_KEY`` for a command that reads only ``REDIS_URL``. Commands that never hash a phone
    (send, dead letters, status) run without it on a producer's machine; one given is checked all the same."""
    if not required and not os.environ.get("PHONE_HASH_KEY"):
        return
    try:
        keys.use_phone_key(load_phone_key().get_secret_value())
    except ConfigError as exc:
        _fail(str(exc), 2)


def _interrupted_line() -> str:
    return "interrupted"


def _run(coro: Callable[[], Awaitable[_T]], interrupted_line: Callable[[], str] = _interrupted_line) -> _T:
    """Run a command's coroutine. Ctrl-C cancels it, lets it clean up, then ends the command with
    ``interrupted_line()`` (exit 130); a second Ctrl-C during that clean-up ends it at once, with the same line.

    asyncio.run's own Ctrl-C handling only cancels the main task, and on Python 3.11 that cancellation can be
    lost: when it lands while the task runs (printing, say), it takes effect at the next wait, and redis-py
    writes each command through ``asyncio.wait_for``, which returns the write's result instead of raising when
    the write finished in the same turn. ``send --wait`` then waited on. So Ctrl-C sets an event raced
    against the work, and the work is cancelled until it has ended (:mod:`.tasks`)."""

    async def command() -> tuple[_T | None, SystemExit | None]:
        try:
            return await coro(), None
        except SystemExit as exc:  # a refusal (_fail): raised again after the loop, as from asyncio.run's own task
            return None, exc

    async def supervised() -> tuple[bool, _T | None, SystemExit | None]:
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()

        def on_sigint(*_: Any) -> None:
            if interrupted.is_set():  # the second: no clean-up, no traceback from wherever it landed
                if not said:
                    sys.stderr.write(f"cgb-worker: {interrupted_line()}\n")
                    sys.stderr.flush()
                os._exit(130)
            interrupted.set()
            # What the cancelled work leaves half-closed (a pipeline whose answer never came) is not news to
            # someone who pressed Ctrl-C: no "Unclosed ... client" lines on the way out.
            loop.set_exception_handler(lambda _loop, _context: None)

        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        except (RuntimeError, NotImplementedError):  # not the main thread: nothing to catch
            return (False, *await command())
        work = asyncio.ensure_future(command())
        stop = asyncio.ensure_future(interrupted.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                stop.cancel()
                return (False, *work.result())
            await cancel_and_wait(work)
            return True, None, None
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            if interrupted.is_set():  # until the process ends, a second Ctrl-C is still the second
                signal.signal(signal.SIGINT, on_sigint)

    said: list[bool] = []  # the line is said once, by whichever Ctrl-C ends the command
    interrupted, result, refused = asyncio.run(supervised())
    if refused is not None:
        raise refused
    if interrupted:
        said.append(True)
        _fail(interrupted_line(), 130)
    return result  # type: ignore[return-value]


async def _with_cgb(settings: Settings, use: Callable[[CGBClient], Awaitable[_T]]) -> _T:
    async with aiohttp.ClientSession() as session:
        client = CGBClient(session, settings.api_key, base_url=settings.api_url, timeout=settings.timeout)
        return await use(client)


def _say(message: str) -> None:
    click.echo(f"cgb-worker: {message}", err=True)


async def _open_redis(config: RedisConfig, give_up_after: float) -> Any:
    """A fail-fast pool on ``config`` through the start-up checks (:mod:`.preflight`): waiting for Redis is said
    on stderr; a refusal is the command's one line."""
    from .preflight import StartupError, open_redis
    from .worker import create_pool

    try:
        return await open_redis(
            lambda: create_pool(config, ride_out_outages=False),
            str(config),
            role="cli",
            give_up_after=give_up_after,
            say=_say,
        )
    except StartupError as exc:
        _fail(str(exc), exc.code)


async def _pool(give_up_after: float | None = None) -> Any:
    """The queue. Sending and dead letters need only ``REDIS_URL``, not the CGB key: producers run them too.
    ``give_up_after`` overrides ``REDIS_CONNECT_TIMEOUT`` (``health`` tries once: a health check must answer)."""
    _phone_key(required=False)
    problems: list[str] = []
    try:
        connect_timeout = load_connect_timeout()
    except ConfigError as exc:
        problems += exc.problems
    try:
        config = load_redis_config(os.environ)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        _fail(str(ConfigError(problems)), 2)
    return await _open_redis(config, connect_timeout if give_up_after is None else give_up_after)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="cgb-worker", message="%(prog)s %(version)s")
def main() -> None:
    """Operate the cgb-worker WhatsApp sender: check, send, inspect and replay."""


def entry() -> None:
    """The ``cgb-worker`` command: :func:`main`, with any error it did not expect told in one line (exit 1)
    instead of a traceback."""
    try:
        # not click's standalone mode: it turns Ctrl-C into "Aborted!" and exit 1
        code = main.main(standalone_mode=False)
    except KeyboardInterrupt:  # Ctrl-C outside a command's loop: one line, exit 130
        _fail("interrupted", 130)
    except click.exceptions.Abort as exc:  # click's own: Ctrl-C, or no answer to a question (stdin closed)
        if isinstance(exc.__cause__, KeyboardInterrupt):
            _fail("interrupted", 130)
        _fail("aborted: no answer (stdin closed); nothing done")
    except click.ClickException as exc:  # usage errors, as click's standalone mode shows them
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    sys.exit(code if isinstance(code, int) else 0)


# -- check and flows --------------------------------------------------------------------------------------


@main.command()
def check() -> None:
    """Validate the configuration, ping Redis and CGB, and check every CGB_TEMPLATE_* mapping."""
    settings = _settings()
    click.echo("configuration  ok")
    for warning in settings.warnings:
        click.echo(f"warning        {warning}")
    if settings.wa_templates is not None:
        count = len(settings.wa_templates.templates)
        click.echo(f"wa templates   ok ({count} approved template(s) in {settings.wa_templates.path})")
    else:
        click.echo("wa templates   not checked: WA_TEMPLATES_FILE is not set")

    async def probe() -> list[str]:
        from .preflight import FORMAT_VERSION, StartupError, open_redis
        from .worker import create_pool

        failed: list[str] = []
        where = str(settings.redis)  # the redacted URL, or the sentinels
        try:  # the worker's own start-up checks: what would stop it stops the check
            redis = await open_redis(
                lambda: create_pool(settings.redis, ride_out_outages=False),
                where,
                role="worker",
                give_up_after=settings.redis_connect_timeout,
                say=_say,
            )
            info = await redis.info("server")
            await redis.aclose()
            click.echo(
                f"redis          ok ({where}, Redis {info.get('redis_version')}, "
                f"maxmemory-policy noeviction, data format {FORMAT_VERSION})"
            )
        except StartupError as exc:
            click.echo(f"redis          FAILED: {exc}")
            failed.append(f"redis: {exc}")

        async def account_and_flows(client: CGBClient) -> tuple[Any, Any]:
            return await client.account(), await client.list_flows()

        try:
            account, flows = await _with_cgb(settings, account_and_flows)
        except CGBWorkerError as exc:
            click.echo(f"cgb            FAILED: {type(exc).__name__}: {exc}")
            return [*failed, f"cgb: {type(exc).__name__}: {exc}"]
        click.echo(f"cgb            ok ({settings.api_url}, account {account.name!r}, page {account.page_id})")
        names = {f.id: f.name for f in flows}
        for template, flow_id in sorted(settings.templates.items()):
            if flow_id in names:
                click.echo(f"template       {template} -> {flow_id} ok (flow {names[flow_id]!r})")
            else:
                click.echo(f"template       {template} -> {flow_id} MISSING: the account has no such flow")
                failed.append(f"template {template}: no flow {flow_id}")
        return failed

    failed = _run(probe)
    if failed:
        _fail("check failed: " + "; ".join(failed))


@main.command()
def templates() -> None:
    """List the approved WhatsApp templates WA_TEMPLATES_FILE holds (a local file: no CGB key needed)."""
    from .catalog import load_catalog

    path = os.environ.get("WA_TEMPLATES_FILE", "").strip()
    if not path:
        _fail("WA_TEMPLATES_FILE is not set", 2)
    try:
        catalog = load_catalog(path)
    except ConfigError as exc:
        _fail(str(exc), 2)
    click.echo(f"{'name':<32} {'languages':<16} {'body':<24} {'header':<10} {'buttons':<16} category")
    for t in sorted(catalog.templates.values(), key=lambda t: t.name):
        body = f"{t.body} positional" if isinstance(t.body, int) else ", ".join(t.body) or "none"
        buttons = ",".join(t.buttons) or "-"
        click.echo(
            f"{t.name:<32} {','.join(t.languages):<16} {body:<24} {t.header or '-':<10} {buttons:<16} "
            f"{t.category or 'utility (default)'}"
        )


@main.command()
def flows() -> None:
    """List the account's flows and the template names that reach each one."""
    settings = _settings()
    try:
        listed = _run(lambda: _with_cgb(settings, lambda c: c.list_flows()))
    except CGBWorkerError as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    mapped: dict[str, list[str]] = {}
    for template, flow_id in settings.templates.items():
        mapped.setdefault(flow_id, []).append(template)
    click.echo(f"{'flow id':<16} {'name':<32} templates")
    for flow in listed:
        via = sorted(mapped.pop(flow.id, []))
        by_name = normalize_name(flow.name).replace(" ", "_")
        click.echo(f"{flow.id:<16} {flow.name:<32} {', '.join([*via, f'{by_name} (by name)'])}")
    for flow_id, templates in sorted(mapped.items()):
        click.echo(f"{flow_id:<16} {'(no such flow)':<32} {', '.join(sorted(templates))}")


# -- send -------------------------------------------------------------------------------------------------


def _parse_var(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{value!r} is not key=value")
    return key.strip(), raw


@main.command()
@click.option("--to", required=True, help="phone number, with country code")
@click.option("--message", help="text to send (or the fallback text of a template)")
@click.option("--template", help="template name")
@click.option("--var", "variables", multiple=True, help="template variable, key=value (repeatable)")
@click.option("--file-url", help="http(s) URL of a file to send")
@click.option("--file-type", type=click.Choice(["image", "document", "video", "audio"]))
@click.option("--first-name")
@click.option("--last-name")
@click.option("--email")
@click.option("--wa-template", help="a Meta-approved WhatsApp template's name, sent natively (send_content)")
@click.option("--lang", help="the WhatsApp template's language code (with --wa-template)")
@click.option("--param", "params", multiple=True, help="a body parameter, in order, or name=value (repeatable)")
@click.option("--header-text")
@click.option("--header-image", help="URL of the header's image")
@click.option("--header-video", help="URL of the header's video")
@click.option("--header-document", help="URL of the header's document")
@click.option("--header-filename", help="the header document's file name")
@click.option("--button-url", "button_urls", multiple=True, help="INDEX=SUFFIX for a URL button (repeatable)")
@click.option("--button-payload", "button_payloads", multiple=True, help="INDEX=PAYLOAD for a quick reply")
@click.option(
    "--category", type=click.Choice(["marketing", "utility", "authentication", "service"]), help="WhatsApp's category"
)
@click.option("--expires-at", help="ISO 8601 with an offset: not sent after it")
@click.option("--job-id", help="arq job id (a second enqueue with the same id is refused)")
@click.option(
    "--wait", is_flag=True, help="wait for the job and print its result or its error (or, on timeout, where it is)"
)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True, max=86400),
    callback=lambda _ctx, _param, value: _finite(value, "--timeout"),
    help="seconds --wait waits",
)
def send(
    to: str,
    message: str | None,
    template: str | None,
    variables: tuple[str, ...],
    file_url: str | None,
    file_type: str | None,
    first_name: str | None,
    last_name: str | None,
    email: str | None,
    wa_template: str | None,
    lang: str | None,
    params: tuple[str, ...],
    header_text: str | None,
    header_image: str | None,
    header_video: str | None,
    header_document: str | None,
    header_filename: str | None,
    button_urls: tuple[str, ...],
    button_payloads: tuple[str, ...],
    category: str | None,
    expires_at: str | None,
    job_id: str | None,
    wait: bool,
    timeout: float,
) -> None:
    """Enqueue one whatsapp_send job."""
    payload: dict[str, Any] = {"to": to}
    for key, value in (
        ("message", message),
        ("template", template),
        ("fileUrl", file_url),
        ("fileType", file_type),
        ("firstName", first_name),
        ("lastName", last_name),
        ("email", email),
        ("category", category),
        ("expiresAt", expires_at),
    ):
        if value is not None:
            payload[key] = value
    if variables:
        payload["variables"] = dict(_parse_var(v) for v in variables)
    if wa_template is not None:
        payload["whatsappTemplate"] = _wa_template(
            wa_template,
            lang,
            params,
            {"text": header_text, "image": header_image, "video": header_video, "document": header_document},
            header_filename,
            button_urls,
            button_payloads,
        )

    from .jobs import validate

    try:  # what the worker would refuse at once is refused here, before anything is enqueued
        validate(payload, default_region=os.environ.get("CGB_DEFAULT_REGION", "").strip() or None)
    except InvalidJobError as exc:
        _fail(f"{type(exc).__name__}: {exc} (nothing enqueued)", 2)

    # arq's own kind of id, chosen here so that a Ctrl-C while the enqueue is in flight can still name the job
    new_id = job_id or uuid.uuid4().hex
    phase = ["connecting"]

    def interrupted_line() -> str:
        if phase[0] == "connecting":
            return "interrupted: nothing enqueued"
        if phase[0] == "enqueuing":
            return f"interrupted while enqueuing; the job may be enqueued: cgb-worker status {new_id}"
        return f"interrupted while waiting; the job is enqueued: cgb-worker status {new_id}"

    async def enqueue() -> tuple[str, Any, BaseException | None]:
        redis = await _pool()
        try:
            phase[0] = "enqueuing"
            job = await redis.enqueue_job("whatsapp_send", payload, _job_id=new_id)
            if job is None:
                _fail(f"a job with id {job_id!r} already exists")
            phase[0] = "enqueued"
            click.echo(f"enqueued {job.job_id}")  # before any wait: an interrupted wait still names the job
            if not wait:
                return job.job_id, None, None
            try:
                return job.job_id, await job.result(timeout=timeout), None
            except TimeoutError:
                from .jobstate import describe, locate

                where = describe(await locate(redis, job.job_id))
                return job.job_id, None, TimeoutError(f"no result within {timeout:g} s; {where}")
            except (RedisError, OSError) as exc:
                from .connection import cause

                lost = ConnectionError(
                    f"Redis went away while waiting ({cause(exc)}); the job is enqueued: cgb-worker status {job.job_id}"
                )
                return job.job_id, None, lost
            except Exception as exc:
                return job.job_id, None, exc
        finally:
            await redis.aclose()

    _, result, error = _run(enqueue, interrupted_line)
    if error is not None:
        _fail(f"{type(error).__name__}: {error}")
    if result is not None:
        click.echo(json.dumps(msgspec.to_builtins(result), indent=2, ensure_ascii=False))


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):  # FloatRange lets nan through: no comparison is false for it
        raise click.BadParameter(f"{value} is not a number of seconds", param_hint=name)
    return value


def _wa_template(
    name: str,
    lang: str | None,
    params: tuple[str, ...],
    headers: dict[str, str | None],
    filename: str | None,
    urls: tuple[str, ...],
    payloads: tuple[str, ...],
) -> dict[str, Any]:
    if not lang:
        raise click.UsageError("--wa-template needs --lang")
    template: dict[str, Any] = {"name": name, "language": lang}
    named = [p for p in params if "=" in p]
    if params:
        template["body"] = dict(_parse_var(p) for p in params) if len(named) == len(params) else list(params)
    given = {k: v for k, v in headers.items() if v is not None}
    if len(given) > 1:
        raise click.UsageError("give one --header-* option")
    for kind, value in given.items():
        media: Any = value if kind == "text" else {"url": value}
        if kind == "document" and filename:
            media["filename"] = filename
        template["header"] = {kind: media}
    buttons = []
    for field, items in (("url", urls), ("payload", payloads)):
        for item in items:
            index, sep, value = item.partition("=")
            if not sep or not index.strip().isdigit():
                raise click.BadParameter(f"{item!r} is not INDEX=VALUE")
            buttons.append({"index": int(index), field: value})
    if buttons:
        template["buttons"] = sorted(buttons, key=lambda b: b["index"])
    return template


# -- dead letters -----------------------------------------------------------------------------------------


@main.group("dead-letters")
def dead_letters() -> None:
    """List, show, replay or purge the jobs that finally failed."""


async def _store() -> tuple[Any, DeadLetters]:
    redis = await _pool()
    return redis, DeadLetters(redis)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@dead_letters.command("list")
@click.option("--limit", default=50, show_default=True)
@click.option("--error", "error_type", metavar="CLASS", help="only the errors of this class, e.g. CGBAuthError")
def dl_list(limit: int, error_type: str | None) -> None:
    """The newest failed jobs first."""

    async def go() -> tuple[int, list[Any]]:
        redis, store = await _store()
        try:
            return await store.count(), await store.list(limit, error_type=error_type)
        finally:
            await redis.aclose()

    total, entries = _run(go)
    shown = f", {len(entries)}{'+' if len(entries) == limit else ''} with {error_type}" if error_type else ""
    click.echo(f"{total} dead letter(s){shown}")
    for d in entries:
        to = d.payload.get("to", "?") if isinstance(d.payload, dict) else "?"
        click.echo(f"{d.job_id}  {_when(d.failed_at)}  {d.attempts:>3} tries  {to:<16} {d.error_type}: {d.error}")


@dead_letters.command("show")
@click.argument("job_id")
def dl_show(job_id: str) -> None:
    """One failed job, its masked payload and its error."""

    async def go() -> Any:
        redis, store = await _store()
        try:
            return await store.get(job_id)
        finally:
            await redis.aclose()

    entry = _run(go)
    if entry is None:
        _fail(f"no dead letter {job_id!r}")
    data = msgspec.to_builtins(entry)
    data["failed_at"] = _when(entry.failed_at)
    data["enqueued_at"] = _when(entry.enqueued_at)
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@dead_letters.command("replay")
@click.argument("job_id", required=False)
@click.option("--all", "replay_all", is_flag=True, help="replay every dead letter whose error is retryable")
@click.option(
    "--include-permanent", is_flag=True, help="with --all: permanent errors too (an invalid payload, a wrong key...)"
)
def dl_replay(job_id: str | None, replay_all: bool, include_permanent: bool) -> None:
    """Enqueue a failed job's original payload again, under a new job id (linked to the old one both ways).

    ``--all`` skips the entries whose error is permanent (its class in cgb_worker.errors is not retryable: an
    invalid payload, a refused key, an opt-out...), which would fail again as they are, and says how many it
    skipped; ``--include-permanent`` replays them too (after a fix, such as a corrected CGB key). One JOB_ID
    is replayed whatever its error."""
    from .errors import is_retryable

    if bool(job_id) == replay_all:
        _fail("give one JOB_ID or --all", 2)
    if include_permanent and not replay_all:
        _fail("--include-permanent goes with --all", 2)

    async def go() -> tuple[list[tuple[str, str | None]], int]:
        redis, store = await _store()
        try:
            if not replay_all:
                return [(job_id or "", await store.replay(redis, job_id or ""))], 0
            entries = await store.list(limit=1_000_000)
            chosen = [d.job_id for d in entries if include_permanent or is_retryable(d.error_type)]
            return [(old, await store.replay(redis, old)) for old in chosen], len(entries) - len(chosen)
        finally:
            await redis.aclose()

    replayed, skipped = _run(go)
    missing = [old for old, new in replayed if new is None]
    for old, new in replayed:
        if new is not None:
            click.echo(f"replayed {old} as {new}")
    if missing and not replay_all:
        _fail(f"no dead letter {missing[0]!r}")
    click.echo(f"{len(replayed) - len(missing)} job(s) enqueued again")
    if skipped:
        click.echo(
            f"{skipped} skipped: their error is permanent (dead-letters list shows which); "
            "--include-permanent replays them too"
        )


@dead_letters.command("delete")
@click.argument("job_id")
def dl_delete(job_id: str) -> None:
    """Delete one dead letter (exit 1 when there is none); its send record keeps its usual 7 days."""

    async def go() -> bool:
        redis, store = await _store()
        try:
            return await store.remove(job_id)
        finally:
            await redis.aclose()

    if not _run(go):
        _fail(f"no dead letter {job_id!r}")
    click.echo(f"deleted dead letter {job_id}")


@dead_letters.command("purge")
@click.option("--yes", is_flag=True, help="do it without asking")
def dl_purge(yes: bool) -> None:
    """Delete every dead letter."""
    if not yes and not click.confirm("Delete every dead letter?", default=False):
        _fail("nothing deleted")

    async def go() -> int:
        redis, store = await _store()
        try:
            return await store.purge()
        finally:
            await redis.aclose()

    click.echo(f"purged {_run(go)} dead letter(s)")


# -- erasure ---------------------------------------------------------------------------------------------


@main.command()
@click.argument("phone")
@click.option("--region", help="region for a number written without a country code (CGB_DEFAULT_REGION)")
@click.option("--yes", is_flag=True, help="do it without asking")
def forget(phone: str, region: str | None, yes: bool) -> None:
    """Remove every record of one person from Redis: caches, sends, statuses, dead letters and arq's jobs.

    Reads every key (it costs O(keys)). Needs REDIS_URL and the workers' PHONE_HASH_KEY. Prints how many
    records of each kind it removed, never the number; exit 1 when some of the person's jobs were running,
    since what they write as they end survives: run it again once they have."""
    from .erasure import forget as forget_person
    from .errors import InvalidPhoneError
    from .phones import normalize_phone

    _phone_key(required=True)
    region = (region or os.environ.get("CGB_DEFAULT_REGION") or "").strip().upper() or None
    try:
        normalize_phone(phone, region)
    except InvalidPhoneError as exc:
        _fail(str(exc), 2)
    if not yes and not click.confirm("Remove every record of this number from Redis?", default=False):
        _fail("nothing removed")

    async def go() -> Any:
        redis = await _pool()
        try:
            return await forget_person(redis, phone, default_region=region)
        finally:
            await redis.aclose()

    done = _run(go)
    click.echo(f"{done.jobs} job(s) of this person found; removed:")
    for kind, count in done.removed.items():
        click.echo(f"  {kind:<20} {count}")
    if not done.removed:
        click.echo("  nothing: no record names this number")
    if done.kept_suppression:
        click.echo(
            "kept: its suppression (opt-out) entry, which holds only the number's keyed hash: erasing it would let "
            "the next job message someone who asked us to stop ('cgb-worker suppress remove' lifts it)"
        )
    if done.running:
        _fail(f"{done.running} of its jobs were running: run forget again once they have ended")


# -- suppression -----------------------------------------------------------------------------------------------


@main.group()
def suppress() -> None:
    """The suppression list (opt-outs): numbers that are not sent some categories of message.

    Numbers are stored only as their keyed hash (PHONE_HASH_KEY), so the list shows each entry by its hash's first
    12 characters; give a PHONE to see that number's entry."""


def _checked_phone(phone: str, region: str | None) -> tuple[str, str | None]:
    """The phone in E.164 and the region it was read with; exit 2 when it is no phone."""
    from .errors import InvalidPhoneError
    from .phones import normalize_phone

    _phone_key(required=True)
    region = (region or os.environ.get("CGB_DEFAULT_REGION") or "").strip().upper() or None
    try:
        return normalize_phone(phone, region), region
    except InvalidPhoneError as exc:
        _fail(str(exc), 2)


async def _on_redis(use: Callable[[Any], Awaitable[_T]], *, give_up_after: float | None = None) -> _T:
    redis = await _pool(give_up_after)
    try:
        return await use(redis)
    finally:
        await redis.aclose()


def _entries(entries: Any) -> str:
    return "; ".join(f"{e.scope} since {e.since} ({e.reason})" for e in entries)


_REGION = click.option("--region", help="region for a number written without a country code (CGB_DEFAULT_REGION)")


@suppress.command("add")
@click.argument("phone")
@click.option(
    "--category",
    "scope",
    type=click.Choice(["all", "marketing"]),
    default="all",
    show_default=True,
    help="all: every category but authentication; marketing: marketing only",
)
@_REGION
def suppress_add(phone: str, scope: str, region: str | None) -> None:
    """Suppress a number (reason: operator; an opt-in keyword does not lift it)."""
    from .phones import mask_phone
    from .suppression import Scope, lookup_who, suppress_who

    e164, _ = _checked_phone(phone, region)
    who = keys.who(e164)

    async def go(redis: Any) -> tuple[bool, Any]:
        added = await suppress_who(redis, who, scope=cast("Scope", scope), reason="operator")
        return added, await lookup_who(redis, who)

    added, found = _run(lambda: _on_redis(go))
    click.echo(f"{mask_phone(e164)} {'suppressed' if added else 'already suppressed'}: {_entries(found.entries)}")


@suppress.command("remove")
@click.argument("phone")
@_REGION
def suppress_remove(phone: str, region: str | None) -> None:
    """Lift every opt-out of a number, whatever put it there (exit 1 when it had none)."""
    from .phones import mask_phone
    from .suppression import unsuppress_who

    e164, _ = _checked_phone(phone, region)
    lifted = _run(lambda: _on_redis(lambda redis: unsuppress_who(redis, keys.who(e164))))
    if not lifted:
        _fail(f"{mask_phone(e164)} was not suppressed: nothing removed")
    click.echo(f"{mask_phone(e164)} no longer suppressed ({lifted} scope(s) lifted)")


@suppress.command("list")
@click.argument("phone", required=False)
@_REGION
def suppress_list(phone: str | None, region: str | None) -> None:
    """Every suppressed number, by hash (oldest first), or one PHONE's entry."""
    from .phones import mask_phone
    from .suppression import list_suppressed, lookup_who

    if phone is not None:
        e164, _ = _checked_phone(phone, region)
        found = _run(lambda: _on_redis(lambda redis: lookup_who(redis, keys.who(e164))))
        shown = f"{mask_phone(e164)} (hash {found.who[:12]})"
        click.echo(f"{shown}: {_entries(found.entries)}" if found.entries else f"{shown}: not suppressed")
        return
    _phone_key(required=False)
    listed = _run(lambda: _on_redis(list_suppressed))
    click.echo(f"{len(listed)} suppressed number(s)")
    for s in listed:
        for e in s.entries:
            click.echo(f"{s.who[:12]}  {e.scope:<9}  {e.since}  {e.reason}")


# -- the fleet: workers and health -------------------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON object per worker, on one line each")
def workers(as_json: bool) -> None:
    """The workers with a live heartbeat: host, pid, up since, jobs running, last poll, version.

    A heartbeat lives three WORKER_HEALTH_CHECK_INTERVALs, so a stopped or killed worker leaves the list on its
    own; one that missed two refreshes, or has not polled the queue for longer than its job timeout allows, is
    marked STALE (exit 1 when one is)."""
    from .heartbeat import live_workers

    found = _run(lambda: _on_redis(live_workers))
    if as_json:
        for seen in found:
            click.echo(
                json.dumps(
                    {
                        **msgspec.to_builtins(seen.beat),
                        "heartbeat_age": round(seen.age, 3),
                        "poll_age": None if seen.poll_age is None else round(seen.poll_age, 3),
                        "stale": seen.stale,
                    }
                )
            )
    else:
        click.echo(f"{len(found)} worker(s)")
        if found:
            click.echo(f"{'host':<24} {'pid':>7}  {'up since (UTC)':<19}  {'running':>9}  {'last poll':>9}  version")
        for seen in found:
            b = seen.beat
            state = f"  STALE: {seen.stale}" if seen.stale else ""
            click.echo(
                f"{b.host:<24} {b.pid:>7}  {_when(b.started):<19}  {f'{b.running}/{b.max_jobs}':>9}  "
                f"{_ago(seen.poll_age):>9}  {b.version}{state}"
            )
    if any(seen.stale for seen in found):
        sys.exit(1)


@main.command()
def health() -> None:
    """The image's HEALTHCHECK: exit 0 when every worker running here (this host name, this PID namespace: in
    a container, the container's worker) has a fresh heartbeat and polled the queue recently; else exit 1 with
    one line. Unlike ``arq --check``, another worker alive on the same Redis does not make this one healthy."""
    from .heartbeat import judge_here, live_workers

    where = ""
    with contextlib.suppress(ConfigError):  # a bad one is told by _on_redis
        where = str(load_redis_config(os.environ))
    mine, problems = judge_here(_run(lambda: _on_redis(live_workers, give_up_after=0)), where)  # within 10 s
    if problems:
        _fail("unhealthy: " + "; ".join(problems))
    if not mine:
        _fail("unhealthy: no worker running here has a live heartbeat")
    click.echo(
        "healthy: "
        + "; ".join(f"worker pid {s.beat.pid}, {s.beat.running} running, polled {_ago(s.poll_age)} ago" for s in mine)
    )


# -- run: the worker ------------------------------------------------------------------------------------


@main.command()
def run() -> None:
    """Run the worker: arq's own, as ``arq cgb_worker.WorkerSettings`` runs it.

    It rides out a Redis restart (every Redis command is retried for about two minutes) and exits only when
    Redis stays away longer, or on SIGTERM/SIGINT, which let running sends finish first. A bad configuration
    exits at once with status 2 and every problem listed; then the start-up checks run (README, "Starting up"):
    Redis awaited up to REDIS_CONNECT_TIMEOUT, the server, the data format, the CGB key."""
    from .worker import main as run_worker

    run_worker()


@main.command()
@click.option("--host", help="address to listen on (WEBHOOK_HOST, default 0.0.0.0)")
@click.option("--port", type=int, help="port to listen on (WEBHOOK_PORT, default 8090)")
def webhooks(host: str | None, port: int | None) -> None:
    """Run the WhatsApp webhook receiver (POST /webhooks/whatsapp): statuses become delivery timelines.

    Needs WABA_APP_SECRET (and WABA_VERIFY_TOKEN for Meta's handshake), the workers' PHONE_HASH_KEY and
    REDIS_URL; not the CGB key."""
    from loguru import logger

    from .logs import setup_logging
    from .receipts.app import serve
    from .settings import load_receiver_settings

    try:
        settings = load_receiver_settings()
    except ConfigError as exc:
        _fail(f"the webhook receiver cannot start: {exc}", 2)
    keys.use_phone_key(settings.phone_hash_key.get_secret_value())
    setup_logging(settings.log_level, json_lines=settings.log_json)
    for warning in settings.warnings:
        logger.warning(warning)
    serve(settings, host=host, port=port)


@main.command()
@click.option("--host", help="address to listen on (CONSOLE_HOST, default 127.0.0.1)")
@click.option("--port", type=click.IntRange(1, 65535), help="port to listen on (CONSOLE_PORT, default 8070)")
def console(host: str | None, port: int | None) -> None:
    """Run the operations console: the queue, jobs and their deliveries, the dead letters, in a browser.

    Needs REDIS_URL and the workers' PHONE_HASH_KEY; not the CGB key. With CONSOLE_TOKEN set, every page and
    action asks for it (a sign-in form, or Authorization: Bearer); without it the console listens on
    127.0.0.1 only."""
    from .console.serve import serve
    from .logs import setup_logging
    from .settings import load_console_settings

    try:
        settings = load_console_settings(host=host, port=port)
    except ConfigError as exc:
        _fail(f"the console cannot start: {exc}", 2)
    keys.use_phone_key(settings.phone_hash_key.get_secret_value())
    setup_logging(settings.log_level, json_lines=settings.log_json)
    serve(settings, port_name="--port" if port else "CONSOLE_PORT")


STATUS_UNKNOWN = 3
"""``status``'s exit code for a job id nothing knows."""


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="print the JobState (with its Delivery) as JSON")
def status(job_id: str, as_json: bool) -> None:
    """Where a job is, and what happened to its messages.

    Queued (its position and age), deferred until, running, retrying (the try and the last error), succeeded,
    failed or dead-lettered (the error), replayed as another id (and the replay points back), with the delivery
    status and timeline once it sent. A replayed job is followed to its newest replay.

    Exit codes: 0 the job and its delivery are fine or still under way; 1 the job failed (failed,
    dead-lettered, or its newest replay did) or its delivery failed; 3 no record of the job at all."""
    from .jobstate import describe, locate, replays

    try:  # a duration, as the receiver reads it
        after = parse_duration(os.environ.get("STATUS_UNCONFIRMED_AFTER", "").strip() or "86400")
    except ValueError as exc:
        _fail(f"STATUS_UNCONFIRMED_AFTER: {exc}", 2)

    async def go() -> tuple[Any, list[Any]]:
        redis = await _pool()
        try:
            found = await locate(redis, job_id, unconfirmed_after=after)
            return found, await replays(redis, job_id, unconfirmed_after=after)
        finally:
            await redis.aclose()

    found, later = _run(go)
    newest = later[-1] if later else found
    code = STATUS_UNKNOWN if found.state == "unknown" else 1 if newest.failed else 0
    if as_json:
        data = msgspec.to_builtins(found)
        if later:
            data["replays"] = msgspec.to_builtins(later)
        click.echo(json.dumps(data, ensure_ascii=False))
        sys.exit(code)
    click.echo(describe(found))
    for replay in later:
        click.echo(f"  then {describe(replay)}")
    if found.delivery is not None:
        _print_delivery(found.delivery, found.delivery_of)
    sys.exit(code)


def _print_delivery(found: Any, of: str | None) -> None:
    error = f" {found.error.code} ({found.error.meaning})" if found.error else ""
    category = f" ({found.category})" if found.category else ""
    pending = ", sent again soon" if found.resending else ""
    record = f" (the record of {of})" if of else ""
    click.echo(f"delivery{record}: {found.status}{error}{category}{pending}")
    for step in found.steps:
        matched = f", matched by {step.matched_by}" if step.matched_by else ""
        replaces = f", in place of the {step.fallback_for}" if step.fallback_for else ""
        if step.resend_of:
            replaces = f", sent again after the {step.resend_of} failed with {step.resend_code}"
        if step.resending:
            replaces += f", to be sent again as {step.resending}"
        more = f", {len(step.wamids)} WhatsApp messages" if len(step.wamids) > 1 else ""
        doubt = f", {step.unresolved} status(es) that could not be told from another send's" if step.unresolved else ""
        click.echo(f"  {step.step}: {step.status}{matched}{replaces}{more}{doubt}")
        for event in step.events:
            code = ""
            if event.meta and event.meta.get("errors"):
                code = f" ({event.meta['errors'][0].get('code')})"
            click.echo(f"    {event.at}  {event.status}{code}")


# -- the simulator ----------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8089, show_default=True)
@click.option("--token", default="sim-token", show_default=True, help="the X-ACCESS-TOKEN it accepts")
@click.option("--latency", default=0.0, show_default=True, help="seconds added to every API response")
@click.option("--seed", type=int, help="seed for random faults")
@click.option("--no-request-log", is_flag=True, help="keep counts only (for long benchmarks)")
@click.option("--wa-templates", help="a WA_TEMPLATES_FILE of its own: mismatched templates then fail")
def simulator(
    host: str, port: int, token: str, latency: float, seed: int | None, no_request_log: bool, wa_templates: str | None
) -> None:
    """Run the local CGB simulator (API at http://HOST:PORT/api); every option of python -m cgb_worker.simulator."""
    from .simulator import main as run_simulator

    argv = ["--host", host, "--port", str(port), "--token", token, "--latency", str(latency)]
    argv += ["--seed", str(seed)] if seed is not None else []
    argv += ["--no-request-log"] if no_request_log else []
    argv += ["--wa-templates", wa_templates] if wa_templates else []
    run_simulator(argv)  # it says where it listens once it does, or why it cannot, in one line
