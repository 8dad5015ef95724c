"""The wrk suite: the webhook receiver and subscribe under wrk, next to baselines measured in
the same run (issue 18: honest load, from outside, with a compiled load generator).

    wrk -t1 -c64 --latency, a 2 s warm-up then a 10 s run (quick: 1 s and 5 s), per server:

    (a)   `bench/baseline_server.py bare`: reads the body, 204
    (b)   `... insert`: one asyncpg INSERT of the body (pool of 10), 204
    (v)   `... verify`: (b) after checking the body's ShipEngine signature (RSA-SHA256, the
          JWKS key), as the receiver must
    full  `python -m service api` (API_WORKERS=1): POST /v1/webhooks/shipengine, verify,
          store, file, update status
    full2 the same with API_WORKERS=2: one Python process uses one core, and these 2 cores
          are shared with wrk and PostgreSQL; counted only where it wins

    realistic  6,000 active packages a receiver; deliveries signed before the run (the load
               generator's key, whose JWKS the API and (v) read), each a new state of its
               package, 10 % exact repeats of an earlier one; 48,000 of them (quick: 24,000),
               more than a receiver takes in a run, so it never sees the list twice
    hot        one delivery of one package over and over (a retry burst): after the first,
               every one a duplicate
    refusals   unsigned junk (a 60 KB body, 64 KB of headers) to (a) and the receiver, which
               answers 404 without reading the body and stores nothing
    subscribe  POST /v1/subscriptions with a token of every scope, each a new package
               (`bench/apiload.py`'s bodies; 60,000, quick 30,000), next to (b) at that path;
               1 process and API_WORKERS=2, on packages of their own
    bulk       POST /v1/subscriptions/batch, 1,000 new packages a request, 4 connections

Each baseline runs twice, before the receivers, and the better run counts; the two may differ
by 25 % at most, or the run says so (run again). The targets are judged on the receiver's
faster configuration, all of them on the same one. Every server also gets its CPU seconds per
request, from /proc/<pid>/stat before and after the run: steadier than requests a second on a
noisy machine. Lists signed more than 4 minutes earlier are signed again before a run (the
receiver refuses a timestamp 5 minutes old). After each receiver's run the database is checked:
each content stored once as the original, every repeat a duplicate of one, nothing answered
that was not stored.

The Python load generator (`bench/loadgen.py`) signs the deliveries and writes them for wrk;
it still sends load itself for the changes and notify suites: their deliveries are paced (open
loop, so many a second), which wrk cannot do, and the changes suite's `outbox` comparison of two
receivers has not moved to wrk yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from bench import apiload, baseline_server, profiling, wrk
from bench.infra import (
    LOOPBACK,
    BenchError,
    LoadGenerator,
    Processes,
    ServiceProcess,
    answers,
    api_headers,
    backend_pids,
    cpu_cores,
    cpu_snapshot,
    free_port,
    memory_mb,
    start_api,
    start_load_generator,
    with_children,
)
from bench.loadgen import WEBHOOK_PATH
from bench.report import Check, Report, cores, number
from bench.suite import Bench
from service.db.engine import asyncpg_dsn

SCENARIOS = ("realistic", "hot", "refusals", "subscribe", "bulk")
INGEST = ("realistic", "hot")
BASELINES = ("a", "b", "v")
RECEIVERS = {"full": 1, "full2": 2}  # by key, its API_WORKERS
SUBSCRIBERS = {"sub": "full", "sub2": "full2"}  # by key, the API that serves it
TITLES = {
    "a": "(a) bare aiohttp, 204",
    "b": "(b) aiohttp + 1 asyncpg INSERT",
    "v": "(v) (b) + the RSA-SHA256 check",
    "full": "the receiver, 1 process",
    "full2": "the receiver, API_WORKERS=2",
    "refused": "the receiver, unsigned (404)",
    "b_sub": "(b) at /v1/subscriptions",
    "sub": "POST /v1/subscriptions, 1 process",
    "sub2": "POST /v1/subscriptions, API_WORKERS=2",
    "bulk": "POST /v1/subscriptions/batch",
}
# Each receiver files packages of its own: what one stored must not make the other's
# duplicates. The baselines get the 1-process receiver's bytes.
PACKAGE_PREFIX = {"full": "1ZWRK", "full2": "1ZWRW"}
HOT_PACKAGE = {"full": "1ZWHOT000001", "full2": "1ZWHOT000002"}
WARMUP_PACKAGE = {"full": "1ZWWARM00001", "full2": "1ZWWARM00002"}  # nobody tracks them

SUBSCRIBE_PREFIX = {"sub": "1ZWS1", "sub2": "1ZWS2"}
SUBSCRIBE_WARMUP_PREFIX = {"sub": "1ZWSW1", "sub2": "1ZWSW2"}
BULK_PREFIX = "1ZWBULK"
BULK_WARMUP_PREFIX = "1ZWBW"

RATIO_TARGET = 1.0  # the receiver >= 1.0 x (v)
SUBSCRIBE_RATIO_TARGET = 0.8  # subscribe >= 0.8 x (b)
BULK_TARGET_PER_S = 20_000.0
CPU_RATIO_TARGET = 1.3  # the receiver's CPU per delivery <= 1.3 x (v)'s per request
RSS_TARGET_MB = 150.0
BASELINE_SPREAD_MAX = 0.25
RESIGN_AFTER_S = 180.0  # leaves a settle and a run 2 minutes before the 5-minute limit
CORES = ("server", "wrk", "postgres", "others")

# Junk as the hardening issue measured it: no signature headers, a 60 KB body, 64 KB of headers.
UNSIGNED_BODY = b'{"data": "' + b"x" * (60 * 1024 - 12) + b'"}'
UNSIGNED_HEADERS = {
    "Content-Type": "application/json",
    **{f"X-Filler-{n:02d}": "f" * 4_000 for n in range(16)},
}


@dataclasses.dataclass(frozen=True)
class Plan:
    connections: int = 64
    packages: int = 6_000
    deliveries: int = 48_000
    repeat_share: float = 0.10
    warmup_s: float = 2.0
    run_s: float = 10.0
    pool_size: int = 10
    subscriptions: int = 100_000  # more than the API takes in a run: each one new
    bulk_batches: int = 400
    bulk_size: int = 1_000
    bulk_connections: int = 4


FULL = Plan()
QUICK = dataclasses.replace(
    FULL, deliveries=24_000, warmup_s=1.0, run_s=5.0, subscriptions=50_000, bulk_batches=200
)


@dataclasses.dataclass
class Prepared:
    """A load signed by the load generator and written where wrk reads it."""

    path: Path
    requests: int
    signed_at: float


@dataclasses.dataclass(frozen=True)
class Measured:
    run: wrk.WrkRun
    cpu: dict[str, float]
    probed: tuple[float, ...] = ()  # what a `Probe`'s figures grew by over the run

    @property
    def cpu_ms_per_request(self) -> float:
        seconds = self.cpu.get("interval_s", 0.0)
        return 1000 * self.cpu.get("server", 0.0) * seconds / max(1, self.run.requests)

    def facts(self) -> dict[str, Any]:
        return {
            **self.run.facts(),
            "cpu": self.cpu,
            "cpu_ms_per_request": round(self.cpu_ms_per_request, 4),
        }


async def run(bench: Bench, report: Report) -> None:
    if wrk.executable() is None:
        report.note(wrk.MISSING)
        return
    plan = QUICK if bench.quick else FULL
    if bench.concurrency is not None:
        plan = dataclasses.replace(plan, connections=bench.concurrency)
    loads = [load for load in SCENARIOS if bench.wants(load)]
    if not loads:
        return
    report.options["plan"] = dataclasses.asdict(plan)
    async with (
        bench.postgres.database() as database_url,
        bench.processes("wrk") as procs,
    ):
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            for key in RECEIVERS:
                await subscribe_packages(conn, plan.packages, PACKAGE_PREFIX[key], HOT_PACKAGE[key])
            generator = await start_load_generator(procs, "loadgen")
            servers = await _start_servers(procs, database_url, generator.url, plan)
            lists = Lists(generator, procs.log_dir, plan)
            scrape = await api_headers(database_url)  # /metrics needs the `metrics` scope
            for load in (load for load in loads if load in INGEST):
                profile = bench.log_dir / f"wrk-{load}-api.pyspy.txt" if bench.profile else None
                await _measure(plan, report, procs, conn, lists, servers, load, profile, scrape)
            if "refusals" in loads:
                await _refusals(plan, report, conn, servers, procs.log_dir, scrape)
            headers = {**apiload.JSON, **await api_headers(database_url)}
            if "subscribe" in loads:
                profile = bench.log_dir / "wrk-subscribe-api.pyspy.txt" if bench.profile else None
                await _subscribe(plan, report, procs, conn, servers, headers, profile)
            if "bulk" in loads:
                await _bulk(plan, report, conn, servers["full"], procs.log_dir, headers)
            _rss_check(report, servers)
        finally:
            await conn.close()


async def subscribe_packages(
    conn: asyncpg.Connection, packages: int, prefix: str, hot: str
) -> None:
    """`packages` active subscriptions (and the hot one) in one statement, then ANALYZE."""
    await conn.execute(
        """
        INSERT INTO subscriptions (carrier_code, tracking_number, state, next_attempt_at)
        SELECT 'ups', $1 || lpad(g::text, 8, '0'), 'active', NULL::timestamptz
        FROM generate_series(0, $2::int - 1) AS g
        UNION ALL SELECT 'ups', $3, 'active', NULL::timestamptz
        """,
        prefix,
        packages,
        hot,
    )
    await conn.execute("ANALYZE subscriptions")


class Lists:
    """The signed lists, each (re)made when a run needs it: `<load>-<receiver>`."""

    def __init__(self, generator: LoadGenerator, folder: Path, plan: Plan) -> None:
        self._generator = generator
        self._folder = folder
        self._plan = plan
        self._made: dict[str, Prepared] = {}

    async def get(self, name: str) -> Prepared:
        made = self._made.get(name)
        if made is None or time.monotonic() - made.signed_at > RESIGN_AFTER_S:
            made = self._made[name] = await self._make(name)
        return made

    async def _make(self, name: str) -> Prepared:
        load, _, key = name.partition("-")
        spec: dict[str, Any] = {"load": name}
        if load == "realistic":
            spec |= {
                "kind": "realistic",
                "packages": self._plan.packages,
                "deliveries": self._plan.deliveries,
                "repeat_share": self._plan.repeat_share,
                "prefix": PACKAGE_PREFIX[key],
            }
        else:
            package = HOT_PACKAGE[key] if load == "hot" else WARMUP_PACKAGE[key]
            spec |= {"kind": "hot", "package": package, "requests": 1}
        signed_at = time.monotonic()
        await self._generator.call("/prepare", spec)
        path = self._folder / f"{name}.requests"
        written = await self._generator.call("/export", {"load": name, "path": str(path)})
        return Prepared(path, int(written["requests"]), signed_at)


# Figures of a server read before and after a measured run (from its /metrics).
Probe = Callable[[], Awaitable[tuple[float, ...]]]


@dataclasses.dataclass(frozen=True)
class Spy:
    """Where py-spy runs from and writes to."""

    procs: Processes
    output: Path


@dataclasses.dataclass(frozen=True)
class Server:
    key: str
    url: str
    process: ServiceProcess


async def _start_servers(
    procs: Processes, database_url: str, generator_url: str, plan: Plan
) -> dict[str, Server]:
    servers = {}
    modes = [
        ("a", "bare", WEBHOOK_PATH),
        ("b", "insert", WEBHOOK_PATH),
        ("v", "verify", WEBHOOK_PATH),
        ("b_sub", "insert", apiload.SINGLE_PATH),
    ]
    for key, mode, path in modes:
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        argv = [
            sys.executable, "-m", "bench.baseline_server", mode, "--port", str(port),
            "--database-url", database_url, "--pool-size", str(plan.pool_size),
            "--jwks-url", f"{generator_url}/jwks", "--path", path,
        ]  # fmt: skip
        process = await procs.start(f"baseline-{key}", argv, {}, answers(f"{url}/healthz"))
        servers[key] = Server(key, url, process)
    env = {
        "DATABASE_URL": database_url,
        "SHIPENGINE_BASE_URL": generator_url,
        "SHIPENGINE_JWKS_URL": f"{generator_url}/jwks",
    }
    for key, workers in RECEIVERS.items():
        name = f"api-{key}"
        url = await start_api(procs, {**env, "API_WORKERS": str(workers)}, name=name)
        servers[key] = Server(key, url, procs.named(name))
    return servers


async def _measure(
    plan: Plan,
    report: Report,
    procs: Processes,
    conn: asyncpg.Connection,
    lists: Lists,
    servers: dict[str, Server],
    load: str,
    profile: Path | None,
    scrape: dict[str, str],
) -> None:
    best: dict[str, Measured] = {}
    for key in BASELINES:
        runs = [await _run(plan, conn, lists, servers[key], f"{load}-full", None) for _ in range(2)]
        best[key] = _better(report, load, key, runs)
    receivers: dict[str, Measured] = {}
    for key in RECEIVERS:
        name = f"{load}-{key}"
        listed = await lists.get(name)
        spy = Spy(procs, profile) if profile is not None and key == "full" else None
        # One process's /metrics are all of them only with one process: with API_WORKERS=2
        # each scrape reaches whichever worker the kernel picks.
        probe = _group_commits(servers[key].url, scrape) if RECEIVERS[key] == 1 else None
        measured = await _run(
            plan, conn, lists, servers[key], name, f"warmup-{key}", spy=spy, probe=probe
        )
        items, commits = measured.probed or (0.0, 0.0)
        extra = f"mean group {items / commits:.1f}" if commits else ""
        _row(report, load, key, measured, extra)
        if spy is not None:
            title = f"the receiver under the {load} load"
            summary = profiling.report(spy.output, plan.run_s, title, STAGES, top=25)
            report.scenarios[f"{load}/{key}"]["profile"] = summary
        if load == "realistic" and measured.run.requests > listed.requests:
            report.note(
                f"realistic: {key} took {measured.run.requests:,} requests, more than the "
                f"{listed.requests:,} of the list: the rest were repeats (make the list longer)"
            )
        answered, in_flight = measured.run.requests, plan.connections
        problems = await _check_database(conn, load, key, answered, in_flight)
        what = f"{load}: {key} stored each content once, every repeat a duplicate"
        _database_check(report, f"{load}/{key}", what, problems)
        receivers[key] = measured
    chosen = max(receivers, key=lambda key: receivers[key].run.rate)
    _checks(report, load, chosen, receivers[chosen], best["v"])


async def _run(
    plan: Plan,
    conn: asyncpg.Connection,
    lists: Lists,
    server: Server,
    load: str,
    warmup: str | None,
    spy: Spy | None = None,
    probe: Probe | None = None,
) -> Measured:
    """A warm-up of `plan.warmup_s` (a receiver's on a list of its own: what it stores must
    not make the load's deliveries duplicates; a baseline's on the load), then the measured
    run, with CPU around it."""
    warm = await lists.get(warmup or load)
    measured = await lists.get(load)
    return await _run_files(
        plan, conn, server, warm.path, measured.path, plan.connections, spy=spy, probe=probe
    )


async def _run_files(
    plan: Plan,
    conn: asyncpg.Connection,
    server: Server,
    warm: Path,
    requests_file: Path,
    connections: int,
    refused: bool = False,
    spy: Spy | None = None,
    probe: Probe | None = None,
) -> Measured:
    """`refused`: every answer must be a refusal (400 or above), and is not an error. `spy`:
    py-spy on the server through the measured run (not the warm-up). `probe`: figures read
    before and after the measured run; `Measured.probed` holds what they grew by."""
    await wrk.run(server.url, warm, connections=connections, duration_s=plan.warmup_s)
    await _settle(conn)
    probed_before: tuple[float, ...] = await probe() if probe is not None else ()
    groups = {"server": with_children(server.process.pid), "postgres": await backend_pids(conn)}
    profiler = None
    if spy is not None:
        profiler = await profiling.record(spy.procs, server.process, plan.run_s, spy.output)
    before = cpu_snapshot(groups)
    measured = await wrk.run(
        server.url, requests_file, connections=connections, duration_s=plan.run_s
    )
    groups["postgres"] = await backend_pids(conn)  # with those a pool opened meanwhile
    cpu = cpu_cores(before, cpu_snapshot(groups))
    if profiler is not None:
        await profiling.wait(profiler, timeout_s=plan.run_s + 30)
    if cpu:
        cpu["wrk"] = round(measured.cpu_s / cpu["interval_s"], 3)
        cpu["others"] = round(cpu["others"] - cpu["wrk"], 3)
    errors = dict(measured.errors)
    if refused and errors.pop("status_errors", 0) != measured.requests:
        raise BenchError(f"{server.key} {requests_file.name}: not every answer a refusal")
    if any(errors.values()):
        raise BenchError(f"{server.key} {requests_file.name}: {measured.errors}")
    probed: tuple[float, ...] = ()
    if probe is not None:
        probed = tuple(a - b for a, b in zip(await probe(), probed_before, strict=True))
    return Measured(measured, cpu, probed)


async def _settle(conn: asyncpg.Connection) -> None:
    """The database as each run should find it: autovacuum would otherwise clean up after the
    loads before (tens of thousands of updated subscriptions) during the next one, on the
    same 2 cores, and the rows the baselines inserted are never read."""
    await conn.execute(f"TRUNCATE {baseline_server.TABLE}")
    await conn.execute("VACUUM (ANALYZE)")
    # A role without pg_checkpoint: the run starts with the writes still to flush.
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


async def _check_database(
    conn: asyncpg.Connection, load: str, key: str, answered: int, in_flight: int
) -> list[str]:
    """What a receiver kept of a load: each content stored once as the original (filed
    against its subscription), every repeat a duplicate of a stored one, by content and by its
    bytes (a repeat is the same body; a new state never is), and every delivery it answered,
    with at most `in_flight` more (wrk may have had requests in flight when it stopped)."""
    pattern = f"{PACKAGE_PREFIX[key]}%" if load == "realistic" else HOT_PACKAGE[key]
    row = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE d.outcome = 'filed') AS filed,
               count(DISTINCT d.content_sha256) FILTER (WHERE d.outcome = 'filed') AS contents,
               count(DISTINCT d.body_sha256) FILTER (WHERE d.outcome = 'filed') AS bodies,
               count(*) FILTER (WHERE d.outcome = 'filed' AND d.subscription_id IS NULL)
                   AS unfiled,
               count(*) FILTER (WHERE d.outcome = 'duplicate') AS duplicates,
               count(*) FILTER (WHERE d.outcome = 'duplicate' AND NOT EXISTS (
                   SELECT FROM webhook_deliveries AS o
                   WHERE o.content_sha256 = d.content_sha256 AND o.outcome = 'filed'
                     AND o.body_sha256 = d.body_sha256))
                   AS unmatched,
               count(*) FILTER (WHERE d.outcome NOT IN ('filed', 'duplicate')) AS others
        FROM webhook_deliveries AS d WHERE d.tracking_number LIKE $1
        """,
        pattern,
    )
    assert row is not None
    problems = []
    if not row["filed"] == row["contents"] == row["bodies"]:
        problems.append(
            f"{row['filed']} originals of {row['contents']} contents, {row['bodies']} bodies"
        )
    if load == "hot" and row["filed"] != 1:
        problems.append(f"{row['filed']} originals of the one delivery")
    if row["unfiled"] or row["unmatched"] or row["others"]:
        problems.append(
            f"{row['unfiled']} without subscription, {row['unmatched']} duplicates of nothing, "
            f"{row['others']} neither filed nor duplicate"
        )
    # The warm-up's deliveries are of another package; the run's, all of this one's.
    stored = row["filed"] + row["duplicates"]
    if not answered <= stored <= answered + in_flight:
        problems.append(f"{stored:,} stored, {answered:,} answered")
    return problems


