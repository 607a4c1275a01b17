"""The baseline: an arq job that does nothing, with exactly the worker settings cgb-worker uses.

``python -m benchmarks.noop`` runs it on :class:`CGBWorker` (queue ``bench:noop``); with ``--stock``, on arq's
own ``Worker`` (queue ``bench:noop-stock``), as ``arq cgb_worker.WorkerSettings`` would.
"""

from __future__ import annotations

import sys
from typing import Any

from arq.worker import Worker, func

from cgb_worker.worker import CGBWorker, WorkerSettings, settle_gc


async def settle(ctx: dict[str, Any]) -> None:
    settle_gc()  # what cgb-worker's own start-up ends with


async def whatsapp_send(ctx: dict[str, Any], payload: Any = None, **fields: Any) -> dict[str, Any]:
    return {"success": True}


# arq reads a settings class's own __dict__, so the copy is a dict: every knob the same, the job a no-op.
settings: dict[str, Any] = {
    **{k: v for k, v in vars(WorkerSettings).items() if not k.startswith("__")},
    "functions": [func(whatsapp_send, name="whatsapp_send")],
    # Its own queue, so that it can run beside the real worker and the two be measured in turns.
    "queue_name": "bench:noop",
    "health_check_key": "bench:noop:health-check",
    "on_startup": settle,
    "on_shutdown": None,
}


if __name__ == "__main__":
    if "--stock" in sys.argv:
        queue = {"queue_name": "bench:noop-stock", "health_check_key": "bench:noop-stock:health-check"}
        Worker(**{**settings, **queue}).run()
    else:
        CGBWorker(**settings).run()
