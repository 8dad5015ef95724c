"""The notifications suite: pushing changes to consumers' endpoints (issue 17).

Each scenario has a database and processes of its own; the consumer (`bench/consumer.py`)
answers every endpoint after 50 ms, as the issue's consumer does.

    one      1 endpoint, 2,000 packages x 2 changes (quick: 800 x 2) in the feed, sent by one
             dispatcher process's notifier from the start of the feed; next to a bare aiohttp
             client (`bench/notify_baseline.py`) sending the same number of signed requests at
             the same concurrency (NOTIFY_CONCURRENCY_PER_ENDPOINT, 16), run before and after
    many     100 endpoints, each every client's, 150 packages x 2 changes (quick: 60 x 2): 30,000
             sends, the baseline at the notifier's concurrency (NOTIFY_CONCURRENCY, 256)
    lag      the API filing signed deliveries open-loop at 500/s for 20 s (quick: 8 s), each
             the first state of a package of its own (one change each), one endpoint: from a
             delivery's 2xx to the consumer's receipt of its change. Per-endpoint concurrency
             64: at 50 ms an answer, 16 would carry 320/s, less than is filed
    isolation  the same, beside a second endpoint whose consumer is down (it takes each request
             and never answers: every attempt waits out NOTIFY_TIMEOUT_S) with 10,000
             notifications queued, as after an hour down, their retries falling due through the
             run: how much later the healthy endpoint's notifications arrive than in `lag`

Throughput is counted at the consumer (its arrival times), after the first 5 % of arrivals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench import profiling
from bench.changes import FEED_CHANGES_SQL, subscribe_active
from bench.infra import (
    LOOPBACK,
    BenchError,
    Processes,
    ServiceProcess,
    answers,
    backend_pids,
    cpu_cores,
    cpu_snapshot,
    free_port,
    logged,
    start_api,
    start_load_generator,
)
from bench.loadgen import tracking_number
from bench.measure import distribution, rate
from bench.report import Check, Report, cores, number
from bench.suite import Bench
from service.db import changes as feed
from service.db.engine import asyncpg_dsn, create_engine
from service.dispatcher.runtime import render_change
from service.domain.endpoints import new_secret

SCENARIOS = ("one", "many", "lag", "isolation")

RATIO_TARGET = 0.8
PROFILE_S = 4.0  # --profile: how long the notifier is sampled, from its start
LAG_P50_TARGET_MS = 100.0
LAG_P99_TARGET_MS = 1000.0
ISOLATION_TARGET_MS = 100.0
PER_ENDPOINT = 16  # NOTIFY_CONCURRENCY_PER_ENDPOINT's default
SLOTS = 256  # NOTIFY_CONCURRENCY's default
CORES = ("notifier", "consumer", "postgres", "others")
LAG_CORES = ("api", "notifier", "consumer", "loadgen", "postgres", "others")

ONE_PREFIX = "1ZN1"
MANY_PREFIX = "1ZNM"
LAG_PREFIX = "1ZNLAG"
LAG_WARM_PREFIX = "1ZNLAGW"
WARMUP_PREFIX = "1ZNWARM"


@dataclasses.dataclass(frozen=True)
class Plan:
    one_packages: int = 2_000
    many_endpoints: int = 100
    many_packages: int = 150
    changes_each: int = 2
    latency_ms: float = 50.0
    lag_rate_per_s: float = 500.0
    lag_s: float = 20.0
    lag_warmup: int = 500
    lag_drain_s: float = 20.0
    lag_per_endpoint: int = 64
    dead_queued: int = 10_000
    senders: int = 64  # the load generator's, filing deliveries
    warmup_requests: int = 256
    send_timeout_s: float = 180.0


FULL = Plan()
QUICK = dataclasses.replace(
    FULL, one_packages=800, many_packages=60, lag_s=8.0, lag_warmup=250, dead_queued=4_000
)


async def run(bench: Bench, report: Report) -> None:
    plan = QUICK if bench.quick else FULL
    report.options["plan"] = dataclasses.asdict(plan)
    if bench.wants("one"):
        await throughput(bench, plan, report, "one", 1, plan.one_packages, PER_ENDPOINT)
    if bench.wants("many"):
        await throughput(
            bench, plan, report, "many", plan.many_endpoints, plan.many_packages, SLOTS
        )
    alone: dict[str, float] | None = None
    if bench.wants("lag"):
        alone = await lag(bench, plan, report, with_dead=False)
    if bench.wants("isolation"):
        beside = await lag(bench, plan, report, with_dead=True)
        if alone is not None:
            _isolation_check(report, alone, beside)


# -- the parts ----------------------------------------------------------------------------------


def notifier_env(database_url: str, shipengine_url: str, **settings: object) -> dict[str, str]:
    """A dispatcher process that does nothing but notify: nothing is due at ShipEngine, and the
    reconciler neither polls (one package a day) nor calls the bench's old packages stale."""
    env = {
        "DATABASE_URL": database_url,
        "SHIPENGINE_API_KEY": "bench",
        "SHIPENGINE_BASE_URL": shipengine_url,
        "RECONCILE_INTERVAL_S": "86400",
        "RECONCILE_BATCH": "1",
        "STALE_AFTER_HOURS": "1000000",
    }
    env.update({name: str(value) for name, value in settings.items()})
    return env


