"""Stopping a task for sure, on Python 3.11 too.

A cancellation that lands while a task runs takes effect at its next wait, and when that wait is an
``asyncio.wait_for`` whose work finishes in the same turn, Python 3.11's ``wait_for`` returns the work's result
and the cancellation is lost (fixed in 3.12). redis-py writes every command through ``wait_for`` when a socket
timeout is set, so a loop of Redis commands can outlive one ``cancel()``. Our own code waits with
``asyncio.timeout`` instead, and stops tasks with :func:`cancel_and_wait`.
"""

from __future__ import annotations

import asyncio
from typing import Any

RECANCEL_EVERY = 1.0
"""Seconds a cancelled task has to end (its clean-up included) before it is cancelled again."""


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again while a cancellation is lost; what it
    ended with (a result, an error, the cancellation) is dropped. A cancellation of the caller still raises."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_EVERY)
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" for a task stopped on purpose
