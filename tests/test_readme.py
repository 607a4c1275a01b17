"""The README runs as written: its Python blocks, the names it gives Python objects, its commands and variables.

**Which blocks run.** A block fenced `````python`` is a program: a user pastes it into a file and runs it with
``python``, so every such block, now and any added later, is run here by itself in a fresh subprocess (top-level
``await`` does not run there: a block wraps its awaits in ``asyncio.run(main())``). It gets the variables the
README tells a user to set (``REDIS_URL``, ``CGB_API_URL``, ``CGB_API_KEY``, ``PHONE_HASH_KEY``) pointed at
this test's Redis and simulator, and a real worker (``cgb-worker run``, in its own process) processes what it
enqueues. A block must exit 0 without a traceback, and every job it enqueues must succeed and reach the
simulator's outbox. Blocks share nothing: none relies on an earlier one. A block that only defines a function
(the stream consumer) runs as written too, which proves its imports and definitions, and a test below calls it.
What is not a program is fenced otherwise, and not run: ``sh`` for commands, ``toml`` for files, a bare fence
(or ``text``) for listings such as the exception tree, ``pycon`` for an interactive session.

**Names.** Where the README lists a Python object's attributes (``Delivery`` and its parts) they must be the
object's own, in snake_case; where it lists the job's result (a dict), the keys must be ``SendResult``'s wire
names, every one of them. Every ``cgb_worker.…`` path it names resolves; every ``cgb-worker`` command and option
it shows exists; every variable it names is one the code reads.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click
import msgspec
import pytest
from arq.jobs import deserialize_result

import cgb_worker
from cgb_worker.cli import main as cli_main
from cgb_worker.receipts.timeline import Delivery, DeliveryError, DeliveryEvent, StepDelivery
from cgb_worker.serialization import deserialize
from cgb_worker.tasks import cancel_and_wait

from .conftest import Harness, communicate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def blocks(language: str) -> list[str]:
    """The README's fenced blocks whose info string's first word is ``language``."""
    return [m.group(2) for m in FENCE.finditer(README) if (m.group(1).split() or [""])[0] == language]


PYTHON = blocks("python")


def _block_id(block: str) -> str:
    """A block's test id: its line in the README."""
    return f"line{README[: README.index(block)].count(chr(10)) + 1}"


def the_block(*needles: str) -> str:
    """The one Python block that holds every needle (so a test follows its block wherever it moves)."""
    [found] = [b for b in PYTHON if all(n in b for n in needles)]
    return found


# -- running a block -----------------------------------------------------------------------------------------


class Ran(msgspec.Struct):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
async def worker(harness: Harness) -> AsyncIterator[list[bytes]]:
    """A real worker, ``cgb-worker run``, on the test's Redis and simulator, as the README runs it; its log lines."""
    harness.set_env(CGB_TEMPLATE_VISA_APPROVED=None)  # the README's template is found by its flow's name
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_", "METRICS_"))}
    env.update(harness.env, LOG_LEVEL="INFO")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "cgb-worker"), "run", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    lines: list[bytes] = []
    while not any(b"cgb-worker ready" in line for line in lines):
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert line, b"".join(lines)
        lines.append(line)

    async def drain() -> None:  # a full pipe would stop the worker
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            lines.append(line)

    draining = asyncio.create_task(drain())
    try:
        yield lines
    finally:
        proc.terminate()
        await proc.wait()
        await draining


async def run_block(block: str, harness: Harness, tmp_path: Path) -> Ran:
    """Run ``block`` as a script file, in a directory of its own, with the README's variables."""
    script = tmp_path / "snippet.py"
    script.write_text(block)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_", "METRICS_"))}
    env.update({k: harness.env[k] for k in ("REDIS_URL", "CGB_API_URL", "CGB_API_KEY", "PHONE_HASH_KEY")})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await communicate(proc, 120)  # a guard against a hang, not a timing
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def results(redis: Any) -> dict[str, dict[str, Any]]:
    """Every arq job result in Redis, by job id: ``success`` and ``result`` as arq stored them."""
    found: dict[str, dict[str, Any]] = {}
    async for key in redis.scan_iter(match="arq:result:*"):
        stored = deserialize_result(await redis.get(key), deserializer=deserialize)
        found[key.decode().removeprefix("arq:result:")] = {"success": stored.success, "result": stored.result}
    return found