@dataclasses.dataclass
class Consumer:
    process: ServiceProcess
    url: str

    async def take(self) -> list[list[Any]]:
        """The arrivals since the last take: (time, endpoint name, webhook-id, number)."""
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}/_take") as response,
        ):
            taken: list[list[Any]] = await response.json()
            return taken

    async def until(
        self, wanted: int, timeout_s: float, endpoint: str | None = None
    ) -> list[list[Any]]:
        """Arrivals, taken until `wanted` came (counting `endpoint`'s only, when named: a dead
        endpoint's keep coming) or `timeout_s` passed."""
        arrivals: list[list[Any]] = []
        counted = 0
        deadline = time.monotonic() + timeout_s
        while counted < wanted and time.monotonic() < deadline:
            taken = await self.take()
            arrivals += taken
            counted += sum(1 for arrival in taken if endpoint in (None, arrival[1]))
            await asyncio.sleep(0.2)
        return arrivals


async def start_consumer(procs: Processes, latency_ms: float) -> Consumer:
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    argv = [sys.executable, "-m", "bench.consumer", "--port", str(port)]
    argv += ["--latency-ms", str(latency_ms)]
    process = await procs.start("consumer", argv, {}, answers(f"{url}/healthz"))
    return Consumer(process, url)


async def add_endpoints(
    conn: asyncpg.Connection, urls: Iterable[str], *, from_start: bool
) -> list[uuid.UUID]:
    """Endpoints of every client's changes at `urls`, following the feed from its start or
    from now; the notifiers woken."""
    ids: list[uuid.UUID] = []
    async with conn.transaction():
        for url in urls:
            endpoint_id = await conn.fetchval(
                "INSERT INTO notify_endpoints (url, created_by, all_clients, secret) "
                "VALUES ($1, 'bench', true, $2) RETURNING id",
                url,
                new_secret(),
            )
            await conn.execute(
                "INSERT INTO notify_cursors (endpoint_id, txid, change_id) SELECT $1, "
                + (
                    "0, 0"
                    if from_start
                    else "CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text) AS bigint)"
                    " - 1, 9223372036854775807"
                ),
                endpoint_id,
            )
            ids.append(endpoint_id)
        await conn.execute("SELECT pg_notify('notify_wake', '')")
    return ids


async def fill_feed(conn: asyncpg.Connection, prefix: str, packages: int, each: int) -> int:
    """`packages` active subscriptions with `each` changes apiece in the feed, as filing
    writes them (the changes suite's SQL), all below the feed's horizon."""
    await subscribe_active(conn, prefix, packages)
    total = packages * each
    await conn.execute(FEED_CHANGES_SQL, prefix, packages, 3, 20, 0, total)
    await conn.execute("SELECT setval(pg_get_serial_sequence('changes', 'id'), $1)", total)
    await conn.execute("ANALYZE changes")
    return total


async def sample_body(database_url: str, path: Path) -> int:
    """A notification's body as the notifier renders one of the feed's changes, written to
    `path` for the baseline; its size."""
    engine = create_engine(database_url, pool_size=1)
    try:
        async with feed.snapshot(engine) as snapshot:
            page = await feed.read(snapshot, None, 1, feed.ChangeFilter())
    finally:
        await engine.dispose()
    body = render_change(page.changes[0])
    await asyncio.to_thread(path.write_bytes, body)
    return len(body)