async def _check_subscriptions(
    conn: asyncpg.Connection, prefix: str, answered: int, in_flight: int
) -> list[str]:
    """What the API kept of a subscribe load: one pending subscription with its start due
    per package answered (each is new: a 200 for a live one would show as a row short), with
    at most `in_flight` more."""
    row = await conn.fetchrow(
        """
        SELECT count(*) AS n, count(DISTINCT tracking_number) AS packages,
               count(*) FILTER (WHERE state = 'pending' AND next_attempt_at IS NOT NULL) AS due
        FROM subscriptions WHERE tracking_number LIKE $1
        """,
        f"{prefix}%",
    )
    assert row is not None
    problems = []
    if not answered <= row["n"] <= answered + in_flight:
        problems.append(f"{row['n']:,} subscriptions for {answered:,} answered")
    if row["packages"] != row["n"] or row["due"] != row["n"]:
        problems.append(f"{row['packages']:,} packages, {row['due']:,} due, of {row['n']:,}")
    return problems


def _database_check(report: Report, scenario: str, what: str, problems: list[str]) -> None:
    report.scenarios[scenario]["database_problems"] = problems
    report.check(
        Check(what, "all", "all" if not problems else "; ".join(problems), None, None, not problems)
    )


async def _refusals(
    plan: Plan,
    report: Report,
    conn: asyncpg.Connection,
    servers: dict[str, Server],
    folder: Path,
    scrape: dict[str, str],
) -> None:
    """Unsigned posts a second: (a) reads each body and answers 204; the receiver answers 404
    without reading it (aiohttp drains it), counts it and stores nothing."""
    path = folder / "refusals.requests"
    junk = wrk.RawRequest("POST", WEBHOOK_PATH, UNSIGNED_HEADERS, UNSIGNED_BODY)
    wrk.write_requests(path, [junk])  # wrk sends it round and round
    a = await _run_files(plan, conn, servers["a"], path, path, plan.connections)
    _row(report, "refusals", "a", a, "")
    probe = _refusals_counted(servers["full"].url, scrape)
    full = await _run_files(
        plan, conn, servers["full"], path, path, plan.connections, True, probe=probe
    )
    counted, not_found = full.probed
    _row(report, "refusals", "refused", full, "")
    stored = await conn.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE refusal = 'missing_headers'"
    )
    # wrk counts the answers it read; the server may have answered a few more it did not.
    answered = full.run.requests
    ok = min(counted, not_found) >= answered and stored == 0
    report.check(
        Check(
            "refusals: unsigned posts answered 404, none stored",
            "all",
            "all"
            if ok
            else f"of {answered}: {counted:.0f} counted, {not_found:.0f} 404, {stored} stored",
            None,
            full.run.rate / a.run.rate if a.run.rate else None,
            ok,
        )
    )


