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
import asyncio
import bisect
import collections
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
from aiohttp import web

from bench.measure import percentile

SINGLE_PATH = "/v1/subscriptions"
BATCH_PATH = "/v1/subscriptions/batch"
# Where packages come from, roughly as a shop's carriers share them.
CARRIERS = ("ups", "ups", "ups", "fedex", "fedex", "usps", "usps", "dhl_express")


@dataclasses.dataclass(frozen=True)
class Prepared:
    path: str
    body: bytes
    items: int  # subscriptions asked for in this request


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


def prepare(spec: dict[str, Any]) -> list[Prepared]:
    """`count` single subscriptions, or `count` batches of `size`, each package new."""
    prefix, count = str(spec["prefix"]), int(spec["count"])
    if spec["kind"] == "single":
        return [Prepared(SINGLE_PATH, _json(subscription(prefix, i)), 1) for i in range(count)]
    size = int(spec["size"])
    return [
        Prepared(
            BATCH_PATH,
            _json({"subscriptions": [subscription(prefix, b * size + i) for i in range(size)]}),
            size,
        )
        for b in range(count)
    ]


async def send(
    url: str,
    requests: list[Prepared],
    headers: dict[str, str],
    concurrency: int,
    min_s: float = 0.0,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Send every request, `concurrency` in flight over as many keep-alive connections; the
    whole list again (a further pass) while less than `min_s` has passed."""
    base = url.rstrip("/")
    all_headers = {"Content-Type": "application/json", **headers}
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    finished: list[float] = []
    items = 0
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    began = time.perf_counter()
    passes = 0

    def indices() -> Iterator[int]:
        nonlocal passes
        while True:
            passes += 1
            yield from range(len(requests))
            if time.perf_counter() - began >= min_s:
                return

    next_index = indices()

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal items
        for index in next_index:
            prepared = requests[index]
            started = time.perf_counter()
            try:
                async with session.post(
                    f"{base}{prepared.path}", data=prepared.body, headers=all_headers
                ) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                statuses[type(error).__name__] += 1
            now = time.perf_counter()
            finished.append(now - began)
            latencies.append(now - started)
            items += prepared.items

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started_at, began = time.time(), time.perf_counter()
        await asyncio.gather(*(sender(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    done = sorted(finished)
    ms = [1000.0 * v for v in latencies]
    # The middle 80% of completions: no ramp-up, no tail of the last few senders.
    low, high = int(0.1 * len(done)), int(0.9 * len(done)) - 1
    steady = (high - low) / (done[high] - done[low]) if high > low else math.nan
    return {
        "requests": len(done),
        "items": items,
        "passes": passes,
        "statuses": dict(statuses),
        "elapsed_s": elapsed,
        "per_s": len(done) / elapsed if elapsed > 0 else math.nan,
        "items_per_s": items / elapsed if elapsed > 0 else math.nan,
        "steady_per_s": steady,
        "latency_ms": {
            "p50": percentile(ms, 0.5),
            "p90": percentile(ms, 0.9),
            "p99": percentile(ms, 0.99),
            "max": max(ms, default=math.nan),
        },
        "timeline_per_s": [
            bisect.bisect_left(done, second + 1) - bisect.bisect_left(done, second)
            for second in range(int(elapsed) + 1)
        ],
        "started_at": started_at,
        "concurrency": concurrency,
    }


class LoadGenerator:
    def __init__(self) -> None:
        self.loads: dict[str, list[Prepared]] = {}

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
        result = await send(spec["url"], requests, spec["headers"], int(spec["concurrency"]))
        return web.json_response(result)

    async def run(self, request: web.Request) -> web.Response:
        spec: dict[str, Any] = await request.json()
        requests = self.loads[spec["load"]]
        min_s = float(spec.get("min_s", 0.0))
        result = await send(spec["url"], requests, spec["headers"], int(spec["concurrency"]), min_s)
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