def test_the_readme_has_python_blocks_and_no_top_level_await() -> None:
    assert len(PYTHON) >= 3
    for block in PYTHON:
        ast.parse(block)  # top-level ``await`` is a SyntaxError outside a coroutine: it would not run as a script


@pytest.mark.parametrize("block", PYTHON, ids=[_block_id(b) for b in PYTHON])
async def test_every_python_block_runs_as_written(
    block: str, harness: Harness, worker: list[bytes], redis_client: Any, tmp_path: Path
) -> None:
    ran = await run_block(block, harness, tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr
    # what the block enqueued, the worker sent: every job it made succeeded, and each sent what it reports
    for job_id, stored in (await results(redis_client)).items():
        assert stored["success"], (job_id, stored)
        sent = [m for m in harness.sim.state.outbox if m["contact_id"] == stored["result"]["contactId"]]
        assert sent, (job_id, harness.sim.state.outbox)


async def test_the_producer_block_sends_its_template(
    harness: Harness, worker: list[bytes], redis_client: Any, tmp_path: Path
) -> None:
    """The first block: a template with a variable, enqueued through ``create_pool``, its result a dict."""
    ran = await run_block(the_block("enqueue_job", '"visa_approved"'), harness, tmp_path)
    assert ran.returncode == 0, ran.stderr
    job_id, contact_id, kind = ran.stdout.split()
    assert (contact_id, kind) == ("972500000001", "template")
    [message] = harness.sim.state.outbox
    assert (message["phone"], message["kind"], str(message["flow_id"])) == ("+972500000001", "flow", "1752250957765")
    contact = harness.sim.state.contacts[972500000001]
    assert [v for fid, v in contact["fields"].items() if harness.sim.state.fields[fid].name == "first_name"] == ["Dana"]
    assert (await results(redis_client))[job_id]["result"]["contactId"] == "972500000001"


async def test_the_delivery_block_reads_snake_case_attributes(
    harness: Harness, worker: list[bytes], redis_client: Any, tmp_path: Path
) -> None:
    """The block under *Reading it*: ``d.job_id`` and the steps' attributes, on a text sent to a new contact."""
    ran = await run_block(the_block("delivery(redis"), harness, tmp_path)
    assert ran.returncode == 0, ran.stderr
    job_id, status, rest = ran.stdout.split(" ", 2)
    assert status == "accepted"  # no receiver here: CGB took it, and nothing more is known
    assert rest.startswith("[('text', 'accepted', '")
    assert rest.rstrip().endswith("', None)]")
    [message] = harness.sim.state.outbox
    assert (message["phone"], message["kind"], message["text"]) == ("+12025550100", "text", "Your visa is ready")
    assert job_id in await results(redis_client)


async def test_the_stream_block_consumes_and_acknowledges(redis_client: Any) -> None:
    """The block under *The stream* defines ``follow_deliveries``: run it over entries written as ``apply.lua``
    writes them (job, step, status, wamid, error, at) until its group has read and acknowledged them all."""
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(the_block("async def follow_deliveries"), "README.md", "exec"), namespace)  # noqa: S102
    ids = [
        await redis_client.xadd(
            "cgb:deliveries",
            {"job": f"job-{n}", "step": "text", "status": "delivered", "wamid": "", "error": "", "at": "1"},
        )
        for n in range(3)
    ]
    follow = asyncio.create_task(namespace["follow_deliveries"](redis_client))
    try:
        while True:
            groups = await redis_client.xinfo_groups("cgb:deliveries")  # none until the function has made it
            if groups and groups[0]["last-delivered-id"] == ids[-1] and groups[0]["pending"] == 0:
                break
            assert not follow.done(), follow.exception()
            await asyncio.sleep(0.05)
    finally:
        await cancel_and_wait(follow)
    assert [g["name"] for g in groups] == [b"visa-backend"]


# -- the names the README gives Python objects ---------------------------------------------------------------