async def _metric_samples(url: str, headers: dict[str, str], family: str) -> list[Any]:
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{url}/metrics") as response,
    ):
        response.raise_for_status()
        exposition = await response.text()
    found = (f for f in text_string_to_metric_families(exposition) if f.name == family)
    return [sample for f in found for sample in f.samples]


def _group_commits(url: str, headers: dict[str, str]) -> Probe:
    """Deliveries and commits so far of a 1-process receiver's group commit."""

    async def read() -> tuple[float, ...]:
        totals = {"sum": 0.0, "count": 0.0}
        for sample in await _metric_samples(url, headers, "tracking_group_commit_size"):
            kind = sample.name.removeprefix("tracking_group_commit_size_")
            if sample.labels.get("path") == "webhook" and kind in totals:
                totals[kind] += sample.value
        return totals["sum"], totals["count"]

    return read


def _refusals_counted(url: str, headers: dict[str, str]) -> Probe:
    """Refusals for missing signature headers, and 404s of the webhook route, so far."""

    async def read() -> tuple[float, ...]:
        refused = await _metric_samples(url, headers, "tracking_webhook_refusals")
        answered = await _metric_samples(url, headers, "tracking_http_requests")
        return (
            sum(
                s.value
                for s in refused
                if s.labels.get("reason") == "missing_headers" and s.name.endswith("_total")
            ),
            sum(
                s.value
                for s in answered
                if s.labels.get("route") == WEBHOOK_PATH
                and s.labels.get("status") == "404"
                and s.name.endswith("_total")
            ),
        )

    return read


