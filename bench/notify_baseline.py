"""The notifications suite's baseline: a bare aiohttp client sending signed notifications.

    python -m bench.notify_baseline --url-base URL --endpoints N --concurrency C --count M \
        --body-file F

Sends `M` POSTs of the body in `F`, round-robin to `URL/e/0` .. `URL/e/{N-1}`, `C` in flight
over one keep-alive session, each with Standard Webhooks' headers signed for it (HMAC-SHA256,
as the notifier signs), then prints one JSON line: sent, seconds, statuses. No queue, no
database, no retries: what sending the same requests costs at the least.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from pathlib import Path

import aiohttp

from service.domain.endpoints import new_secret
from service.notify.sending import headers


async def run(args: argparse.Namespace, body: bytes) -> dict[str, object]:
    secret = new_secret()
    statuses: collections.Counter[int] = collections.Counter()
    next_index = 0
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def sender() -> None:
            nonlocal next_index
            while next_index < args.count:
                index = next_index
                next_index += 1
                url = f"{args.url_base}/e/{index % args.endpoints}"
                signed = headers(f"chg_{index}", body, [secret], int(time.time()))
                async with session.post(url, data=body, headers=signed) as response:
                    await response.read()
                    statuses[response.status] += 1

        began = time.monotonic()
        await asyncio.gather(*(sender() for _ in range(args.concurrency)))
        seconds = time.monotonic() - began
    return {"sent": args.count, "seconds": seconds, "statuses": dict(statuses)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url-base", required=True)
    parser.add_argument("--endpoints", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--body-file", required=True)
    args = parser.parse_args()
    body = Path(args.body_file).read_bytes()
    print(json.dumps(asyncio.run(run(args, body))), flush=True)


if __name__ == "__main__":
    main()
