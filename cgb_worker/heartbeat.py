"""One heartbeat per worker: what ``cgb-worker workers`` lists and ``cgb-worker health`` checks.

arq's own health key (``arq --check``) is one key per queue, shared by the whole fleet: it says that *some*
worker is alive. Here each worker process keeps a key of its own (:func:`cgb_worker.keys.worker`), rewritten
every ``WORKER_HEALTH_CHECK_INTERVAL`` and living three intervals, so a worker killed outright disappears
on its own. It holds:

* who: ``host``, ``pid`` and ``pidns`` (the process's PID namespace on Linux, so that containers sharing the
  host's network, and so its host name, are told apart), ``version``, ``queue``, ``max_jobs``;
* since when: ``started`` (the worker's clock, for display only);
* what it does: ``running`` (jobs running now, read from arq's ``Worker.tasks``), ``jobs_complete``,
  ``jobs_failed``, ``jobs_retried`` (arq's counters);
* ``poll_age``: seconds since arq last read the queue, as of the refresh. arq calls ``Worker.start_jobs`` on
  every poll that finds a free slot; the worker's one override of arq (:func:`cgb_worker.worker.
  survive_lost_claims`) stamps the time there, in memory: the heartbeat adds no Redis command per job or
  per poll, only one script call per interval;
* ``interval`` and ``poll_limit``: the refresh interval, and how old a poll may be on a healthy worker. A worker
  whose every slot is busy does not poll until a job ends, which arq's ``job_timeout`` bounds, so the limit
  is ``job_timeout + poll_delay + 10`` s.

Ages are read by Redis's clock alone (the key's PTTL), never by comparing the reader's clock with the
worker's. A heartbeat is *stale* when it missed two refreshes or its poll is older than ``poll_limit``.

A worker that hangs (a frozen process, a blocked event loop) stops refreshing its heartbeat, which then expires
and would leave ``health`` nothing to judge it by. So each worker also leaves a note on its own machine
(:func:`local_dir`: a file named by its pid, holding its heartbeat's id and its process's start time, under a
directory of the user's own, 0700, named by a hash of its Redis), and ``health`` judges every worker with a
note whose process is still there: no heartbeat, or a stale one, is unhealthy. A worker killed outright leaves a
note its pid no longer matches (gone, or another process's by its start time), which ``health`` removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from loguru import logger
from redis.asyncio import Redis

from .scripts import HeartbeatScript, WorkersScript
from .tasks import cancel_and_wait

LIFETIMES = 3
"""A heartbeat lives this many refresh intervals."""
POLL_SLACK = 10.0
"""Seconds on top of ``job_timeout + poll_delay`` before a worker that has not polled is stale."""


class Heartbeat(msgspec.Struct, kw_only=True, frozen=True):
    """One worker's heartbeat, as stored (JSON). New fields get defaults: old and new workers share a fleet."""

    id: str
    host: str
    pid: int
    pidns: str = ""
    version: str
    queue: str
    max_jobs: int
    started: float
    interval: float
    poll_limit: float
    poll_age: float | None = None
    running: int = 0
    jobs_complete: int = 0
    jobs_failed: int = 0
    jobs_retried: int = 0


class Seen(msgspec.Struct, kw_only=True, frozen=True):
    """A heartbeat as a reader finds it: ``age`` (seconds since its refresh, by Redis's clock), the poll's age
    now, and whether it is stale (and why)."""

    beat: Heartbeat
    age: float
    poll_age: float | None
    stale: str | None


def pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]``), or "" where there is none to read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Heartbeat).decode


class WorkerHeartbeat:
    """Keeps one worker's heartbeat: :meth:`start` in ``on_startup``, :meth:`polled` on every poll (in
    memory), :meth:`stop` in ``on_shutdown``. Refresh errors are logged, never raised: a heartbeat must not
    stop the worker it reports on."""

    def __init__(
        self,
        redis: Redis,
        *,
        queue: str,
        max_jobs: int,
        interval: float,
        job_timeout: float,
        poll_delay: float,
        where: str = "",
    ) -> None:
        from . import __version__

        self._script = HeartbeatScript(redis)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.id = f"{self.host}:{self.pid}:{secrets.token_hex(3)}"
        self._fixed: dict[str, Any] = {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "pidns": pid_namespace(),
            "version": __version__,
            "queue": queue,
            "max_jobs": max_jobs,
            "started": time.time(),
            "interval": interval,
            "poll_limit": job_timeout + poll_delay + POLL_SLACK,
        }
        self.interval = interval
        self._note = local_dir(where) / str(self.pid)
        self._worker: Any = None
        self._last_poll: float | None = None
        self._first_poll = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def polled(self, worker: Any) -> None:
        """arq read the queue (called from ``Worker.start_jobs``): stamp the time, in memory only."""
        self._worker = worker
        self._last_poll = time.monotonic()
        if not self._first_poll.is_set():
            self._first_poll.set()  # the refresher writes at once, so the first poll shows without waiting

    def beat(self) -> Heartbeat:
        worker = self._worker
        poll_age = None if self._last_poll is None else round(time.monotonic() - self._last_poll, 3)
        beat = Heartbeat(**self._fixed, poll_age=poll_age)
        if worker is None:
            return beat
        return msgspec.structs.replace(  # arq's public counters and its dict of job tasks
            beat,
            running=sum(not t.done() for t in worker.tasks.values()),
            jobs_complete=worker.jobs_complete,
            jobs_failed=worker.jobs_failed,
            jobs_retried=worker.jobs_retried,
        )

    async def write(self) -> None:
        ttl_ms = int(self.interval * LIFETIMES * 1000)
        await self._script.write(self.id, _encode(self.beat()), ttl_ms=ttl_ms, now_ms=int(time.time() * 1000))

    async def start(self) -> None:
        await self.write()
        started = _process_start(self.pid)
        if started is not None:  # without /proc a note could not tell a reused pid: health judges by heartbeats
            try:
                _write_note(self._note, f"{self.id}\n{started}\n")
            except OSError as exc:
                logger.warning("could not leave the worker's local note for cgb-worker health: {}", exc)
        self._task = asyncio.create_task(self._refresh(), name="cgb-heartbeat")

    async def _refresh(self) -> None:
        first = True
        while True:
            if first:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):  # not wait_for: see .tasks
                        await self._first_poll.wait()
                first = False
            else:
                await asyncio.sleep(self.interval)
            try:
                await self.write()
            except Exception as exc:
                logger.warning("could not refresh the worker's heartbeat: {}: {}", type(exc).__name__, exc)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        with contextlib.suppress(OSError):
            self._note.unlink(missing_ok=True)
        try:
            await self._script.remove(self.id)
        except Exception as exc:  # it expires by itself
            logger.warning("could not remove the worker's heartbeat: {}: {}", type(exc).__name__, exc)