def _api_list(
    folder: Path, name: str, headers: dict[str, str], spec: dict[str, Any]
) -> tuple[Path, int]:
    """Subscribe requests (`bench/apiload.py`'s bodies) with the caller's token, for wrk."""
    path = folder / f"{name}.requests"
    made = apiload.prepare(spec)
    raw = (wrk.RawRequest("POST", r.path, headers, r.body) for r in made)
    return path, wrk.write_requests(path, raw)


async def _subscribe(
    plan: Plan,
    report: Report,
    procs: Processes,
    conn: asyncpg.Connection,
    servers: dict[str, Server],
    headers: dict[str, str],
    profile: Path | None,
) -> None:
    """New subscriptions, one a request: (b) twice, then each API on packages all new to it;
    `profile`: py-spy on the 1-process API through its measured run."""
    folder = procs.log_dir
    b_list, _ = _api_list(
        folder,
        "subscribe-b",
        headers,
        {"kind": "single", "count": plan.subscriptions, "prefix": "1ZWSB"},
    )
    runs = [
        await _run_files(plan, conn, servers["b_sub"], b_list, b_list, plan.connections)
        for _ in range(2)
    ]
    b = _better(report, "subscribe", "b_sub", runs)
    measured: dict[str, Measured] = {}
    for key, server in SUBSCRIBERS.items():
        single = {"kind": "single", "count": plan.subscriptions, "prefix": SUBSCRIBE_PREFIX[key]}
        listed, count = _api_list(folder, f"subscribe-{key}", headers, single)
        warm_spec = {**single, "count": 2_000, "prefix": SUBSCRIBE_WARMUP_PREFIX[key]}
        warm, _ = _api_list(folder, f"subscribe-warmup-{key}", headers, warm_spec)
        spy = Spy(procs, profile) if profile is not None and key == "sub" else None
        result = await _run_files(
            plan, conn, servers[server], warm, listed, plan.connections, spy=spy
        )
        if result.run.requests > count:
            report.note(f"subscribe: {key} took {result.run.requests:,} of a list of {count:,}")
        _row(report, "subscribe", key, result, "")
        answered = min(result.run.requests, count)  # past the list, repeats: 200, no row
        in_flight = min(plan.connections, count - answered)
        problems = await _check_subscriptions(conn, SUBSCRIBE_PREFIX[key], answered, in_flight)
        what = f"subscribe: {key} made one pending subscription per package answered"
        _database_check(report, f"subscribe/{key}", what, problems)
        if spy is not None:
            title = "POST /v1/subscriptions under wrk"
            summary = profiling.report(spy.output, plan.run_s, title, SUBSCRIBE_STAGES, top=25)
            report.scenarios[f"subscribe/{key}"]["profile"] = summary
        measured[key] = result
    chosen = max(measured, key=lambda key: measured[key].run.rate)
    api = measured[chosen]
    ratio = api.run.rate / b.run.rate if b.run.rate else float("nan")
    report.check(
        Check(
            f"subscribe: POST /v1/subscriptions ({TITLES[chosen].partition(', ')[2]}) vs (b)",
            f">= {SUBSCRIBE_RATIO_TARGET} x (b)",
            f"{number(api.run.rate)}/s vs {number(b.run.rate)}/s",
            ratio / SUBSCRIBE_RATIO_TARGET,
            ratio,
            ratio >= SUBSCRIBE_RATIO_TARGET,
        )
    )


