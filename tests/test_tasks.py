"""cancel_and_wait: a task is stopped even when a cancellation is lost (Python 3.11's wait_for loses one)."""

from __future__ import annotations

import asyncio

import pytest

from cgb_worker import tasks
from cgb_worker.tasks import cancel_and_wait


async def test_a_lost_cancellation_is_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "RECANCEL_EVERY", 0.05)
    cancels: list[str] = []

    async def swallows_the_first() -> None:  # as wait_for does when its work finished in the same turn
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancels.append("cancelled")
                if len(cancels) > 1:
                    raise

    task = asyncio.create_task(swallows_the_first())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()
    assert cancels == ["cancelled", "cancelled"]


async def test_clean_up_runs_and_an_error_is_taken() -> None:
    cleaned: list[str] = []

    async def fails_on_the_way_out() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)  # clean-up that waits is not cut short by another cancel
            cleaned.append("done")
            raise RuntimeError("while closing")  # an error on the way out, taken by cancel_and_wait

    task = asyncio.create_task(fails_on_the_way_out())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert cleaned == ["done"]
    assert isinstance(task.exception(), RuntimeError)


async def test_a_finished_task_is_left_as_it_is() -> None:
    async def three() -> int:
        return 3

    task = asyncio.create_task(three())
    await task
    await cancel_and_wait(task)
    assert task.result() == 3


async def test_the_callers_own_cancellation_still_raises() -> None:
    refusing = True

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                if not refusing:
                    raise

    task = asyncio.create_task(stubborn())
    caller = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not task.done()
    refusing = False
    await cancel_and_wait(task)
    assert task.cancelled()