async def baseline(
    procs: Processes,
    consumer: Consumer,
    name: str,
    endpoints: int,
    concurrency: int,
    count: int,
    body: Path,
) -> dict[str, Any]:
    """The bare client's run: its rate as the consumer saw it."""
    argv = [
        sys.executable,
        "-m",
        "bench.notify_baseline",
        "--url-base",
        consumer.url,
        "--endpoints",
        str(endpoints),
        "--concurrency",
        str(concurrency),
        "--count",
        str(count),
        "--body-file",
        str(body),
    ]
    process = await procs.start(name, argv, {})
    code = await process.wait(600)
    if code != 0:
        raise BenchError(f"{name} exited {code}:\n{process.tail()}")
    arrivals = await consumer.until(count, 30)
    return {"client": json.loads(process.tail(1)), **_rate_of(arrivals)}


def _rate_of(arrivals: list[list[Any]]) -> dict[str, Any]:
    times = sorted(float(a[0]) for a in arrivals)
    if len(times) < 20:
        return {"arrivals": len(times), "per_s": math.nan}
    start = times[len(times) // 20]
    return {
        "arrivals": len(times),
        "per_s": rate(times, start, times[-1]),
        "seconds": times[-1] - start,
    }


# -- one endpoint, a hundred ------------------------------------------------------------------


async def throughput(
    bench: Bench,
    plan: Plan,
    report: Report,
    key: str,
    endpoints: int,
    packages: int,
    concurrency: int,
) -> None:
    async with (
        bench.postgres.database() as database_url,
        bench.processes(f"notify-{key}") as procs,
    ):
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            changes = await fill_feed(
                conn,
                f"{ONE_PREFIX if endpoints == 1 else MANY_PREFIX}",
                packages,
                plan.changes_each,
            )
            sends = changes * endpoints
            body_path = procs.log_dir / "body.json"
            size = await sample_body(database_url, body_path)
            consumer = await start_consumer(procs, plan.latency_ms)
            before_run = await baseline(
                procs, consumer, "baseline-1", endpoints, concurrency, sends, body_path
            )
            notifier = await procs.service(
                "notifier",
                "dispatcher",
                notifier_env(database_url, f"http://{LOOPBACK}:9"),
                logged("dispatcher.started"),
            )
            groups = {
                "notifier": [notifier.pid],
                "consumer": [consumer.process.pid],
                "postgres": await backend_pids(conn),
            }
            before = cpu_snapshot(groups)
            profiler = None
            if bench.profile:
                profile_to = procs.log_dir / "notifier.pyspy.txt"
                profiler = await profiling.record(procs, notifier, PROFILE_S, profile_to)
            urls = [f"{consumer.url}/e/{n}" for n in range(endpoints)]
            await add_endpoints(conn, urls, from_start=True)
            arrivals = await consumer.until(sends, plan.send_timeout_s)
            if profiler is not None:
                await profiling.wait(profiler, timeout_s=PROFILE_S + 30)
                summary = profiling.summarise(profile_to, PROFILE_S)
                print(f"{key}: the notifier's profile: {profile_to}")
                for spot in summary.hotspots:
                    print(f"  {spot.total_share:6.1%} {spot.self_share:6.1%}  {spot.function}")
            groups["postgres"] = await backend_pids(conn)  # with those opened meanwhile
            cpu = cpu_cores(before, cpu_snapshot(groups))
            await procs.stop([notifier])
            left = await conn.fetchval("SELECT count(*) FROM notify_messages")
            after_run = await baseline(
                procs, consumer, "baseline-2", endpoints, concurrency, sends, body_path
            )
        finally:
            await conn.close()
    measured = _rate_of(arrivals)
    ids = [a[2] for a in arrivals]
    best = max(before_run["per_s"], after_run["per_s"])
    ratio = measured["per_s"] / best if best > 0 else math.nan
    data = {
        "endpoints": endpoints,
        "changes": changes,
        "sends": sends,
        "body_bytes": size,
        "concurrency": concurrency,
        "notifier": measured,
        "baselines": [before_run, after_run],
        "duplicates": len(ids) - len(set(zip([a[1] for a in arrivals], ids, strict=True))),
        "left_queued": left,
        "cpu_cores": cpu,
    }
    report.scenario(
        key,
        f"{endpoints} endpoint(s), consumer at {number(plan.latency_ms)} ms",
        f"{number(measured['per_s'])}/s",
        f"{ratio:.2f} x bare client",
        f"{measured['arrivals']:,} of {sends:,} sends arrived, {data['duplicates']} twice, "
        f"{left} left queued; bare client {number(before_run['per_s'])}/s then "
        f"{number(after_run['per_s'])}/s at {concurrency} in flight; body {size} B; "
        f"cores: {cores(cpu, CORES)}",
        data,
    )
    report.note_if_noisy(key, cpu)
    report.check(
        Check(
            f"{key}: notifications/s, {endpoints} endpoint(s), vs a bare client",
            f">= {RATIO_TARGET} x bare client",
            f"{number(measured['per_s'])}/s vs {number(best)}/s",
            ratio / RATIO_TARGET,
            ratio,
            ratio >= RATIO_TARGET and measured["arrivals"] >= sends,
        )
    )


# -- lag, alone and beside a dead consumer ----------------------------------------------------


async def lag(bench: Bench, plan: Plan, report: Report, *, with_dead: bool) -> dict[str, float]:
    key = "isolation" if with_dead else "lag"
    deliveries = round(plan.lag_rate_per_s * plan.lag_s)
    async with (
        bench.postgres.database() as database_url,
        bench.processes(f"notify-{key}") as procs,
    ):
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await subscribe_active(conn, LAG_PREFIX, deliveries)
            await subscribe_active(conn, LAG_WARM_PREFIX, plan.lag_warmup)
            generator = await start_load_generator(procs, "loadgen")
            consumer = await start_consumer(procs, plan.latency_ms)
            env = {
                "DATABASE_URL": database_url,
                "SHIPENGINE_BASE_URL": generator.url,
                "SHIPENGINE_JWKS_URL": f"{generator.url}/jwks",
            }
            url = await start_api(procs, env)
            notifier = await procs.service(
                "notifier",
                "dispatcher",
                notifier_env(
                    database_url,
                    f"http://{LOOPBACK}:9",
                    NOTIFY_CONCURRENCY_PER_ENDPOINT=plan.lag_per_endpoint,
                    NOTIFY_TIMEOUT_S=10,
                ),
                logged("dispatcher.started"),
            )
            await add_endpoints(conn, [f"{consumer.url}/e/live?read=number"], from_start=False)
            if with_dead:
                (dead,) = await add_endpoints(conn, [f"{consumer.url}/e/dead"], from_start=False)
                await _queue_for_the_dead(conn, dead, plan)
            await generator.call(
                "/warmup",
                {
                    "url": url,
                    "concurrency": plan.senders,
                    "requests": plan.warmup_requests,
                    "package": f"{WARMUP_PREFIX}-{key}",
                },
            )
            facts = await generator.call(
                "/prepare",
                {"load": "lag", "kind": "distinct", "prefix": LAG_PREFIX, "packages": deliveries},
            )
            warm = await generator.call(
                "/prepare",
                {
                    "load": "warm",
                    "kind": "distinct",
                    "prefix": LAG_WARM_PREFIX,
                    "packages": plan.lag_warmup,
                },
            )
            await generator.call(
                "/paced", {"load": "warm", "url": url, "rate_per_s": plan.lag_rate_per_s}
            )
            await consumer.until(warm["requests"], plan.lag_drain_s, "live")
            groups = {
                "api": [procs.named("api").pid],
                "notifier": [notifier.pid],
                "consumer": [consumer.process.pid],
                "loadgen": [generator.process.pid],
                "postgres": await backend_pids(conn),
            }
            before = cpu_snapshot(groups)
            sent = await generator.call(
                "/paced", {"load": "lag", "url": url, "rate_per_s": plan.lag_rate_per_s}
            )
            answered = sum(1 for s in sent["status_of"] if s.startswith("2"))
            arrivals = await consumer.until(answered, plan.lag_drain_s, "live")
            groups["postgres"] = await backend_pids(conn)  # with those opened meanwhile
            cpu = cpu_cores(before, cpu_snapshot(groups))
        finally:
            await conn.close()
    numbers = [tracking_number(LAG_PREFIX, i) for i in range(facts["requests"])]
    dead_attempts = sum(1 for _, name, _, _ in arrivals if name == "dead")
    first: dict[str, float] = {}
    for at, name, _, number_ in arrivals:
        if name == "live" and number_ is not None:
            first.setdefault(number_, float(at))
    lags = [
        1000.0 * (first[n] - sent["answered_at"][i])
        for i, n in enumerate(numbers)
        if sent["status_of"][i].startswith("2") and n in first
    ]
    lag_ms = distribution(lags)
    missing = answered - len(lags)
    data = {
        "deliveries": sent["requests"],
        "statuses": sent["statuses"],
        "lag_ms": lag_ms,
        "missing": missing,
        "dead_attempts": dead_attempts,
        "cpu_cores": cpu,
    }
    beside = f"; requests to the dead endpoint meanwhile: {dead_attempts}" if with_dead else ""
    report.scenario(
        key,
        f"2xx -> consumer, {number(plan.lag_rate_per_s)} deliveries/s"
        + (", beside a dead endpoint" if with_dead else ""),
        f"p50 {lag_ms['p50']:.1f} p99 {lag_ms['p99']:.1f} ms",
        "-",
        f"{sent['requests']:,} deliveries, statuses {sent['statuses']}, {missing} not received"
        f"{beside}; cores: {cores(cpu, LAG_CORES)}",
        data,
    )
    report.note_if_noisy(key, cpu)
    if not with_dead:
        report.check(
            Check(
                "lag: delivery 2xx -> consumer, p50",
                f"< {number(LAG_P50_TARGET_MS)} ms",
                f"{lag_ms['p50']:.1f} ms",
                LAG_P50_TARGET_MS / lag_ms["p50"] if lag_ms["p50"] > 0 else math.nan,
                None,
                lag_ms["p50"] < LAG_P50_TARGET_MS and missing == 0,
            )
        )
        report.check(
            Check(
                "lag: delivery 2xx -> consumer, p99",
                f"< {number(LAG_P99_TARGET_MS)} ms",
                f"{lag_ms['p99']:.1f} ms",
                LAG_P99_TARGET_MS / lag_ms["p99"] if lag_ms["p99"] > 0 else math.nan,
                None,
                lag_ms["p99"] < LAG_P99_TARGET_MS and missing == 0,
            )
        )
    return lag_ms


async def _queue_for_the_dead(conn: asyncpg.Connection, endpoint_id: uuid.UUID, plan: Plan) -> None:
    """What an hour down leaves: `dead_queued` notifications, one lane each, three failures
    behind them, their next retries falling due through the run."""
    body = json.dumps({"type": "tracking.events_added", "data": {"note": "x" * 900}})
    await conn.execute(
        """
        WITH made AS (
            SELECT gen_random_uuid() AS subscription_id, g FROM generate_series(1, $2::int) AS g
        ), queued AS (
            INSERT INTO notify_messages
                (endpoint_id, change_id, subscription_id, sequence, type, body)
            SELECT $1, 1000000000 + g, subscription_id, 1, 'tracking.events_added',
                   convert_to($3, 'UTF8')
            FROM made
        )
        INSERT INTO notify_lanes (endpoint_id, subscription_id, pending, failures, next_attempt_at)
        SELECT $1, subscription_id, 1, 3, now() + (g % $4::int) * interval '1 second' FROM made
        """,
        endpoint_id,
        plan.dead_queued,
        body,
        max(1, round(plan.lag_s)),
    )


def _isolation_check(report: Report, alone: dict[str, float], beside: dict[str, float]) -> None:
    delay = beside["p99"] - alone["p99"]
    report.check(
        Check(
            "isolation: a dead endpoint's extra delay of another, p99",
            f"<= {number(ISOLATION_TARGET_MS)} ms",
            f"{delay:.1f} ms (p99 {beside['p99']:.1f} vs {alone['p99']:.1f} alone)",
            ISOLATION_TARGET_MS / delay if delay > 0 else math.inf,
            None,
            delay <= ISOLATION_TARGET_MS,
        )
    )
