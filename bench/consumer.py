"""The notifications suite's consumer: endpoints that answer after a fixed latency, or never.

    python -m bench.consumer --port P [--latency-ms 50]

`POST /e/{name}` is an endpoint: it reads the body, waits `--latency-ms`, answers 204 and
records (arrival time.time(), name, `webhook-id`, the body's `data.tracking_number`). A name
that starts with `dead` never answers (a consumer that is down but holds the connection: the
worst a sender meets, each attempt waiting out its timeout). The harness reads and clears the
records with `POST /_take`; `GET /healthz` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

ARRIVALS = web.AppKey("arrivals", list)
LATENCY_S = web.AppKey("latency_s", float)


async def endpoint(request: web.Request) -> web.Response:
    body = await request.read()
    arrived = time.time()
    name = request.match_info["name"]
    number = None
    if request.query.get("read") == "number":
        number = json.loads(body).get("data", {}).get("tracking_number")
    request.app[ARRIVALS].append((arrived, name, request.headers.get("webhook-id"), number))
    if name.startswith("dead"):
        await asyncio.Event().wait()  # until the sender gives up and closes the connection
    await asyncio.sleep(request.app[LATENCY_S])
    return web.Response(status=204)


async def take(request: web.Request) -> web.Response:
    arrivals: list[Any] = request.app[ARRIVALS]
    taken = list(arrivals)
    arrivals.clear()
    return web.json_response(taken)


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    app = web.Application()
    app[ARRIVALS] = []
    app[LATENCY_S] = args.latency_ms / 1000
    app.router.add_post("/e/{name}", endpoint)
    app.router.add_post("/_take", take)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