async def _bulk(
    plan: Plan,
    report: Report,
    conn: asyncpg.Connection,
    api: Server,
    folder: Path,
    headers: dict[str, str],
) -> None:
    """Batches of `bulk_size` new packages, `bulk_connections` in flight."""
    spec = {
        "kind": "batch",
        "count": plan.bulk_batches,
        "size": plan.bulk_size,
        "prefix": BULK_PREFIX,
    }
    listed, count = _api_list(folder, "bulk", headers, spec)
    warm_spec = {**spec, "count": 5, "prefix": BULK_WARMUP_PREFIX}
    warm, _ = _api_list(folder, "bulk-warmup", headers, warm_spec)
    measured = await _run_files(plan, conn, api, warm, listed, plan.bulk_connections)
    if measured.run.requests > count:
        report.note(f"bulk: the API took {measured.run.requests:,} of a list of {count:,}")
    per_s = measured.run.rate * plan.bulk_size
    _row(report, "bulk", "bulk", measured, f"{number(per_s)} subscriptions/s")
    answered = min(measured.run.requests, count)
    in_flight = min(plan.bulk_connections, count - answered)
    problems = await _check_subscriptions(
        conn, BULK_PREFIX, answered * plan.bulk_size, in_flight * plan.bulk_size
    )
    what = "bulk: one pending subscription per package answered"
    _database_check(report, "bulk/bulk", what, problems)
    report.check(
        Check(
            "bulk: subscriptions/s",
            f">= {number(BULK_TARGET_PER_S)}",
            f"{number(per_s)}/s",
            per_s / BULK_TARGET_PER_S,
            None,
            per_s >= BULK_TARGET_PER_S,
        )
    )