def _paragraph(start: str) -> str:
    """The README's text from ``start`` to the next bullet or blank line."""
    begin = README.index(start)
    ends = [i for i in (README.find("\n- ", begin), README.find("\n\n", begin)) if i != -1]
    return README[begin : min(ends)]


def _ticked(text: str) -> set[str]:
    """Every identifier the text puts in backticks, alone or as ``name=…``/``name: …``."""
    return {m.group(1) for m in re.finditer(r"`([A-Za-z_][A-Za-z0-9_]*)(?:\s*[=:][^`]*)?`", text)}


def _fields(*types: type[msgspec.Struct]) -> tuple[set[str], set[str]]:
    """The types' attribute names and their wire names."""
    attrs: set[str] = set()
    wire: set[str] = set()
    for t in types:
        info = msgspec.structs.fields(t)
        attrs |= {f.name for f in info}
        wire |= {f.encode_name for f in info}
    return attrs, wire


def test_the_delivery_is_described_by_its_attributes() -> None:
    """The bug this pins: the README listed ``jobId`` and ``matchedBy`` for what Python spells ``job_id``."""
    text = _paragraph("- **Reading it.**")
    prose = text[: text.index("As JSON")]  # the sentence after it gives the JSON spellings, on purpose
    attrs, wire = _fields(Delivery, StepDelivery, DeliveryEvent, DeliveryError)
    named = _ticked(prose)
    assert not (named & (wire - attrs)), "camelCase where the attribute is snake_case"
    assert {"job_id", "status", "wamid", "error", "events", "steps", "matched_by", "accepted_at"} <= named & attrs
    for name in ("jobId", "matchedBy"):
        assert name in wire
    # elsewhere, a Delivery field in backticks with a Python value (``name="…"``) is an attribute too
    for m in re.finditer(r"`([A-Za-z_]+)=[^`]*`", README):
        if m.group(1) in attrs | wire:
            assert m.group(1) in attrs, m.group(0)


def test_the_result_lists_every_key_of_the_dict() -> None:
    text = _paragraph("**The result** of a successful job")
    _attrs, wire = _fields(cgb_worker.SendResult)
    named = _ticked(text)
    assert wire <= named, wire - named
    snake_only = {n for n in named if "_" in n} - wire
    assert not snake_only & _fields(cgb_worker.SendResult)[0]


def test_every_cgb_worker_path_resolves() -> None:
    import importlib

    paths = set(re.findall(r"\bcgb_worker(?:\.[A-Za-z_][A-Za-z0-9_]*)+", README))
    assert "cgb_worker.delivery" in paths
    for path in sorted(paths):
        parts = path.split(".")
        if parts[-1] == "WorkerSettings":  # built from the environment on first use: named, not built, here
            assert "WorkerSettings" in cgb_worker.__all__
            continue
        obj: Any = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], start=1):
            # a submodule not imported by its package is imported by name
            obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(".".join(parts[: i + 1]))
    from cgb_worker.receipts.inbox import Processor

    for attr in re.findall(r"`Processor\.([a-z_]+)", README):
        assert hasattr(Processor, attr), attr


# -- commands and variables ----------------------------------------------------------------------------------


def _commands() -> list[str]:
    """Every ``cgb-worker …`` the README shows: in backticks, and on the lines of its ``sh`` blocks. ``python -m
    cgb_worker.simulator`` counts as ``cgb-worker simulator``, which takes the same options (``test_cli`` pins it)."""
    ticked = " ".join(re.findall(r"`[^`]*`", README)).replace("python -m cgb_worker.simulator", "cgb-worker simulator")
    found = [m.group(0) for m in re.finditer(r"cgb-worker [^`\n]*", ticked)]
    for block in blocks("sh"):
        found += [m.group(0) for m in re.finditer(r"cgb-worker [^#\n]*", block)]
    assert any(f.startswith("cgb-worker simulator --port") for f in found)
    return found


