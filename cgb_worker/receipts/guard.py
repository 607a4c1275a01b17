"""The public port's guard: what an anonymous client can hold, bounded in time, count and memory.

aiohttp bounds a request's line and headers in size, but not in time: a client that sends its headers a byte at
a time holds a connection, and a file descriptor, for as long as it likes, and enough of them starve the
process of descriptors (asyncio then logs every failed ``accept``). The guard wraps aiohttp's protocol factory
(the public ``AppRunner.server``) and

* closes a connection that has not sent a whole request's headers within ``read_timeout`` of its first byte
  (or of connecting), or that sits idle between requests for :data:`IDLE_TIMEOUT`;
* keeps at most ``max_connections`` open (never more than the process's file limit allows): a new connection
  over the cap evicts the longest-open one that is not in a request's handler, else the slowest of those whose
  body has been coming in for over :data:`SLOW_BODY` seconds, or is closed when neither is found;
* lends request bodies room from a shared :class:`Budget`, charged for bytes as they arrive, so bodies read at
  once never hold more than ``WEBHOOK_READ_MEMORY``.

Nothing a client does is logged with a traceback or its content: :class:`Noise` counts it and writes at
most one line per :data:`NOISE_EVERY` seconds, for aiohttp's own errors (a malformed request, a client gone
mid-body) and for asyncio's ``accept`` failures alike.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable

from loguru import logger

IDLE_TIMEOUT = 15.0
"""Seconds a kept-alive connection may wait for its next request; Meta opens another when it needs one."""
NOISE_EVERY = 10.0
FD_RESERVE = 64
"""Descriptors kept back from the connection cap for Redis, the admin port and the log."""


class Noise:
    """Counts events of a kind and says so in one line now and then (at most every ``every`` seconds), so that
    what a client, or an outage, can repeat a thousand times a second costs a line, not a thousand. ``line``
    has one ``{}`` for the counts."""

    def __init__(self, count: Callable[[str], None], line: str, *, every: float = NOISE_EVERY) -> None:
        self._count = count
        self.line = line
        self.every = every
        self._since = Counter[str]()
        self._last = 0.0

    def __call__(self, kind: str) -> None:
        self._count(kind)
        self._since[kind] += 1
        if time.monotonic() - self._last >= self.every:
            self.flush()

    def flush(self) -> None:
        """Say what was counted since the last line (on the way out too, so that no count goes unsaid)."""
        if self._since:
            logger.warning(self.line, ", ".join(f"{n} {k}" for k, n in sorted(self._since.items())))
            self._since.clear()
        self._last = time.monotonic()


class _NoiseFilter(logging.Filter):
    """On aiohttp's server logger (and asyncio's): each record becomes a count and, now and then, one line."""

    def __init__(self, noise: Noise, *, only: Callable[[logging.LogRecord], bool] | None = None) -> None:
        super().__init__()
        self.noise = noise
        self.only = only

    def filter(self, record: logging.LogRecord) -> bool:
        if self.only is not None and not self.only(record):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if record.msg == "Unhandled exception" and exc is not None:
            # A handler that raised is ours to fix, whoever sent the request; counted and said now and then,
            # without a traceback (it can hold the request's content)
            self.noise("handler_raised_" + type(exc).__name__)
            return False
        if self.only is not None:
            self.noise("accept_failed")
        elif isinstance(exc, ConnectionError | asyncio.CancelledError):
            self.noise("client_gone")
        else:
            self.noise("bad_request")
        return False


def client_logger(noise: Noise) -> logging.Logger:
    """The logger aiohttp's request handlers are given on the public port."""
    log = logging.getLogger("cgb_worker.receiver.clients")
    log.filters = [_NoiseFilter(noise)]
    log.propagate = False
    return log


def quiet_accept_errors(noise: Noise) -> None:
    """asyncio logs each failed ``accept()`` (out of descriptors) with a traceback: count them instead."""
    log = logging.getLogger("asyncio")
    log.filters = [f for f in log.filters if not isinstance(f, _NoiseFilter)]
    log.addFilter(_NoiseFilter(noise, only=lambda r: "accept" in str(r.msg)))


def return_big_blocks() -> None:
    """Have glibc's malloc give every block of 64 KiB or more back to the system when it is freed.

    Bodies are read in chunks of 64 to 256 KiB. By default glibc raises its mmap threshold to the size of the
    largest block freed, so after one burst of big bodies later chunks come from the heap and stay there:
    a flood of unsigned 3 MiB bodies left the process 50 MiB bigger for good. A fixed threshold (``mallopt``,
    glibc's own tuning call) keeps memory freed when the requests end. Elsewhere (musl, macOS) nothing is done.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def connection_cap(wanted: int, *, reserve: int = 0) -> int:
    """``wanted``, or fewer when the file limit less :data:`FD_RESERVE` and ``reserve`` (the Redis connections
    the requests may hold) is lower; the soft limit is raised to the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE - reserve))