def _better(report: Report, load: str, key: str, runs: list[Measured]) -> Measured:
    """A baseline's better run, reported with both; a note when they differ too much."""
    best = max(runs, key=lambda m: m.run.rate)
    spread = abs(runs[0].run.rate - runs[1].run.rate) / max(best.run.rate, 1e-9)
    rates = " and ".join(f"{number(m.run.rate)}/s" for m in runs)
    _row(report, load, key, best, f"runs {rates}, spread {spread:.0%}")
    if spread > BASELINE_SPREAD_MAX:
        report.note(
            f"{load}: baseline ({key})'s two runs differ by {spread:.0%} (more than "
            f"{BASELINE_SPREAD_MAX:.0%}): the machine was noisy, run again"
        )
    return best


def _row(report: Report, load: str, key: str, measured: Measured, extra: str) -> None:
    run = measured.run
    details = (
        f"p50 {run.p50_ms:.1f} p99 {run.p99_ms:.1f} ms; "
        f"{measured.cpu_ms_per_request:.3f} ms server CPU a request; "
        f"cores: {cores(measured.cpu, CORES)}"
    )
    report.scenario(
        f"{load}/{key}",
        TITLES[key],
        f"{number(run.rate)}/s",
        "-",
        f"{details}{'; ' + extra if extra else ''}",
        measured.facts(),
    )