async def live_workers(redis: Redis) -> list[Seen]:
    """Every worker with a live heartbeat, by host and pid; ages by Redis's clock (the key's time left)."""
    found: list[Seen] = []
    for raw, left_ms in await WorkersScript(redis)():
        try:
            beat = _decode(raw)
        except msgspec.DecodeError:
            continue  # written by a future version we cannot read: not ours to judge
        age = max(0.0, beat.interval * LIFETIMES - max(left_ms, 0) / 1000)
        poll_age = None if beat.poll_age is None else beat.poll_age + age
        stale = None
        if age > 2 * beat.interval:
            stale = f"no heartbeat for {age:.0f} s"
        elif poll_age is None:
            stale = "has not polled the queue yet"
        elif poll_age > beat.poll_limit:
            stale = f"last polled the queue {poll_age:.0f} s ago"
        found.append(Seen(beat=beat, age=age, poll_age=poll_age, stale=stale))
    return sorted(found, key=lambda s: (s.beat.host, s.beat.pid, s.beat.started))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_hosts(seen: list[Seen], *, host: str | None = None, pidns: str | None = None) -> list[Seen]:
    """The heartbeats of workers running here: same host name, same PID namespace (where both know it), and a
    process by that pid still here (a worker killed outright leaves a heartbeat for three intervals)."""
    host = socket.gethostname() if host is None else host
    pidns = pid_namespace() if pidns is None else pidns
    return [
        s
        for s in seen
        if s.beat.host == host and (not pidns or not s.beat.pidns or s.beat.pidns == pidns) and _alive(s.beat.pid)
    ]


def local_dir(where: str) -> Path:
    """Where this user's workers on this machine that use the Redis ``where`` (its redacted URL, or its
    sentinels) leave their notes for ``health``: a directory of the user's own (0700), so no other user can
    plant a note or a symlink there; a worker on another Redis is another directory."""
    digest = hashlib.sha256(where.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"cgb-worker-heartbeats-{os.getuid()}" / digest


def _private(folder: Path) -> None:
    """Make ``folder`` (and its parent) this user's own, or raise OSError: a directory another user owns or can
    write to could hold a symlink that makes the note overwrite some other file."""
    for each in (folder.parent, folder):
        with contextlib.suppress(FileExistsError):
            each.mkdir(mode=0o700)
        found = os.lstat(each)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
            raise OSError(f"{each} is not a directory of this user's alone (mode 0700)")


def _write_note(note: Path, text: str) -> None:
    _private(note.parent)
    fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux's /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command's parenthesis


def running_here(where: str) -> dict[int, str]:
    """The heartbeat ids of the workers on this machine that use ``where`` and are still running, by pid."""
    found: dict[int, str] = {}
    folder = local_dir(where)
    try:
        _private(folder)
        notes = [note for note in folder.iterdir() if note.name.isdigit()]
    except OSError:
        return found  # no notes of ours (or a folder we do not trust): judged by the heartbeats alone
    for note in notes:
        try:
            beat_id, started, *_ = (*note.read_text().splitlines(), "", "")
        except OSError:
            continue
        pid = int(note.name)
        if not beat_id or not started or _process_start(pid) != started:
            with contextlib.suppress(OSError):  # the worker is gone (its pid free, or another process's now)
                note.unlink()
            continue
        found[pid] = beat_id
    return found


def judge_here(seen: list[Seen], where: str) -> tuple[list[Seen], list[str]]:
    """``health``'s verdict: this machine's heartbeats, and what is wrong here, one phrase per worker: a stale
    heartbeat, or a worker still running whose heartbeat is gone (it hangs)."""
    mine = this_hosts(seen)
    problems = [f"worker pid {s.beat.pid} {s.stale}" for s in mine if s.stale]
    ids = {s.beat.id for s in seen}
    for pid, beat_id in sorted(running_here(where).items()):
        if beat_id and beat_id not in ids:
            problems.append(f"worker pid {pid} is running but has no heartbeat (it stopped refreshing it)")
    return mine, problems
