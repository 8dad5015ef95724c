"""The changes suite: the change feed, read in pages and streamed, and what writing it costs.

Each scenario has a database and processes of its own:

    feed    1,000,000 changes kept (quick: 200,000), filled by SQL; `GET /v1/changes?limit=1000`
            paged by one caller following `next_cursor`, 100 pages from the oldest and 100 from
            the middle; the same keyset pages as one asyncpg query each (the baseline)
    lag     10,000 active subscriptions; one reader on `GET /v1/changes/stream` (SSE) opened
            first; signed deliveries sent open-loop at 500/s for 20 s (quick: 8 s), each the
            first state of a package of its own, so each makes exactly one change; each
            delivery's 2xx and its change's event are timed on arrival, matched by tracking number
    outbox  loadgen's realistic deliveries (64 senders, 12,000 deliveries over 10,000
            packages, 10% exact repeats) to the API as it is and to the API with
            `bench/experiments/no-outbox.patch` applied (filing writes no changes), alternated
            on fresh packages; best of each
    idle    1,000 SSE readers that receive nothing on one API process: its RSS before and after,
            and its LISTEN connections (one, shared by every reader)

`--profile` samples the API with py-spy while it serves the feed's pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench import profiling
from bench.infra import (
    REPOSITORY,
    BenchError,
    LoadGenerator,
    ServiceProcess,
    api_headers,
    backend_pids,
    cpu_cores,
    cpu_snapshot,
    memory_mb,
    start_api,
    start_load_generator,
)
from bench.loadgen import tracking_number
from bench.measure import distribution, percentile
from bench.report import Check, Report, cores, number
from bench.suite import Bench
from service.api.changes import decode_cursor, encode_cursor
from service.db.changes import START, Position
from service.db.engine import asyncpg_dsn

SCENARIOS = ("feed", "lag", "outbox", "idle")

READ_SCOPE = "subscriptions:read"  # what /v1/changes and its stream ask of a caller
# The broadcaster's connection names itself so (`change_stream.LISTENER_NAME`); its last query
# may be another than its LISTEN, so either tells it in pg_stat_activity.
LISTENER_NAME = "tracking-changes-listener"
FEED_TARGET_PER_S = 20_000.0
LAG_P50_TARGET_MS = 50.0
LAG_P99_TARGET_MS = 250.0
OUTBOX_RATIO_TARGET = 0.90
IDLE_RSS_TARGET_MB = 50.0
PATCH = REPOSITORY / "bench" / "experiments" / "no-outbox.patch"

FEED_PREFIX = "1ZFEED"
LAG_PREFIX = "1ZLAG"
LAG_WARM_PREFIX = "1ZLAGW"
OUTBOX_PREFIX = "1ZOBX"
WARMUP_PREFIX = "1ZWARM"
CORES = ("api", "loadgen", "postgres", "bench", "others")


@dataclasses.dataclass(frozen=True)
class Plan:
    feed_subscriptions: int = 10_000
    feed_changes_each: int = 100  # changes per subscription: 1,000,000 in all
    feed_per_transaction: int = 20  # changes sharing a txid, as a group commit's do
    feed_pages: int = 100  # per walk: from the oldest, from the middle
    feed_page_size: int = 1_000
    lag_subscriptions: int = 10_000
    lag_rate_per_s: float = 500.0
    lag_s: float = 20.0
    lag_warmup: int = 500  # deliveries at the same rate before, their changes uncounted
    lag_drain_s: float = 15.0  # how long after the last 2xx its change may take, at most
    concurrency: int = 64
    outbox_packages: int = 10_000
    outbox_deliveries: int = 12_000
    outbox_repeat_share: float = 0.10
    outbox_runs: int = 4  # with, without, with, without: best of each
    warmup_requests: int = 256
    idle_readers: int = 1_000
    idle_open_at_once: int = 50
    idle_settle_s: float = 2.0
    profile_s: float = 6.0


FULL = Plan()
QUICK = dataclasses.replace(
    FULL,
    feed_subscriptions=2_000,
    feed_pages=30,
    lag_subscriptions=6_000,
    lag_s=8.0,
    lag_warmup=250,
    outbox_deliveries=5_000,
    outbox_runs=2,
    warmup_requests=128,
    profile_s=3.0,
)


async def run(bench: Bench, report: Report) -> None:
    plan = QUICK if bench.quick else FULL
    if bench.concurrency is not None:
        plan = dataclasses.replace(plan, concurrency=bench.concurrency)
    if not any(bench.wants(key) for key in SCENARIOS):
        return
    report.options["plan"] = dataclasses.asdict(plan)
    report.options["open_files"] = _raise_open_files(plan.idle_readers + 1_000)
    if bench.wants("feed"):
        await feed(bench, plan, report)
    if bench.wants("lag"):
        await lag(bench, plan, report)
    if bench.wants("outbox"):
        await outbox(bench, plan, report)
    if bench.wants("idle"):
        await idle(bench, plan, report)


def _raise_open_files(needed: int) -> dict[str, int]:
    """The harness holds a socket per idle reader: its soft limit raised to `needed` if lower
    (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return {"soft": soft, "hard": hard}


async def subscribe_active(conn: asyncpg.Connection, prefix: str, count: int) -> None:
    """`count` active subscriptions of packages `prefix` || 8 digits (`loadgen.tracking_number`)
    with what a shop's checkout sends (carrier id, reference, metadata, client), then ANALYZE."""
    await conn.execute(
        """
        INSERT INTO subscriptions (carrier_code, tracking_number, carrier_id, reference,
                                   metadata, state, created_by, attempts, created_at)
        SELECT 'ups', $1 || lpad(g::text, 8, '0'), 'se-' || (100000 + g % 7), 'order-' || g,
               jsonb_build_object('order_id', g, 'shop', 'shop-' || g % 13), 'active',
               (ARRAY['checkout', 'returns', 'ops-tools'])[1 + g % 3], 1,
               now() - interval '10 days' + g * interval '10 ms'
        FROM generate_series(0, $2::int - 1) AS g
        """,
        prefix,
        count,
    )
    await conn.execute("ANALYZE subscriptions")


# -- feed -------------------------------------------------------------------------------------

# The changes g in [$5, $6) of the subscriptions of $1 ($2 of them), made in rounds: change g
# is the k-th (k = g / $2 + 1) of subscription g % $2, with id g + 1 and txid $3 + g / $4 ($4
# changes a transaction), ids and txids rising together as the feed's order wants. What each
# keeps is what filing keeps: the subscription's status then, the previous status, and the
# delivery's newest event (its 16 fields, as `TrackEvent` has them).
FEED_CHANGES_SQL = """
    INSERT INTO changes (id, txid, type, subscription_id, sequence, occurred_at, state,
                         status_code, status_description, estimated_delivery_date,
                         actual_delivery_date, last_event_at, last_error,
                         previous_status_code, newest_event)
    SELECT g + 1, $3::bigint + g / $4::int,
           CASE WHEN k = 1 THEN 'subscription.active'
                WHEN k % 10 = 2 THEN 'tracking.status_changed'
                WHEN k % 10 = 6 THEN 'tracking.eta_changed'
                ELSE 'tracking.events_added' END,
           s.id, k, at, 'active',
           CASE WHEN k = 1 THEN NULL WHEN k = 100 THEN 'DE' ELSE 'IT' END,
           CASE WHEN k = 1 THEN NULL WHEN k = 100 THEN 'Delivered' ELSE 'In Transit' END,
           at + interval '3 days', CASE WHEN k = 100 THEN at END,
           CASE WHEN k > 1 THEN at - interval '5 minutes' END, NULL,
           CASE WHEN k > 2 THEN 'IT' WHEN k = 2 THEN 'AC' END,
           CASE WHEN k > 1 THEN jsonb_build_object(
               'occurred_at', to_char(at - interval '5 minutes', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
               'carrier_occurred_at', to_char(at - interval '5 hours', 'YYYY-MM-DD"T"HH24:MI:SS'),
               'status_code', 'IT', 'event_code', 'S' || k,
               'description', 'Scan ' || k || ': In transit', 'carrier_status_code', 'C' || k,
               'carrier_detail_code', NULL, 'status_detail_code', NULL,
               'city_locality', 'Louisville', 'state_province', 'KY', 'postal_code', '40202',
               'country_code', 'US', 'company_name', NULL, 'signer', NULL,
               'latitude', 38.25, 'longitude', -85.76) END
    FROM (
        SELECT g, g / $2::int + 1 AS k, g % $2::int AS n,
               now() - interval '20 days' + g * interval '1 second' AS at
        FROM generate_series($5::int, $6::int - 1) AS g
    ) AS drawn
    JOIN (
        SELECT id, row_number() OVER (ORDER BY tracking_number) - 1 AS n
        FROM subscriptions WHERE tracking_number LIKE $1 || '%'
    ) AS s USING (n)
    ORDER BY g
"""


async def _execute(database_url: str, sql: str, *arguments: object) -> None:
    """`sql` on a connection of its own."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(sql, *arguments)
    finally:
        await conn.close()


async def _fill_feed(plan: Plan, conn: asyncpg.Connection, database_url: str) -> dict[str, Any]:
    """The subscriptions and their changes, the changes' indexes built after."""
    phases: dict[str, float] = {}
    began = last = time.monotonic()

    def lap(phase: str) -> None:
        nonlocal last
        now = time.monotonic()
        phases[phase] = round(now - last, 2)
        last = now

    await subscribe_active(conn, FEED_PREFIX, plan.feed_subscriptions)
    total = plan.feed_subscriptions * plan.feed_changes_each
    await conn.execute(
        "UPDATE subscriptions SET change_sequence = $1, status_code = 'IT', "
        "status_description = 'In Transit' WHERE tracking_number LIKE $2 || '%'",
        plan.feed_changes_each,
        FEED_PREFIX,
    )
    lap("subscriptions")
    # Every txid below the current one, so all of it is below the feed's horizon at once.
    top = int(await conn.fetchval("SELECT CAST(CAST(pg_current_xact_id() AS text) AS bigint)"))
    per_transaction = max(plan.feed_per_transaction, -(-total // max(1, top - 1)))
    first_txid = top - -(-total // per_transaction) - 1
    indexes = await conn.fetch(
        "SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition "
        "FROM pg_index AS i WHERE i.indrelid = 'changes'::regclass AND NOT i.indisprimary"
    )
    for row in indexes:
        await conn.execute(f"DROP INDEX {row['name']}")
    lap("drop indexes")
    # Two halves on two connections: the rows' JSON is built by the server, a core each.
    halves = [(0, total // 2), (total // 2, total)]
    await asyncio.gather(
        *(
            _execute(
                database_url,
                FEED_CHANGES_SQL,
                FEED_PREFIX,
                plan.feed_subscriptions,
                first_txid,
                per_transaction,
                first,
                end,
            )
            for first, end in halves
        )
    )
    await conn.execute("SELECT setval(pg_get_serial_sequence('changes', 'id'), $1)", total)
    lap("changes")
    await conn.execute("SET maintenance_work_mem = '128MB'")
    for row in indexes:
        await conn.execute(row["definition"])
    lap("indexes")
    await conn.execute("VACUUM (ANALYZE) changes")
    await conn.execute("VACUUM (ANALYZE) subscriptions")
    lap("vacuum analyze")
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")
        lap("checkpoint")
    count = await conn.fetchval("SELECT count(*) FROM changes")
    if count != total:
        raise BenchError(f"feed: {count} changes loaded, not {total}")
    size = await conn.fetchval("SELECT pg_total_relation_size('changes')")
    return {
        "changes": count,
        "subscriptions": plan.feed_subscriptions,
        "per_transaction": per_transaction,
        "bytes": size,
        "phases_s": phases,
        "elapsed_s": round(time.monotonic() - began, 2),
    }


@dataclasses.dataclass
class Walk:
    """Pages read one after another: each page's changes and seconds."""

    items: list[int] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)

    @property
    def changes(self) -> int:
        return sum(self.items)

    @property
    def per_s(self) -> float:
        total = sum(self.seconds)
        return self.changes / total if total > 0 else math.nan

    def figures(self) -> dict[str, Any]:
        ms = [1000.0 * s for s in self.seconds]
        return {
            "pages": len(self.items),
            "changes": self.changes,
            "seconds": sum(self.seconds),
            "per_s": self.per_s,
            "page_ms": distribution(ms),
            "short_pages": sum(1 for n in self.items if n < max(self.items, default=0)),
        }

    def add(self, other: Walk) -> None:
        self.items += other.items
        self.seconds += other.seconds


async def _walk_api(
    session: aiohttp.ClientSession, url: str, start: str | None, pages: int, limit: int
) -> Walk:
    """`pages` pages of `GET /v1/changes` following `next_cursor`: timed from the request to
    the whole body read (its parsing, for the next cursor, is not counted)."""
    walk = Walk()
    cursor = start
    for _ in range(pages):
        params = {"limit": str(limit), **({"after": cursor} if cursor else {})}
        began = time.perf_counter()
        async with session.get(f"{url}/v1/changes", params=params) as response:
            body = await response.read()
            status = response.status
        walk.seconds.append(time.perf_counter() - began)
        if status != 200:
            raise BenchError(f"GET /v1/changes: {status} {body[:300]!r}")
        page = json.loads(body)
        walk.items.append(len(page["items"]))
        cursor = page["next_cursor"]
    return walk


# What `service.db.changes.read` selects, as one statement: the changes after a position and
# below the horizon, with what they do not keep of their subscription, in commit order.
SQL_PAGE = """
    SELECT c.*, s.carrier_code, s.tracking_number, s.carrier_id, s.reference, s.metadata,
           s.created_by, s.created_at
    FROM changes AS c JOIN subscriptions AS s ON s.id = c.subscription_id
    WHERE (c.txid, c.id) > ($1::bigint, $2::bigint)
      AND c.txid < CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text) AS bigint)
    ORDER BY c.txid, c.id
    LIMIT $3
"""


async def _walk_sql(conn: asyncpg.Connection, start: str | None, pages: int, limit: int) -> Walk:
    """The same pages straight from PostgreSQL: one prepared asyncpg query each."""
    statement = await conn.prepare(SQL_PAGE)
    walk = Walk()
    txid, change_id = decode_cursor(start) if start else START
    for _ in range(pages):
        began = time.perf_counter()
        rows = await statement.fetch(txid, change_id, limit)
        walk.seconds.append(time.perf_counter() - began)
        walk.items.append(len(rows))
        if rows:
            txid, change_id = rows[-1]["txid"], rows[-1]["id"]
    return walk


async def feed(bench: Bench, plan: Plan, report: Report) -> None:
    async with (
        bench.postgres.database() as database_url,
        bench.processes("changes-feed") as procs,
    ):
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            loaded = await _fill_feed(plan, conn, database_url)
            print(
                f"feed: {loaded['changes']:,} changes of {loaded['subscriptions']:,} "
                f"subscriptions loaded in {loaded['elapsed_s']:.1f} s {loaded['phases_s']}",
                flush=True,
            )
            url = await start_api(procs, {"DATABASE_URL": database_url})
            api = procs.named("api")
            headers = await api_headers(database_url, [READ_SCOPE], client="feed-reader")
            middle = await conn.fetchrow(
                "SELECT txid, id FROM changes ORDER BY txid, id OFFSET $1 LIMIT 1",
                loaded["changes"] // 2 - 1,
            )
            starts: dict[str, str | None] = {
                "oldest": None,
                "middle": encode_cursor(Position(middle["txid"], middle["id"])),
            }
            limit = plan.feed_page_size
            # Warm-up, uncounted: the same pages once as SQL (the buffer cache, for both), and
            # a few through the API (connections, statement caches).
            for start in starts.values():
                await _walk_sql(conn, start, plan.feed_pages, limit)
            timeout = aiohttp.ClientTimeout(total=60)
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(
                connector=connector, timeout=timeout, headers=headers
            ) as session:
                await _walk_api(session, url, starts["middle"], 5, limit)
                groups = {
                    "api": [api.pid],
                    "postgres": await backend_pids(conn),
                    "bench": [os.getpid()],
                }
                before = cpu_snapshot(groups)
                profiler, profile_to = None, None
                if bench.profile:
                    profile_to = bench.log_dir / "changes-feed-api.pyspy.txt"
                    profiler = await profiling.record(procs, api, plan.profile_s, profile_to)
                api_walks = {
                    name: await _walk_api(session, url, start, plan.feed_pages, limit)
                    for name, start in starts.items()
                }
                cpu = cpu_cores(before, cpu_snapshot(groups))
            profile = None
            if profiler is not None and profile_to is not None:
                await profiling.wait(profiler, timeout_s=plan.profile_s + 30)
                profile = profiling.report(
                    profile_to, plan.profile_s, "the API serving feed pages", FEED_STAGES
                )
            sql_walks = {
                name: await _walk_sql(conn, start, plan.feed_pages, limit)
                for name, start in starts.items()
            }
        finally:
            await conn.close()
    _feed_report(report, loaded, api_walks, sql_walks, cpu, profile)


def _feed_report(
    report: Report,
    loaded: dict[str, Any],
    api_walks: dict[str, Walk],
    sql_walks: dict[str, Walk],
    cpu: dict[str, float],
    profile: dict[str, Any] | None,
) -> None:
    api_all, sql_all = Walk(), Walk()
    for walk in api_walks.values():
        api_all.add(walk)
    for walk in sql_walks.values():
        sql_all.add(walk)
    ratio = api_all.per_s / sql_all.per_s
    api_ms = api_all.figures()["page_ms"]
    sql_ms = sql_all.figures()["page_ms"]
    report.scenario(
        "feed/sql",
        "keyset pages, 1 asyncpg query each",
        f"{number(sql_all.per_s)} changes/s",
        "1.00 (is it)",
        f"{sql_all.changes:,} changes in {len(sql_all.items)} pages of "
        f"{max(sql_all.items, default=0)}, page p50 {sql_ms['p50']:.1f} "
        f"p99 {sql_ms['p99']:.1f} ms; "
        + ", ".join(f"{name} {number(walk.per_s)}/s" for name, walk in sql_walks.items()),
        {"walks": {name: walk.figures() for name, walk in sql_walks.items()}, "load": loaded},
    )
    report.scenario(
        "feed/api",
        "GET /v1/changes?limit=1000",
        f"{number(api_all.per_s)} changes/s",
        f"{ratio:.2f} sql",
        f"{api_all.changes:,} changes in {len(api_all.items)} pages following next_cursor, "
        f"page p50 {api_ms['p50']:.1f} p99 {api_ms['p99']:.1f} ms; "
        + ", ".join(f"{name} {number(walk.per_s)}/s" for name, walk in api_walks.items())
        + f"; {loaded['changes']:,} changes kept ({loaded['bytes'] / 2**20:,.0f} MB); "
        f"cores: {cores(cpu, CORES)}",
        {
            "walks": {name: walk.figures() for name, walk in api_walks.items()},
            "cpu_cores": cpu,
            "profile": profile,
        },
    )
    report.note_if_noisy("feed/api", cpu)
    short = sum(1 for n in api_all.items if n != max(api_all.items, default=0))
    if short:
        report.note(f"feed/api: {short} pages held fewer changes than the limit")
    report.check(
        Check(
            f"feed: changes/s, GET /v1/changes?limit=1000, {loaded['changes']:,} kept",
            f">= {number(FEED_TARGET_PER_S)}/s",
            f"{number(api_all.per_s)}/s (SQL alone {number(sql_all.per_s)}/s)",
            api_all.per_s / FEED_TARGET_PER_S,
            ratio,
            api_all.per_s >= FEED_TARGET_PER_S,
        )
    )


FEED_STAGES = {
    "read_changes (": "the handler, all of it",
    "read_page (": "feed.read: both statements",
    "change_out (": "change_out (pydantic model_validate)",
    "json_answer (": "json_answer (model_dump + json.dumps)",
    "model_dump (": "model_dump(mode='json')",
    "dumps (": "json.dumps",
    "(sqlalchemy/": "SQLAlchemy",
    "(asyncpg/": "asyncpg",
    "EpollSelector.select (": "epoll wait",
}


# -- reading a stream -------------------------------------------------------------------------


class EventStream:
    """One reader of `GET /v1/changes/stream`: every block the server writes, as it arrives
    (`time.time()` of the chunk that completed it)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.ready = asyncio.Event()  # the `retry:` line came: the stream is open
        self.events: list[tuple[float, bytes]] = []
        self.comments = 0
        self.status: int | None = None
        self.arrived = asyncio.Event()  # set on each event

    async def run(self) -> None:
        async with self.session.get(self.url) as response:
            self.status = response.status
            if response.status != 200:
                self.ready.set()
                return
            buffer = b""
            async for chunk in response.content.iter_any():
                at = time.time()
                buffer += chunk
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    if block.startswith(b"retry:"):
                        self.ready.set()
                    elif block.startswith(b":"):
                        self.comments += 1
                    else:
                        self.events.append((at, block))
                        self.arrived.set()

    async def until(self, count: int, timeout_s: float) -> bool:
        """Wait until `count` events have come, at most `timeout_s`; whether they did."""
        deadline = time.monotonic() + timeout_s
        while len(self.events) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 0.5))
        return True


def _event_data(block: bytes) -> dict[str, Any]:
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data: dict[str, Any] = json.loads(line[5:])
            return data
    return {}


@contextlib.asynccontextmanager
async def _streaming(stream: EventStream) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(stream.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await task


# -- lag --------------------------------------------------------------------------------------


async def lag(bench: Bench, plan: Plan, report: Report) -> None:
    deliveries = round(plan.lag_rate_per_s * plan.lag_s)
    async with (
        bench.postgres.database() as database_url,
        bench.processes("changes-lag") as procs,
    ):
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await subscribe_active(conn, LAG_PREFIX, max(plan.lag_subscriptions, deliveries))
            await subscribe_active(conn, LAG_WARM_PREFIX, plan.lag_warmup)
            generator = await start_load_generator(procs, "loadgen")
            env = {
                "DATABASE_URL": database_url,
                "SHIPENGINE_BASE_URL": generator.url,
                "SHIPENGINE_JWKS_URL": f"{generator.url}/jwks",
            }
            url = await start_api(procs, env)
            api = procs.named("api")
            headers = await api_headers(database_url, [READ_SCOPE], client="stream-reader")
            warm = {
                "url": url,
                "concurrency": plan.concurrency,
                "requests": plan.warmup_requests,
                "package": f"{WARMUP_PREFIX}-lag",
            }
            await generator.call("/warmup", warm)
            facts = await generator.call(
                "/prepare",
                {"load": "lag", "kind": "distinct", "prefix": LAG_PREFIX, "packages": deliveries},
            )
            warm_facts = await generator.call(
                "/prepare",
                {
                    "load": "lag-warm",
                    "kind": "distinct",
                    "prefix": LAG_WARM_PREFIX,
                    "packages": plan.lag_warmup,
                },
            )
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
                stream = EventStream(session, f"{url}/v1/changes/stream")
                async with _streaming(stream):
                    await asyncio.wait_for(stream.ready.wait(), 30)
                    if stream.status != 200:
                        raise BenchError(f"GET /v1/changes/stream: {stream.status}")
                    await _paced(generator, "lag-warm", url, plan.lag_rate_per_s)
                    await stream.until(warm_facts["requests"], plan.lag_drain_s)
                    warm_events = len(stream.events)
                    stream.events.clear()
                    groups = {
                        "api": [api.pid],
                        "loadgen": [generator.process.pid],
                        "postgres": await backend_pids(conn),
                        "bench": [os.getpid()],
                    }
                    before = cpu_snapshot(groups)
                    holders = HorizonHolders(database_url)
                    async with holders.sampling():
                        sent = await _paced(generator, "lag", url, plan.lag_rate_per_s)
                    cpu = cpu_cores(before, cpu_snapshot(groups))
                    answered = sum(1 for s in sent["status_of"] if s.startswith("2"))
                    await stream.until(answered, plan.lag_drain_s)
                    # Anything more (a change twice) would come right behind.
                    await asyncio.sleep(0.5)
                    events = list(stream.events)
                    comments = stream.comments
            changes = await conn.fetchval(
                "SELECT count(*) FROM changes AS c JOIN subscriptions AS s "
                "ON s.id = c.subscription_id WHERE s.tracking_number LIKE $1 || '%'",
                LAG_PREFIX,
            )
        finally:
            await conn.close()
    _lag_report(
        report, plan, facts, sent, events, cpu, warm_events, comments, changes, holders.figures()
    )


class HorizonHolders:
    """What holds the feed's horizon back: sampled every SAMPLE_S, the age of the oldest
    transaction holding a transaction id, in this database and in the server's others (the
    horizon is the oldest running transaction of the whole server)."""

    SAMPLE_S = 0.05
    QUERY = """
        SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start))
                        FILTER (WHERE datname = current_database()), 0) AS here,
               coalesce(max(extract(epoch FROM clock_timestamp() - xact_start))
                        FILTER (WHERE datname IS DISTINCT FROM current_database()), 0)
                   AS elsewhere
        FROM pg_stat_activity
        WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
    """

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.samples: list[tuple[float, float, float]] = []  # (time, here s, elsewhere s)

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        began = time.monotonic()

        async def sample() -> None:
            while True:
                row = await conn.fetchrow(self.QUERY)
                at = time.monotonic() - began
                self.samples.append((at, float(row["here"]), float(row["elsewhere"])))
                await asyncio.sleep(self.SAMPLE_S)

        task = asyncio.create_task(sample())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await conn.close()

    def figures(self) -> dict[str, Any]:
        seconds = int(max((at for at, _, _ in self.samples), default=0.0)) + 1
        elsewhere = [0.0] * seconds
        for at, _, other in self.samples:
            elsewhere[int(at)] = max(elsewhere[int(at)], 1000.0 * other)
        return {
            "samples": len(self.samples),
            "here_max_ms": 1000.0 * max((h for _, h, _ in self.samples), default=0.0),
            "elsewhere_max_ms": max(elsewhere, default=0.0),
            "elsewhere_max_ms_by_second": [round(ms, 1) for ms in elsewhere],
        }


async def _paced(generator: LoadGenerator, load: str, url: str, rate: float) -> dict[str, Any]:
    return await generator.call("/paced", {"load": load, "url": url, "rate_per_s": rate})


def _lag_report(
    report: Report,
    plan: Plan,
    facts: dict[str, Any],
    sent: dict[str, Any],
    events: list[tuple[float, bytes]],
    cpu: dict[str, float],
    warm_events: int,
    comments: int,
    changes: int,
    holders: dict[str, Any],
) -> None:
    numbers = [tracking_number(LAG_PREFIX, i) for i in range(facts["requests"])]
    arrivals: dict[str, list[float]] = {}
    strangers = 0
    for at, block in events:
        data = _event_data(block).get("data", {})
        number_ = data.get("tracking_number")
        if isinstance(number_, str) and number_.startswith(LAG_PREFIX):
            arrivals.setdefault(number_, []).append(at)
        else:
            strangers += 1
    lags_ms: list[float] = []
    missing = twice = 0
    refused = 0
    for index, number_ in enumerate(numbers):
        if not sent["status_of"][index].startswith("2"):
            refused += 1
            continue
        times = arrivals.get(number_, [])
        if not times:
            missing += 1
            continue
        twice += len(times) > 1
        lags_ms.append(1000.0 * (times[0] - sent["answered_at"][index]))
    lag_ms = distribution(lags_ms)
    early = sum(1 for ms in lags_ms if ms < 0)
    unasked = sum(1 for number_ in arrivals if number_ not in set(numbers))
    answer = sent["latency_ms"]
    sent_rate = sent["requests"] / sent["sent_s"] if sent["sent_s"] > 0 else math.nan
    data = {
        "deliveries": sent["requests"],
        "rate_per_s": sent["rate_per_s"],
        "sent_rate_per_s": sent_rate,
        "statuses": sent["statuses"],
        "answer_latency_ms": answer,
        "lag_ms": lag_ms,
        "lag_negative": early,
        "events": len(events),
        "missing": missing,
        "twice": twice,
        "not_ours": strangers + unasked,
        "heartbeats": comments,
        "warmup_events": warm_events,
        "changes_in_database": changes,
        "cpu_cores": cpu,
        "lag_timeline_ms": _timeline(sent, numbers, arrivals),
        "last_answered_lag_ms": _last_lags(sent, numbers, arrivals, 20),
        "horizon_holders": holders,
    }
    report.scenario(
        "lag",
        f"2xx -> SSE event, {number(plan.lag_rate_per_s)} deliveries/s",
        f"p50 {lag_ms['p50']:.1f} p99 {lag_ms['p99']:.1f} ms",
        "-",
        f"{sent['requests']:,} deliveries open-loop in {sent['sent_s']:.1f} s "
        f"({number(sent_rate)}/s), statuses {sent['statuses']}, answered p50 "
        f"{answer['p50']:.1f} p99 {answer['p99']:.1f} ms; lag min {lag_ms['min']:.1f} p90 "
        f"{lag_ms['p90']:.1f} max {lag_ms['max']:.1f} ms, {early} negative (NOTIFY at commit, "
        f"before the answer is written); {len(events):,} events, {missing} missing, {twice} "
        f"twice, {strangers + unasked} not ours; oldest writing transaction meanwhile: "
        f"{holders['elsewhere_max_ms']:.0f} ms in other databases of the server, "
        f"{holders['here_max_ms']:.0f} ms in this one; cores: {cores(cpu, CORES)}",
        data,
    )
    report.note_if_noisy("lag", cpu)
    if holders["elsewhere_max_ms"] > LAG_P99_TARGET_MS:
        report.note(
            f"lag: a writing transaction of another database on this server ran "
            f"{holders['elsewhere_max_ms']:.0f} ms meanwhile; the feed's horizon is the oldest "
            "running transaction of the whole server, so it held the stream back (run again "
            "on a server of its own)"
        )
    report.check(
        Check(
            f"lag: p50, 2xx -> SSE event at {number(plan.lag_rate_per_s)}/s",
            f"< {LAG_P50_TARGET_MS:.0f} ms",
            f"{lag_ms['p50']:.1f} ms",
            lag_ms["p50"] / LAG_P50_TARGET_MS,
            None,
            None if math.isnan(lag_ms["p50"]) else lag_ms["p50"] < LAG_P50_TARGET_MS,
        )
    )
    report.check(
        Check(
            f"lag: p99, 2xx -> SSE event at {number(plan.lag_rate_per_s)}/s",
            f"< {LAG_P99_TARGET_MS:.0f} ms",
            f"{lag_ms['p99']:.1f} ms (max {lag_ms['max']:.1f})",
            lag_ms["p99"] / LAG_P99_TARGET_MS,
            None,
            None if math.isnan(lag_ms["p99"]) else lag_ms["p99"] < LAG_P99_TARGET_MS,
        )
    )
    ok = refused == 0 and missing == 0 and twice == 0 and strangers + unasked == 0
    report.check(
        Check(
            "lag: every delivery 2xx, its change streamed exactly once",
            "all",
            "all"
            if ok
            else f"{refused} not 2xx, {missing} missing, {twice} twice, "
            f"{strangers + unasked} not ours",
            None,
            None,
            ok,
        )
    )


def _last_lags(
    sent: dict[str, Any], numbers: list[str], arrivals: dict[str, list[float]], count: int
) -> list[float]:
    """The lags of the last `count` deliveries answered (ms), in the order answered: after the
    load ends no further NOTIFY wakes the stream, so these show how it finds the last ones."""
    answered = sorted(
        (at, index)
        for index, at in enumerate(sent["answered_at"])
        if at is not None and not math.isnan(at) and arrivals.get(numbers[index])
    )
    return [
        round(1000.0 * (arrivals[numbers[index]][0] - at), 1) for at, index in answered[-count:]
    ]


def _timeline(
    sent: dict[str, Any], numbers: list[str], arrivals: dict[str, list[float]]
) -> list[float]:
    """The p99 lag of the deliveries answered in each second of the run (ms)."""
    began = sent["started_at"]
    by_second: dict[int, list[float]] = {}
    for index, number_ in enumerate(numbers):
        times = arrivals.get(number_)
        answered = sent["answered_at"][index]
        if times and answered is not None and not math.isnan(answered):
            second = int(answered - began)
            by_second.setdefault(second, []).append(1000.0 * (times[0] - answered))
    if not by_second:
        return []
    return [round(percentile(by_second.get(s, []), 0.99), 1) for s in range(max(by_second) + 1)]


# -- outbox -----------------------------------------------------------------------------------


def _patched_tree(directory: Path) -> str | None:
    """The working tree's `service` copied into `directory` with the no-outbox patch applied;
    None if it applied, else why not."""
    shutil.copytree(
        REPOSITORY / "service",
        directory / "service",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    done = subprocess.run(  # noqa: S603 - fixed arguments
        ["git", "apply", "--whitespace=nowarn", str(PATCH)],  # noqa: S607 - git from PATH
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        return f"{PATCH.name} does not apply to the working tree: {done.stderr.strip()[:400]}"
    return None


async def _imported_from(tree: Path) -> str:
    """Where `python -m service` finds `service.db.deliveries` when run as the API runs."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import service.db.deliveries as d; print(d.__file__)",
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return output.decode().strip()


async def outbox(bench: Bench, plan: Plan, report: Report) -> None:
    builds = ["outbox", "no-outbox"] * (plan.outbox_runs // 2)
    with tempfile.TemporaryDirectory(prefix="tracking-bench-no-outbox-") as directory:
        tree = Path(directory)
        problem = _patched_tree(tree)
        if problem is not None:
            report.note(f"outbox: {problem}; remake the patch (README) to measure")
            report.check(
                Check(
                    "outbox: deliveries/s with the outbox / without",
                    f">= {OUTBOX_RATIO_TARGET:.2f}",
                    "not measured",
                    None,
                    None,
                    None,
                )
            )
            return
        imported = await _imported_from(tree)
        if not imported.startswith(str(tree)):
            raise BenchError(f"outbox: the patched API would import {imported}, not {tree}")
        async with (
            bench.postgres.database() as database_url,
            bench.processes("changes-outbox") as procs,
        ):
            conn = await asyncpg.connect(asyncpg_dsn(database_url))
            try:
                for run_ in range(len(builds)):
                    await subscribe_active(conn, f"{OUTBOX_PREFIX}{run_}", plan.outbox_packages)
                generator = await start_load_generator(procs, "loadgen")
                env = {
                    "DATABASE_URL": database_url,
                    "SHIPENGINE_BASE_URL": generator.url,
                    "SHIPENGINE_JWKS_URL": f"{generator.url}/jwks",
                }
                urls = {
                    "outbox": await start_api(procs, env, name="api-outbox"),
                    "no-outbox": await start_api(
                        procs, {**env, "PYTHONPATH": str(tree)}, name="api-no-outbox", cwd=tree
                    ),
                }
                apis = {build: procs.named(f"api-{build}") for build in urls}
                cwd = os.readlink(f"/proc/{apis['no-outbox'].pid}/cwd")
                if Path(cwd) != tree:
                    raise BenchError(f"outbox: the patched API runs in {cwd}, not {tree}")
                results: list[dict[str, Any]] = []
                for run_, build in enumerate(builds):
                    result = await _outbox_run(
                        plan, conn, generator, urls[build], apis[build], build, run_
                    )
                    results.append(result)
                    _outbox_row(report, result)
            finally:
                await conn.close()
    _outbox_checks(report, results, imported)


async def _outbox_run(
    plan: Plan,
    conn: asyncpg.Connection,
    generator: LoadGenerator,
    url: str,
    api: ServiceProcess,
    build: str,
    run_: int,
) -> dict[str, Any]:
    prefix = f"{OUTBOX_PREFIX}{run_}"
    spec = {
        "load": prefix,
        "kind": "realistic",
        "prefix": prefix,
        "packages": plan.outbox_packages,
        "deliveries": plan.outbox_deliveries,
        "repeat_share": plan.outbox_repeat_share,
    }
    facts = await generator.call("/prepare", spec)
    warm = {
        "url": url,
        "concurrency": plan.concurrency,
        "requests": plan.warmup_requests,
        "package": f"{WARMUP_PREFIX}-outbox-{run_}",
    }
    await generator.call("/warmup", warm)
    groups = {
        "api": [api.pid],
        "loadgen": [generator.process.pid],
        "postgres": await backend_pids(conn),
        "bench": [os.getpid()],
    }
    before = cpu_snapshot(groups)
    result = await generator.call(
        "/run", {"load": prefix, "url": url, "concurrency": plan.concurrency, "min_s": 0.0}
    )
    cpu = cpu_cores(before, cpu_snapshot(groups))
    counts = await conn.fetchrow(
        """
        SELECT
            (SELECT count(*) FROM webhook_deliveries
             WHERE tracking_number LIKE $1 || '%' AND outcome = 'filed') AS filed,
            (SELECT count(*) FROM webhook_deliveries
             WHERE tracking_number LIKE $1 || '%' AND outcome = 'duplicate') AS duplicates,
            (SELECT count(*) FROM changes AS c JOIN subscriptions AS s
             ON s.id = c.subscription_id WHERE s.tracking_number LIKE $1 || '%') AS changes
        """,
        prefix,
    )
    result.pop("timeline_per_s", None)
    return {
        **result,
        "build": build,
        "run": run_ + 1,
        "load": facts,
        "cpu_cores": cpu,
        "server_cpu_ms_per_delivery": _ms_per(cpu, "api", result["requests"]),
        "postgres_cpu_ms_per_delivery": _ms_per(cpu, "postgres", result["requests"]),
        "filed": counts["filed"],
        "duplicates": counts["duplicates"],
        "changes": counts["changes"],
        # Each original is a new state of its package: one change each, none without it.
        "expected_changes": facts["unique"] if build == "outbox" else 0,
    }


def _ms_per(cpu: dict[str, float], group: str, count: int) -> float:
    """CPU milliseconds of `group` per item, from `cpu_cores`' figures."""
    return 1000.0 * cpu.get(group, math.nan) * cpu.get("interval_s", math.nan) / max(1, count)


def _outbox_row(report: Report, result: dict[str, Any]) -> None:
    latency = result["latency_ms"]
    cpu = result["cpu_cores"]
    title = "with the outbox" if result["build"] == "outbox" else "no-outbox.patch"
    report.scenario(
        f"outbox/{result['run']}",
        f"realistic ingest, {title}",
        f"{number(result['per_s'])}/s p50 {latency['p50']:.1f} p99 {latency['p99']:.1f} ms",
        "-",
        f"{result['requests']:,} requests, {result['concurrency']} senders, "
        f"{result['elapsed_s']:.1f} s; statuses {result['statuses']}; {result['filed']:,} filed, "
        f"{result['duplicates']:,} duplicates, {result['changes']:,} changes (expected "
        f"{result['expected_changes']:,}); CPU ms/delivery: API "
        f"{result['server_cpu_ms_per_delivery']:.3f}, PostgreSQL "
        f"{result['postgres_cpu_ms_per_delivery']:.3f}; cores: {cores(cpu, CORES)}",
        result,
    )
    report.note_if_noisy(f"outbox/{result['run']}", cpu)


def _outbox_checks(report: Report, results: list[dict[str, Any]], imported: str) -> None:
    best = {
        build: max((r for r in results if r["build"] == build), key=lambda r: r["per_s"])
        for build in ("outbox", "no-outbox")
    }
    with_, without = best["outbox"], best["no-outbox"]
    ratio = with_["per_s"] / without["per_s"]
    report.scenarios["outbox/1"]["patched_service_imported_from"] = imported
    report.check(
        Check(
            "outbox: realistic deliveries/s with the outbox / without (best of each)",
            f">= {OUTBOX_RATIO_TARGET:.2f}",
            f"{number(with_['per_s'])}/s vs {number(without['per_s'])}/s; CPU ms/delivery: API "
            f"{with_['server_cpu_ms_per_delivery']:.3f} vs "
            f"{without['server_cpu_ms_per_delivery']:.3f}, PostgreSQL "
            f"{with_['postgres_cpu_ms_per_delivery']:.3f} vs "
            f"{without['postgres_cpu_ms_per_delivery']:.3f}",
            ratio / OUTBOX_RATIO_TARGET,
            ratio,
            ratio >= OUTBOX_RATIO_TARGET,
        )
    )
    wrong = [
        f"run {r['run']} ({r['build']}): {r['filed']} filed/{r['load']['unique']}, "
        f"{r['duplicates']} dup/{r['load']['repeats']}, {r['changes']} changes/"
        f"{r['expected_changes']}, statuses {r['statuses']}"
        for r in results
        if r["filed"] != r["load"]["unique"]
        or r["duplicates"] != r["load"]["repeats"]
        or r["changes"] != r["expected_changes"]
        or set(r["statuses"]) != {"200"}
    ]
    report.check(
        Check(
            "outbox: all 200, filed once; a change per original with it, none without",
            "all",
            "all" if not wrong else "; ".join(wrong),
            None,
            None,
            not wrong,
        )
    )


# -- idle -------------------------------------------------------------------------------------


async def idle(bench: Bench, plan: Plan, report: Report) -> None:
    async with (
        bench.postgres.database() as database_url,
        bench.processes("changes-idle") as procs,
    ):
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await subscribe_active(conn, f"{FEED_PREFIX}I", 1)
            url = await start_api(procs, {"DATABASE_URL": database_url})
            api = procs.named("api")
            headers = await api_headers(database_url, [READ_SCOPE], client="idle-readers")
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(
                connector=connector, timeout=timeout, headers=headers
            ) as session:
                # The token checked and a pool connection made, as any caller's first request.
                async with session.get(f"{url}/v1/changes", params={"limit": "1"}) as response:
                    await response.read()
                await asyncio.sleep(1.0)
                rss_before = memory_mb(api.pid)
                fds_before = len(os.listdir(f"/proc/{api.pid}/fd"))
                streams = [
                    EventStream(session, f"{url}/v1/changes/stream")
                    for _ in range(plan.idle_readers)
                ]
                async with contextlib.AsyncExitStack() as stack:
                    began = time.monotonic()
                    opening = asyncio.Semaphore(plan.idle_open_at_once)

                    async def open_one(stream: EventStream) -> None:
                        async with opening:
                            await stack.enter_async_context(_streaming(stream))
                            await asyncio.wait_for(stream.ready.wait(), 60)

                    opened = await asyncio.gather(
                        *(open_one(s) for s in streams), return_exceptions=True
                    )
                    open_s = time.monotonic() - began
                    failures = [repr(o) for o in opened if isinstance(o, BaseException)]
                    connected = sum(1 for s in streams if s.status == 200 and s.ready.is_set())
                    await asyncio.sleep(plan.idle_settle_s)
                    rss_after = memory_mb(api.pid)
                    fds_after = len(os.listdir(f"/proc/{api.pid}/fd"))
                    activity = [
                        dict(row)
                        for row in await conn.fetch(
                            "SELECT pid, application_name, state, query FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    ]
                    listening = [
                        row
                        for row in activity
                        if row["query"].startswith("LISTEN")
                        or row["application_name"] == LISTENER_NAME
                    ]
                    backends = len(activity)
                    before = cpu_snapshot({"api": [api.pid]})
                    fan_out_ms = await _fan_out(conn, streams)
                    fan_out_cpu = cpu_cores(before, cpu_snapshot({"api": [api.pid]}))
                    fan_out_ms["api_cpu_us_per_reader"] = 1000.0 * _ms_per(
                        fan_out_cpu, "api", connected
                    )
                    rss_fan_out = memory_mb(api.pid)
                limits = _open_files_limit(api.pid)
                statuses: dict[str, int] = {}
                for stream in streams:
                    key = str(stream.status)
                    statuses[key] = statuses.get(key, 0) + 1
        finally:
            await conn.close()
    grew = rss_after - rss_before
    data = {
        "readers": plan.idle_readers,
        "connected": connected,
        "statuses": statuses,
        "failures": failures[:5],
        "open_s": open_s,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "rss_after_one_change_mb": rss_fan_out,
        "rss_growth_mb": grew,
        "rss_per_reader_kb": 1024.0 * grew / max(1, connected),
        "fds_before": fds_before,
        "fds_after": fds_after,
        "api_open_files_limit": limits,
        "listen_connections": listening,
        "backends": activity,
        "backends_of_the_database": backends,
        "fan_out_ms": fan_out_ms,
    }
    report.scenario(
        "idle",
        f"{plan.idle_readers:,} idle SSE readers, 1 API process",
        f"+{grew:.1f} MB RSS, {len(listening)} LISTEN",
        "-",
        f"{connected:,} connected in {open_s:.1f} s ({plan.idle_open_at_once} opening at "
        f"once), statuses {statuses}; RSS {rss_before:.0f} -> {rss_after:.0f} MB "
        f"({data['rss_per_reader_kb']:.0f} KB a reader); fds {fds_before} -> {fds_after} "
        f"(limit {limits}); {backends} backends of its database; one change inserted reached "
        f"all {connected:,} in {fan_out_ms['all']:.0f} ms (first {fan_out_ms['first']:.0f}), "
        f"API CPU {fan_out_ms['api_cpu_us_per_reader']:.0f} us a reader",
        data,
    )
    report.check(
        Check(
            f"idle: API RSS growth with {plan.idle_readers:,} idle SSE readers",
            f"< {IDLE_RSS_TARGET_MB:.0f} MB",
            f"+{grew:.1f} MB ({rss_before:.0f} -> {rss_after:.0f}), {connected:,} connected",
            grew / IDLE_RSS_TARGET_MB,
            None,
            grew < IDLE_RSS_TARGET_MB and connected == plan.idle_readers,
        )
    )
    report.check(
        Check(
            f"idle: LISTEN connections of the API with {connected:,} readers",
            "== 1",
            str(len(listening)),
            None,
            None,
            len(listening) == 1,
        )
    )


async def _fan_out(conn: asyncpg.Connection, streams: list[EventStream]) -> dict[str, float]:
    """One change inserted (as filing would): ms from its commit until the first and the last
    reader had it."""
    counts = [len(s.events) for s in streams]
    await conn.execute(
        """
        INSERT INTO changes (type, subscription_id, sequence, state)
        SELECT 'subscription.active', id, change_sequence + 1, 'active' FROM subscriptions
        """
    )
    committed = time.time()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if all(len(s.events) > n for s, n in zip(streams, counts, strict=True)):
            break
        await asyncio.sleep(0.01)
    arrivals = [s.events[n][0] for s, n in zip(streams, counts, strict=True) if len(s.events) > n]
    if len(arrivals) < len(streams):
        return {"first": math.nan, "all": math.nan, "reached": len(arrivals)}
    return {
        "first": 1000.0 * (min(arrivals) - committed),
        "all": 1000.0 * (max(arrivals) - committed),
        "reached": len(arrivals),
    }


def _open_files_limit(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None