def _checks(report: Report, load: str, key: str, full: Measured, v: Measured) -> None:
    """The issue's targets, on the receiver's faster configuration (`key`)."""
    who = f"receiver ({TITLES[key].partition(', ')[2]})"
    ratio = full.run.rate / v.run.rate if v.run.rate else float("nan")
    report.check(
        Check(
            f"{load}: {who} deliveries/s vs (v)",
            f">= {RATIO_TARGET} x (v)",
            f"{number(full.run.rate)}/s vs {number(v.run.rate)}/s",
            ratio / RATIO_TARGET,
            ratio,
            ratio >= RATIO_TARGET,
        )
    )
    report.check(
        Check(
            f"{load}: {who} p99 vs (v)'s",
            "<= (v)'s p99",
            f"{full.run.p99_ms:.1f} vs {v.run.p99_ms:.1f} ms",
            v.run.p99_ms / full.run.p99_ms if full.run.p99_ms else None,
            None,
            full.run.p99_ms <= v.run.p99_ms,
        )
    )
    cpu_ratio = full.cpu_ms_per_request / v.cpu_ms_per_request if v.cpu_ms_per_request else None
    report.check(
        Check(
            f"{load}: {who} CPU a delivery vs (v)'s a request",
            f"<= {CPU_RATIO_TARGET} x (v)",
            f"{full.cpu_ms_per_request:.3f} vs {v.cpu_ms_per_request:.3f} ms",
            CPU_RATIO_TARGET / cpu_ratio if cpu_ratio else None,
            cpu_ratio,
            cpu_ratio is not None and cpu_ratio <= CPU_RATIO_TARGET,
        )
    )


