"""The floor suite: what the receiver's work beyond (v) costs, measured without HTTP.

Issue 18 asks the receiver for (v)'s rate at no more than 1.3 x (v)'s CPU a request, where (v)
verifies a delivery and INSERTs its body. The receiver must also read the delivery, hash its
content and file it (its events, its status, its history, its change for the feed). This
suite measures that extra work alone, in this process, so that the wrk suite's figures can be
read against it: no HTTP, no event loop busy with requests, no other process but PostgreSQL.

Scenarios, each a delivery's cost:
- `floor-read`: what the handler does with a verified body before filing (`json_exact.loads`,
  the depth check, `parse_track_payload`, `content_digest`);
- `floor-insert`: (b)'s work, one INSERT of the body in its own transaction: the baseline;
- `floor-file`: realistic deliveries filed in groups of 16 (the receivers' mean group under
  wrk), each group's transaction as the receiver's group commit runs it: BEGIN with the
  shared package locks, `file_incoming`, COMMIT;
- `floor-hot`: the same for the hot load, every delivery a duplicate.

The realistic deliveries are those of the wrk suite's realistic load, without its repeats, as
many as a receiver takes in a measured run there (30,000, quick 12,000: steps 1 to 5 of 6,000
packages).

Each is the CPU of this process (`time.process_time`, one connection, asyncpg) and of its
PostgreSQL backend (`/proc`, so PostgreSQL must run on this machine), a delivery.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from bench.infra import cpu_cores, cpu_snapshot
from bench.loadgen import realistic_steps, track_body, tracking_number
from bench.report import Report, number
from bench.suite import Bench
from service import json_exact
from service.db.deliveries import Incoming, file_incoming, shared_locks_sql
from service.db.engine import asyncpg_dsn
from service.db.subscriptions import NewSubscription, subscribe
from service.domain.tracking import (
    RearmPolicy,
    json_depth_exceeds,
)
from service.webhooks.receiver import MAX_JSON_DEPTH

SCENARIOS = ("floor-read", "floor-insert", "floor-file", "floor-hot")

PACKAGES = 6000  # as the wrk suite's realistic load
GROUP = 16
PREFIX = "1ZFLR"
REARM = RearmPolicy(max_rearms=3, delay_s=600.0)
# (b)'s table (bench/baseline_server.py), under a name of its own.
INSERT_TABLE = (
    "CREATE TABLE ingest_floor (id bigserial PRIMARY KEY, body bytea NOT NULL, "
    "received_at timestamptz NOT NULL DEFAULT now())"
)
HEADERS = {"content-type": "application/json", "x-shipengine-timestamp": "2026-12-06T00:00:00Z"}


async def run(bench: Bench, report: Report) -> None:
    deliveries = 12_000 if bench.quick else 30_000
    bodies = _realistic_bodies(deliveries)
    if bench.wants("floor-read"):
        _read(report, bodies)
    async with bench.postgres.database() as url:
        db = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await _subscribe_all(db)
            if bench.wants("floor-insert"):
                await db.execute(INSERT_TABLE)
                await _measure(report, "floor-insert", "(b)'s INSERT, alone", db, bodies, _insert)
            if bench.wants("floor-file"):
                file = _filer([_incoming(body) for body in bodies])
                await _measure(report, "floor-file", "filing, realistic", db, bodies, file)
            if bench.wants("floor-hot"):
                hot = _incoming(track_body(tracking_number(PREFIX, 0), 3))
                file_hot = _filer([hot] * len(bodies))
                await _measure(report, "floor-hot", "filing, hot", db, bodies, file_hot)
        finally:
            await db.close()
    _note_extra(report)


def _realistic_bodies(count: int) -> list[bytes]:
    """Each a package's next step, a round over every package at a time (bench/loadgen.py's
    realistic load, without its repeats)."""
    rng = random.Random(1)  # noqa: S311 - a reproducible load, not secrets
    return [
        track_body(tracking_number(PREFIX, package), step)
        for package, step in realistic_steps(PACKAGES, count, rng)
    ]


def _incoming(body: bytes) -> Incoming:
    """What the receiver hands the group commit for a verified body (`receive_track`)."""
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise ValueError("too deep")
    return Incoming.read(json_exact.loads(body), body, headers=HEADERS, verification="verified")


def _read(report: Report, bodies: Sequence[bytes]) -> None:
    started = time.process_time()
    for body in bodies:
        _incoming(body)
    us = (time.process_time() - started) / len(bodies) * 1e6
    mean_bytes = sum(len(body) for body in bodies) / len(bodies)
    report.scenario(
        "floor-read",
        "read, parse and hash a verified body",
        f"{us:.1f} us",
        "-",
        f"{len(bodies):,} realistic bodies of {number(mean_bytes)} bytes on average; this "
        "process's CPU",
        {"cpu_us": round(us, 2), "deliveries": len(bodies), "mean_body_bytes": mean_bytes},
    )


async def _subscribe_all(db: asyncpg.Connection) -> None:
    news = [NewSubscription("ups", tracking_number(PREFIX, i)) for i in range(PACKAGES)]
    for start in range(0, PACKAGES, 1000):
        async with db.transaction():
            await subscribe(db, news[start : start + 1000], REARM)


Work = Callable[[asyncpg.Connection, list[bytes]], Awaitable[None]]


async def _insert(db: asyncpg.Connection, bodies: list[bytes]) -> None:
    for body in bodies:
        await db.execute("INSERT INTO ingest_floor (body) VALUES ($1)", body)


def _filer(items: list[Incoming]) -> Work:
    """Files `items` in order, as many at each call as it is given bodies: a transaction as
    the receiver's group commit runs it."""
    position = 0

    async def file(db: asyncpg.Connection, bodies: list[bytes]) -> None:
        nonlocal position
        group, position = items[position : position + len(bodies)], position + len(bodies)
        numbers = [item.update.tracking_number for item in group]
        await db.execute(f"BEGIN; {shared_locks_sql(numbers)}")  # the receiver's `opening`
        await file_incoming(db, group, REARM)
        await db.execute("COMMIT")

    return file


