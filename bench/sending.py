"""What the load generator (`bench/loadgen.py`) does once its requests are prepared, where wrk
cannot do it: send them all, `concurrency` in flight over as many keep-alive connections of one
aiohttp session, or paced, and measure."""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import gc
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp

from bench.measure import percentile


@dataclasses.dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    headers: Mapping[str, str]
    items: int = 1  # what the request asks for (subscriptions in a batch)


async def send(
    url: str,
    requests: list[Request],
    concurrency: int,
    *,
    headers: Mapping[str, str] | None = None,
    min_s: float = 0.0,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Send every request (with `headers` added to its own); the whole list again (a further
    pass) while less than `min_s` has passed. Answers the figures."""
    base = url.rstrip("/")
    shared = dict(headers or {})
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
            request = requests[index]
            started = time.perf_counter()
            try:
                async with session.post(
                    f"{base}{request.path}",
                    data=request.body,
                    headers={**request.headers, **shared},
                ) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                statuses[type(error).__name__] += 1
            now = time.perf_counter()
            finished.append(now - began)
            latencies.append(now - started)
            items += request.items

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # The prepared requests are many objects: frozen out of the cyclic collector while
        # they are sent, its pauses here do not show up as the server's latency.
        gc.collect()
        gc.freeze()
        try:
            started_at, began = time.time(), time.perf_counter()
            await asyncio.gather(*(sender(session) for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
        finally:
            gc.unfreeze()
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


async def send_paced(
    url: str,
    requests: list[Request],
    rate_per_s: float,
    *,
    connections: int = 256,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Send request i at `i / rate_per_s` seconds after the start whether or not earlier ones
    were answered (an open loop, as a carrier sends), over at most `connections` keep-alive
    connections. Answers, per request in order, when it was due and answered (`time.time()`,
    comparable across processes on this machine) and its status, with the figures: latency is
    counted from when a request was due, so a server that falls behind shows it (no
    coordinated omission)."""
    base = url.rstrip("/")
    due_at: list[float] = [math.nan] * len(requests)
    answered_at: list[float] = [math.nan] * len(requests)
    statuses: list[str] = [""] * len(requests)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        request = requests[index]
        try:
            async with session.post(
                f"{base}{request.path}", data=request.body, headers=request.headers
            ) as response:
                await response.read()
                statuses[index] = str(response.status)
        except (aiohttp.ClientError, TimeoutError) as error:
            statuses[index] = type(error).__name__
        answered_at[index] = time.time()

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        gc.collect()
        gc.freeze()
        try:
            tasks = []
            began_wall, began = time.time(), time.perf_counter()
            for index in range(len(requests)):
                delay = index / rate_per_s - (time.perf_counter() - began)
                if delay > 0:
                    await asyncio.sleep(delay)
                due_at[index] = began_wall + index / rate_per_s
                tasks.append(asyncio.create_task(one(session, index)))
            sent_s = time.perf_counter() - began
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - began
        finally:
            gc.unfreeze()
    ms = [1000.0 * (a - d) for a, d in zip(answered_at, due_at, strict=True)]
    return {
        "requests": len(requests),
        "rate_per_s": rate_per_s,
        "sent_s": sent_s,
        "elapsed_s": elapsed,
        "statuses": dict(collections.Counter(statuses)),
        "latency_ms": {
            "p50": percentile(ms, 0.5),
            "p90": percentile(ms, 0.9),
            "p99": percentile(ms, 0.99),
            "max": max(ms, default=math.nan),
        },
        "due_at": due_at,
        "answered_at": answered_at,
        "status_of": statuses,
        "started_at": began_wall,
    }
