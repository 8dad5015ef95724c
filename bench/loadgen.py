"""Signed `track` deliveries: written for wrk (the wrk suite), or sent from 64 senders for the
changes and notify suites (their paced loads, which wrk cannot send, and the changes suite's
`outbox` comparison), one process.

    python -m bench.loadgen --port P

It holds ShipEngine's side of the signature: a `SigningKeys` of its own whose public keys it
serves at `GET /jwks` (the API under test is started with `SHIPENGINE_JWKS_URL` pointing
there). The harness drives it over HTTP on the same port:

    POST /prepare {"load", "kind": "realistic"|"hot"|"distinct", ...}  build and sign a list
    POST /warmup  {"url", "concurrency", "requests", "package"}  a few uncounted requests
    POST /run     {"load", "url", "concurrency", "min_s"}    send it all, answer the figures
    POST /paced   {"load", "url", "rate_per_s"}   send it open-loop at a fixed rate, answer
                                                  when each request was due and answered
    POST /export  {"load", "path"}   write it where wrk replays it from (`bench/wrk.py`)

A prepared list is fixed: every server it is sent to gets the same bytes in the same order
over keep-alive connections of one aiohttp session, `concurrency` requests in flight (a
baseline gets the list again until `min_s` has passed). Signing happens in /prepare, never
while measuring; a signature stays valid for WEBHOOK_TIMESTAMP_TOLERANCE_S (5 min), so a list
is sent soon after it was prepared.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.sending import Request, send, send_paced
from bench.wrk import RawRequest, write_requests
from service.simulator.signing import SigningKeys

WEBHOOK_PATH = "/v1/webhooks/shipengine"
CARRIER_CODE = "ups"
# Status by step of a package's life (1-based): accepted, in transit ..., then delivered.
STEP_STATUS = ("AC", "IT", "IT", "IT", "IT", "IT", "DE")
# How far apart a repeat is sent after its original, in requests: a retry arrives later.
REPEAT_GAP = (64, 4_000)
EPOCH = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


@dataclasses.dataclass
class Load:
    requests: list[Request]
    facts: dict[str, Any]


def track_body(tracking_number: str, step: int) -> bytes:
    """A `track` delivery as the simulator sends it: the whole history, newest first; step k
    (1-based) of a package carries k events."""
    events = []
    for k in range(1, step + 1):
        status = STEP_STATUS[min(k, len(STEP_STATUS)) - 1]
        occurred = EPOCH + timedelta(hours=3 * k)
        events.append(
            {
                "occurred_at": occurred.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "carrier_occurred_at": (occurred - timedelta(hours=5)).strftime(
                    "%Y-%m-%dT%H:%M:%S"
                ),
                "description": f"Scan {k}: {'Delivered' if status == 'DE' else 'In transit'}",
                "city_locality": "Louisville",
                "state_province": "KY",
                "postal_code": "40202",
                "country_code": "US",
                "company_name": None,
                "signer": None,
                "event_code": f"S{k}",
                "carrier_detail_code": None,
                "status_code": status,
                "status_description": "Delivered" if status == "DE" else "In Transit",
                "carrier_status_code": f"C{k}",
                "carrier_status_description": f"Scan {k}",
                "latitude": 38.25,
                "longitude": -85.76,
            }
        )
    status = STEP_STATUS[min(step, len(STEP_STATUS)) - 1]
    payload = {
        "resource_url": (
            "https://api.shipengine.com/v1/tracking"
            f"?carrier_code={CARRIER_CODE}&tracking_number={tracking_number}"
        ),
        "resource_type": "API_TRACK",
        "data": {
            "tracking_number": tracking_number,
            "status_code": status,
            "status_description": "Delivered" if status == "DE" else "In Transit",
            "carrier_status_code": f"C{step}",
            "ship_date": EPOCH.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "estimated_delivery_date": (EPOCH + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "actual_delivery_date": (
                (EPOCH + timedelta(hours=3 * step)).strftime("%Y-%m-%dT%H:%M:%SZ")
                if status == "DE"
                else None
            ),
            "events": list(reversed(events)),
        },
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def tracking_number(prefix: str, index: int) -> str:
    """The i-th package of a load; the harness creates the same numbers in `subscriptions`."""
    return f"{prefix}{index:08d}"


def _signed(keys: SigningKeys, body: bytes) -> Request:
    headers = {"Content-Type": "application/json", **keys.headers(body)}
    return Request(WEBHOOK_PATH, body, headers)


def realistic_steps(packages: int, count: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    """`count` (package, step) pairs: a round over every package, shuffled, then the next
    step of each, and so on."""
    step = [0] * packages
    made = 0
    while made < count:
        round_ = list(range(packages))
        rng.shuffle(round_)
        for package in round_[: count - made]:
            step[package] += 1
            yield package, step[package]
        made += min(packages, count - made)


def realistic(keys: SigningKeys, spec: dict[str, Any]) -> Load:
    """`deliveries` requests over `packages` packages, each a new state of its package (a
    round over every package, shuffled, then the next step), `repeat_share` of them exact
    repeats of an earlier one sent `REPEAT_GAP` requests later."""
    rng = random.Random(spec.get("seed", 1))  # noqa: S311 - a reproducible load, not secrets
    packages, total = int(spec["packages"]), int(spec["deliveries"])
    repeats = round(total * float(spec["repeat_share"]))
    unique = total - repeats
    began = time.monotonic()
    originals: list[Request] = []
    step_of: dict[int, int] = collections.defaultdict(int)
    for package, step in realistic_steps(packages, unique, rng):
        step_of[package] = step
        body = track_body(tracking_number(spec["prefix"], package), step)
        originals.append(_signed(keys, body))
    keyed = [(float(i), d) for i, d in enumerate(originals)]
    for original in rng.sample(range(unique), repeats):
        keyed.append((original + rng.randint(*REPEAT_GAP) + 0.5, originals[original]))
    keyed.sort(key=lambda pair: pair[0])
    requests = [delivery for _, delivery in keyed]
    return Load(
        requests,
        {
            "requests": len(requests),
            "unique": unique,
            "repeats": repeats,
            "packages_touched": len(step_of),
            "max_step": max(step_of.values(), default=0),
            "events_expected": sum(step_of.values()),
            "mean_body_bytes": sum(len(r.body) for r in requests) / max(1, len(requests)),
            "sign_s": time.monotonic() - began,
        },
    )


def distinct(keys: SigningKeys, spec: dict[str, Any]) -> Load:
    """Step `step` (default 1) of packages 0 .. `packages` - 1, in that order: each delivery
    the only one of its package, so each files exactly one new state (the changes suite)."""
    began = time.monotonic()
    step = int(spec.get("step", 1))
    requests = [
        _signed(keys, track_body(tracking_number(spec["prefix"], package), step))
        for package in range(int(spec["packages"]))
    ]
    return Load(
        requests,
        {
            "requests": len(requests),
            "unique": len(requests),
            "repeats": 0,
            "sign_s": time.monotonic() - began,
        },
    )


def hot(keys: SigningKeys, spec: dict[str, Any]) -> Load:
    """One delivery of one package, `requests` times: a burst of retries."""
    delivery = _signed(keys, track_body(spec["package"], int(spec.get("step", 1))))
    requests = [delivery] * int(spec["requests"])
    return Load(requests, {"requests": len(requests), "unique": 1, "repeats": len(requests) - 1})


class LoadGenerator:
    def __init__(self) -> None:
        self.keys = SigningKeys()
        self.loads: dict[str, Load] = {}

    async def jwks(self, _: web.Request) -> web.Response:
        return web.json_response(self.keys.jwks())

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def prepare(self, request: web.Request) -> web.Response:
        spec: dict[str, Any] = await request.json()
        build = {"realistic": realistic, "hot": hot, "distinct": distinct}[spec["kind"]]
        load = build(self.keys, spec)
        self.loads[spec["load"]] = load
        return web.json_response(load.facts)

    async def warmup(self, request: web.Request) -> web.Response:
        """Connections, the receiver's key cache and statement caches warmed, uncounted: one
        fresh delivery of `package` (nobody tracks it) `requests` times."""
        spec: dict[str, Any] = await request.json()
        delivery = _signed(self.keys, track_body(spec["package"], 1))
        requests = [delivery] * int(spec["requests"])
        return web.json_response(await send(spec["url"], requests, int(spec["concurrency"])))

    async def run(self, request: web.Request) -> web.Response:
        spec: dict[str, Any] = await request.json()
        requests = self.loads[spec["load"]].requests
        min_s = float(spec.get("min_s", 0.0))
        result = await send(spec["url"], requests, int(spec["concurrency"]), min_s=min_s)
        return web.json_response(result)

    async def export(self, request: web.Request) -> web.Response:
        spec: dict[str, Any] = await request.json()
        load = self.loads[spec["load"]]
        raw = (RawRequest("POST", r.path, r.headers, r.body) for r in load.requests)
        return web.json_response({"requests": write_requests(Path(spec["path"]), raw)})

    async def paced(self, request: web.Request) -> web.Response:
        spec: dict[str, Any] = await request.json()
        requests = self.loads[spec["load"]].requests
        result = await send_paced(spec["url"], requests, float(spec["rate_per_s"]))
        return web.json_response(result)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    generator = LoadGenerator()
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get("/jwks", generator.jwks)
    app.router.add_get("/healthz", generator.healthz)
    app.router.add_post("/prepare", generator.prepare)
    app.router.add_post("/warmup", generator.warmup)
    app.router.add_post("/run", generator.run)
    app.router.add_post("/paced", generator.paced)
    app.router.add_post("/export", generator.export)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