def _rss_check(report: Report, servers: dict[str, Server]) -> None:
    """The largest process of each server: with API_WORKERS each worker is an API process."""
    peaks = {
        key: max(memory_mb(pid, "VmHWM") for pid in with_children(server.process.pid))
        for key, server in servers.items()
    }
    report.options["peak_rss_mb"] = peaks
    api = peaks["full"]
    report.check(
        Check(
            "API peak RSS (VmHWM) over the loads",
            f"< {RSS_TARGET_MB:.0f} MB",
            f"{api:.0f} MB (b {peaks['b']:.0f}, each of 2 workers {peaks['full2']:.0f})",
            api / RSS_TARGET_MB,
            api / peaks["b"],
            None if math.isnan(api) else api < RSS_TARGET_MB,
        )
    )


# Frames on the stack that tell which part of the receiver a sample belongs to.
STAGES = {
    "receive_track (": "the handler, all of it",
    "_verify (": "signature verification (RSA, key lookup)",
    "_payload (": "JSON parsing of the body",
    "parse_track_payload (": "parse_track_payload",
    "content_digest (": "content_digest",
    "GroupCommit._commit (": "a group commit, all of it",
    "file_incoming (": "file_incoming (all SQL of a batch)",
    "_insert_originals_and_lock (": "_insert_originals_and_lock",
    "_file (": "_file (fold, then write_filings)",
    "file_update (": "file_update (the status fold)",
    "(sqlalchemy/": "SQLAlchemy",
    "(structlog/": "structlog",
    "(prometheus_client/": "prometheus_client",
    "web_log.py": "aiohttp access log",
    "EpollSelector.select (": "epoll wait",
}

# The same for the subscribe path.
SUBSCRIBE_STAGES = {
    "/api/subscriptions.py:": "the single handler, all of it",
    "read_json (": "read_json (body, json.loads)",
    "parse_body (": "parse_body (pydantic validation)",
    "GroupCommit._commit (": "a group commit, all of it",
    "create_subscriptions (": "create_subscriptions",
    "adopt_orphans (": "adopt_orphans (SELECT orphan deliveries)",
    "subscription_out (": "subscription_out (the answer's model)",
    "authenticate (": "auth middleware, all of it",
    "(sqlalchemy/": "SQLAlchemy",
    "(asyncpg/": "asyncpg",
    "(pydantic": "pydantic",
    "(structlog/": "structlog",
    "(prometheus_client/": "prometheus_client",
}
