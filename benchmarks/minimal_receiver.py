"""The receiver's baseline: a minimal aiohttp app that checks the HMAC of a POST and XADDs the raw body.

No limits, no guard, no processing: ``python -m benchmarks.minimal_receiver PORT`` with ``REDIS_URL`` and
``WABA_APP_SECRET`` set. ``make bench`` answers the same signed posts with it and with ``cgb-worker webhooks``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys

import redis.asyncio
from aiohttp import web


async def receive(request: web.Request) -> web.Response:
    body = await request.read()
    mac = "sha256=" + hmac.new(request.app["secret"], body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, request.headers.get("X-Hub-Signature-256", "")):
        return web.Response(status=401)
    await request.app["redis"].xadd("cgb:webhooks:inbox", {"body": body})
    return web.Response(text="ok")


def main() -> None:
    app = web.Application(client_max_size=3 * 1024 * 1024)
    app["secret"] = os.environ["WABA_APP_SECRET"].encode()
    app["redis"] = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
    app.router.add_post("/webhooks/whatsapp", receive)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