class ConnectionGuard:
    """Per-connection deadlines and the connection cap (the module doc). ``started``/``finished`` are called
    around each request's handler; while a handler runs, its own timeouts apply.

    A deadline is a number on the connection, checked by one sweep every :data:`TICK` seconds (:meth:`run`),
    not a timer per request: setting it costs an assignment, and a deadline is kept to within a tick."""

    def __init__(
        self, *, max_connections: int, read_timeout: float, noise: Noise, idle_timeout: float = IDLE_TIMEOUT
    ) -> None:
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.noise = noise
        self.live: dict[asyncio.BaseTransport, _Guarded] = {}

    async def run(self) -> None:
        """Close the connections whose deadline has passed, every tick, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK)
            now = loop.time()
            for conn in [c for c in self.live.values() if c.deadline and c.deadline <= now]:
                conn.expire()

    def evict(self) -> bool:
        """Close a connection to make room for a new one: the longest-open that is not in a request's handler,
        else, of those still sending a body after :data:`SLOW_BODY` seconds (Meta's come with their headers),
        the one sending it slowest. A client holding connections without sending, or sending bodies slowly, loses
        them to one that sends. False when every connection is in a handler that is not waiting on a body."""
        now = asyncio.get_running_loop().time()
        for transport, conn in self.live.items():
            if not conn.handling:
                return self._evict(transport, conn)
        slowest: tuple[float, asyncio.BaseTransport, _Guarded] | None = None
        for transport, conn in self.live.items():
            if 0 < conn.body_since <= now - SLOW_BODY:
                rate = conn.body_bytes / (now - conn.body_since)
                if slowest is None or rate < slowest[0]:
                    slowest = (rate, transport, conn)
        return self._evict(slowest[1], slowest[2]) if slowest is not None else False

    def _evict(self, transport: asyncio.BaseTransport, conn: _Guarded) -> bool:
        self.noise("evicted_connection")
        self.live.pop(transport)
        conn.deadline = 0.0
        _abort(transport)
        return True

    def reading(self, transport: asyncio.BaseTransport | None, reading: bool) -> None:
        """A handler waits for the rest of its body (True), or no longer does (False)."""
        conn = self.live.get(transport) if transport is not None else None
        if conn is not None:
            conn.body_since = asyncio.get_running_loop().time() if reading else 0.0
            conn.body_bytes = 0

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner)

    def started(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self.live.get(transport) if transport is not None else None
        if conn is not None:
            conn.handling += 1
            conn.deadline = 0.0
            conn.reading = False

    def finished(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self.live.get(transport) if transport is not None else None
        if conn is not None:
            conn.handling -= 1
            if not conn.handling:
                conn.arm(self.read_timeout if conn.more else self.idle_timeout, reading=conn.more)
                conn.more = False


TICK = 0.25
SLOW_BODY = 0.25
"""Seconds after which a body still coming in makes its connection one that a new connection may evict (the
slowest sender first)."""


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the guard's deadlines."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self.guard = guard
        self.factory = factory
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.deadline = 0.0
        """The loop's time by which the connection must have moved on, 0 for none (a handler runs)."""
        self.reading = False
        """Whether the deadline is for a request's headers (else for idleness)."""
        self.handling = 0
        self.more = False
        """Bytes of a further request came while a handler ran."""
        self.body_since = 0.0
        """The loop's time since which a handler has waited for the rest of this connection's body, or 0."""
        self.body_bytes = 0
        """Bytes of that body received since then: what tells a slow sender from a big body."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        if len(guard.live) >= guard.max_connections and not guard.evict():
            guard.noise("refused_connection")
            _abort(transport)
            return
        self.transport = transport
        guard.live[transport] = self
        self.inner = self.factory()
        self.inner.connection_made(transport)
        self.arm(guard.read_timeout, reading=True)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if self.handling:
            if self.body_since:
                self.body_bytes += len(data)
            else:
                self.more = True
        elif not self.reading:
            self.arm(self.guard.read_timeout, reading=True)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None:
            return
        self.deadline = 0.0
        self.guard.live.pop(self.transport, None)  # type: ignore[arg-type]
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def arm(self, seconds: float, *, reading: bool) -> None:
        self.reading = reading
        self.deadline = asyncio.get_running_loop().time() + seconds

    def expire(self) -> None:
        self.deadline = 0.0
        if self.reading:
            self.guard.noise("slow_headers")
        if self.transport is not None:
            _abort(self.transport)


def _abort(transport: asyncio.BaseTransport) -> None:
    """Close at once, unsent data and all (a socket transport can; any other is closed)."""
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


class Budget:
    """Room shared by requests, taken and given back: bytes of bodies being read at once (the module doc), or
    XADDs in flight."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._freed = asyncio.Condition()
        self._waiting = 0

    def try_take(self, size: int) -> bool:
        """Reserve ``size`` if there is room now and nobody is waiting for it (no await: the common case)."""
        if size <= self.free and not self._waiting:
            self.free -= size
            return True
        return False

    async def take(self, size: int, *, wait: float) -> bool:
        """Reserve ``size``, waiting at most ``wait`` seconds; False when there was no room."""
        if self.try_take(size):
            return True
        self._waiting += 1
        try:
            async with asyncio.timeout(wait), self._freed:
                await self._freed.wait_for(lambda: size <= self.free)
                self.free -= size
                return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    def give(self, size: int) -> None:
        self.free += size
        if self._waiting:
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._freed:
            self._freed.notify_all()
