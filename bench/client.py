"""The baseline client: bare aiohttp calling the simulator's start as fast as it answers.

`python -m bench.client URL --concurrency 100 --duration-s 10 --prefix B0-` keeps
`concurrency` calls in flight over one pool of as many connections (as a dispatcher's
ShipEngine session does) and prints one JSON line: calls, statuses, start and end (time.time()).
Run as its own process, like a dispatcher, so it has a core to itself as much as one can.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import time

import aiohttp

CARRIER_CODE = "stamps_com"


async def hammer(
    url: str, api_key: str, *, concurrency: int, duration_s: float, prefix: str
) -> dict[str, object]:
    statuses: collections.Counter[str] = collections.Counter()
    numbers = itertools.count()
    start_url = f"{url.rstrip('/')}/v1/tracking/start"
    headers = {"API-Key": api_key}
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=concurrency)
    started_at = time.time()
    deadline = time.monotonic() + duration_s

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            params = {"carrier_code": CARRIER_CODE, "tracking_number": f"{prefix}{next(numbers)}"}
            try:
                async with session.post(
                    start_url, params=params, headers=headers, timeout=timeout
                ) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                statuses[type(error).__name__] += 1

    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return {
        "calls": sum(statuses.values()),
        "statuses": dict(statuses),
        "started_at": started_at,
        "ended_at": time.time(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__)
    parser.add_argument("url", help="the simulator's base URL")
    parser.add_argument("--api-key", default=os.environ.get("SIMULATOR_API_KEY", "TEST_simulator"))
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--prefix", default="B0-")
    args = parser.parse_args()
    result = asyncio.run(
        hammer(
            args.url,
            args.api_key,
            concurrency=args.concurrency,
            duration_s=args.duration_s,
            prefix=args.prefix,
        )
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
