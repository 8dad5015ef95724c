"""The subscribe suite's load generator: prepared `POST /v1/subscriptions` (and `/batch`)
requests from 64 senders, one process.

    python -m bench.apiload --port P

The harness drives it over HTTP on the same port, as it drives `bench/loadgen.py`:

    POST /prepare {"load", "kind": "single"|"batch", "prefix", "count", "size"}  build a list
    POST /warmup  {"url", "kind", "prefix", "requests", "size", "headers", "concurrency"}
    POST /run     {"load", "url", "headers", "concurrency", "min_s"}  send it, answer the figures

A prepared list is fixed bytes: the API and the baseline get the same bodies in the same order
over keep-alive connections of one aiohttp session, `concurrency` requests in flight, the same
headers (the API's bearer token; the baseline ignores it). A baseline gets the list again until
`min_s` has passed. Bodies are built in /prepare, never while measuring.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from aiohttp import web

from bench.sending import Request, send

SINGLE_PATH = "/v1/subscriptions"
BATCH_PATH = "/v1/subscriptions/batch"
# Where packages come from, roughly as a shop's carriers share them.
JSON = {"Content-Type": "application/json"}
CARRIERS = ("ups", "ups", "ups", "fedex", "fedex", "usps", "usps", "dhl_express")


def subscription(prefix: str, index: int) -> dict[str, Any]:
    """The i-th package of a load, as a shop's checkout would subscribe it."""
    return {
        "carrier_code": CARRIERS[index % len(CARRIERS)],
        "tracking_number": tracking_number(prefix, index),
        "reference": f"order-{index}",
        "metadata": {"shop": "bench", "order_id": index},
    }


def tracking_number(prefix: str, index: int) -> str:
    """The harness counts the rows of a load by this prefix."""
    return f"{prefix}{index:09d}"


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def prepare(spec: dict[str, Any]) -> list[Request]:
    """`count` single subscriptions, or `count` batches of `size`, each package new."""
    prefix, count = str(spec["prefix"]), int(spec["count"])
    if spec["kind"] == "single":
        return [Request(SINGLE_PATH, _json(subscription(prefix, i)), JSON) for i in range(count)]
    size = int(spec["size"])
    return [
        Request(
            BATCH_PATH,
            _json({"subscriptions": [subscription(prefix, b * size + i) for i in range(size)]}),
            JSON,
            size,
        )
        for b in range(count)
    ]


class LoadGenerator:
    def __init__(self) -> None:
        self.loads: dict[str, list[Request]] = {}

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def prepare(self, request: web.Request) -> web.Response:
        spec: dict[str, Any] = await request.json()
        began = time.monotonic()
        prepared = prepare(spec)
        self.loads[spec["load"]] = prepared
        return web.json_response(
            {
                "requests": len(prepared),
                "items": sum(p.items for p in prepared),
                "mean_body_bytes": sum(len(p.body) for p in prepared) / max(1, len(prepared)),
                "prepare_s": time.monotonic() - began,
            }
        )

    async def warmup(self, request: web.Request) -> web.Response:
        """Connections, the token cache and statement caches warmed, uncounted: `requests`
        requests of new packages under `prefix`."""
        spec: dict[str, Any] = await request.json()
        shape = {"kind": spec["kind"], "prefix": spec["prefix"], "count": spec["requests"]}
        requests = prepare({**shape, "size": spec.get("size", 1)})
        result = await send(
            spec["url"], requests, int(spec["concurrency"]), headers=spec["headers"]
        )
        return web.json_response(result)

    async def run(self, request: web.Request) -> web.Response:
        spec: dict[str, Any] = await request.json()
        requests = self.loads[spec["load"]]
        min_s = float(spec.get("min_s", 0.0))
        result = await send(
            spec["url"], requests, int(spec["concurrency"]), headers=spec["headers"], min_s=min_s
        )
        return web.json_response(result)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.apiload", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    generator = LoadGenerator()
    app = web.Application()
    app.router.add_get("/healthz", generator.healthz)
    app.router.add_post("/prepare", generator.prepare)
    app.router.add_post("/warmup", generator.warmup)
    app.router.add_post("/run", generator.run)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