async def _measure(
    report: Report, key: str, title: str, db: asyncpg.Connection, bodies: list[bytes], work: Work
) -> None:
    await db.execute("VACUUM ANALYZE")
    await db.execute("CHECKPOINT")
    backend = await db.fetchval("SELECT pg_backend_pid()")
    groups = {"client": [os.getpid()], "postgres": [backend]}
    before = cpu_snapshot(groups)
    for start in range(0, len(bodies), GROUP):
        await work(db, bodies[start : start + GROUP])
    cores = cpu_cores(before, cpu_snapshot(groups))
    interval = cores.get("interval_s", math.nan)
    per = {
        name: cores.get(name, math.nan) * interval / len(bodies) * 1e6
        for name in ("client", "postgres")
    }
    report.scenario(
        key,
        title,
        f"{per['client']:.1f} + {per['postgres']:.1f} us",
        "-",
        f"this process + its PostgreSQL backend, CPU a delivery; {len(bodies):,} deliveries; "
        f"wall {interval / len(bodies) * 1e6:.0f} us a delivery; others on the machine "
        f"{cores.get('others', math.nan):.2f} cores",
        {
            "client_cpu_us": round(per["client"], 2),
            "postgres_cpu_us": round(per["postgres"], 2),
            "deliveries": len(bodies),
            "cores": cores,
        },
    )
    report.note_if_noisy(key, cores)


def _note_extra(report: Report) -> None:
    """The receiver's work beyond (b)'s, a realistic delivery: what the wrk suite's receiver
    cannot spend less than, on top of what (v) spends."""
    found = report.scenarios
    if not {"floor-read", "floor-insert", "floor-file"} <= found.keys():
        return
    read, insert, file = found["floor-read"], found["floor-insert"], found["floor-file"]
    client = read["cpu_us"] + file["client_cpu_us"] - insert["client_cpu_us"]
    postgres = file["postgres_cpu_us"] - insert["postgres_cpu_us"]
    report.note(
        f"beyond (b)'s INSERT, a realistic delivery costs {client:.0f} us more here "
        f"(reading it and the filing's client side) and {postgres:.0f} us more of PostgreSQL"
    )