def test_every_command_and_option_shown_exists() -> None:
    """Each ``cgb-worker`` command line in the README names commands and options ``--help`` lists. A group's
    alternatives (``dead-letters list | show ID | replay (ID | --all)``) are each checked as their own command."""
    commands = _commands()
    assert len(commands) > 20
    for line in commands:
        group: click.Group = cli_main
        command: click.Command = cli_main
        path = group_path = ["cgb-worker"]
        for word in (w.strip("()[]|,.;:\\") for w in line.split()[1:]):
            if word in group.commands:  # a subcommand (the first, or another alternative of the same group)
                command = group.commands[word]
                path = [*group_path, word]
                if isinstance(command, click.Group):
                    group, group_path = command, path
                continue
            option = word.split("=", 1)[0]
            if re.fullmatch(r"--?[a-zA-Z][a-z0-9-]*", option):
                known = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"--help", "-h"}
                if command is cli_main:
                    known |= {"--version", "-V"}
                assert option in known, f"{' '.join(path)}: {option} (in {line!r})"
        assert path != ["cgb-worker"] or "--version" in line or "-V" in line, line


def test_the_help_of_every_command_lists_what_the_readme_says() -> None:
    """``cgb-worker --help`` (the installed command) lists every command the README's table has a row for, and
    ``cgb-worker X --help`` of each answers (in process: a subprocess each costs seconds on a busy machine)."""
    from click.testing import CliRunner

    table = set(re.findall(r"^\| `cgb-worker ([a-z][a-z-]*)", README, re.M))
    assert table == set(cli_main.commands)  # and the table has a row for every command
    listed = subprocess.run([str(BIN / "cgb-worker"), "--help"], capture_output=True, text=True, check=True).stdout
    assert table <= set(re.findall(r"^  ([a-z][a-z-]*) ", listed, re.M))
    for name in sorted(table):
        out = CliRunner().invoke(cli_main, [name, "--help"], prog_name="cgb-worker")
        assert out.exit_code == 0, (name, out.output)
        assert out.output.startswith("Usage: cgb-worker " + name), out.output


def _read_by_the_code() -> set[str]:
    """Every string constant in the package's code (docstrings left out): the names it can read."""
    found: set[str] = set()
    for source in (ROOT / "cgb_worker").rglob("*.py"):
        tree = ast.parse(source.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        found |= {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        }
    return found


NOT_THE_PACKAGES = {
    "SSL_CERT_FILE": "container/image.sh",  # OpenSSL reads it; the stand-in base image sets it
    "PYTEST_ARGS": "Makefile",
    "CGB_TEST_REDIS_URL": "tests/conftest.py",
    "UV_PYTHON_DOWNLOADS": "Makefile",
}
"""Variables the README names that something other than the package reads, and where that is."""


def test_every_variable_named_is_read() -> None:
    # a name after a dot is an attribute (`cgb_worker.preflight.FORMAT_VERSION`), checked with the paths
    named = set(re.findall(r"(?<![.\w])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", README))
    strings = _read_by_the_code()
    prefixes = {s for s in strings if s.endswith("_") and s.isupper()}  # CGB_TEMPLATE_<NAME>
    for name in sorted(named):
        if name in {"JOB_ID"}:  # a command's argument, not a variable
            continue
        if name in NOT_THE_PACKAGES:
            where = ROOT / NOT_THE_PACKAGES[name]
            assert name in where.read_text(), name
            continue
        assert name in strings or any(name.startswith(p) and name != p for p in prefixes), name


def test_every_make_target_shown_exists() -> None:
    shown = re.findall(r"`make ([a-z][a-z-]*)", README)
    for block in blocks("sh"):
        shown += re.findall(r"^make ([a-z][a-z-]*)", block, re.M)
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    assert {"demo", "test", "image"} <= set(shown)
    assert set(shown) <= targets, set(shown) - targets


def test_the_error_attributes_named_exist() -> None:
    """``retryable`` on every error, ``retry_after`` on a 429, ``error_type`` on a job that died of another error."""
    for name in ("JobFailedError", "CGBRateLimitError", "CGBTimeoutError", "InvalidPhoneError"):
        assert f"`{name}`" in README or name in README
        assert isinstance(getattr(cgb_worker, name).retryable, bool)
    assert cgb_worker.CGBRateLimitError("slow down", retry_after=2.0).retry_after == 2.0
    assert cgb_worker.JobFailedError("boom", error_type="KeyError").error_type == "KeyError"
    for attribute in ("retryable", "retry_after", "error_type"):
        assert attribute in README
