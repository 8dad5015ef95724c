"""The wrk suite: the webhook receiver and subscribe under wrk, next to baselines measured in
the same run (issue 18: honest load, from outside, with a compiled load generator).

    wrk -t1 -c64 --latency, a 2 s warm-up then a 10 s run (quick: 1 s and 5 s), per server:

    (a)   `bench/baseline_server.py bare`: reads the body, 204
    (b)   `... insert`: one asyncpg INSERT of the body (pool of 10), 204
    (v)   `... verify`: (b) after checking the body's ShipEngine signature (RSA-SHA256, the
          JWKS key), as the receiver must
    full  `python -m service api` (API_WORKERS=1): POST /v1/webhooks/shipengine, verify,
          store, file, update status

    realistic  6,000 active packages; deliveries signed before the run (the load generator's
               key, whose JWKS the API and (v) read), each a new state of its package, 10 %
               exact repeats of an earlier one; 36,000 of them (quick: 15,000), more than
               the receiver takes in a run, so it never sees the list twice
    hot        one delivery of one package over and over (a retry burst): after the first,
               every one a duplicate
    subscribe  POST /v1/subscriptions with a token of every scope, each a new package
               (`bench/apiload.py`'s bodies; 60,000, quick 30,000), next to (b) at that path
    bulk       POST /v1/subscriptions/batch, 1,000 new packages a request, 4 connections

Each baseline runs twice, before the receiver, and the better run counts; the two may differ
by 25 % at most, or the run says so (run again). Every server also gets its CPU seconds per
request, from /proc/<pid>/stat before and after the run: steadier than requests a second on a
noisy machine. Lists signed more than 4 minutes earlier are signed again before a run (the
receiver refuses a timestamp 5 minutes old).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench import apiload, profiling, wrk
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
    start_api,
    start_load_generator,
    with_children,
)
from bench.ingest import STAGES, subscribe_packages
from bench.loadgen import WEBHOOK_PATH
from bench.report import Check, Report, cores, number
from bench.suite import Bench
from service.db.engine import asyncpg_dsn

SCENARIOS = ("realistic", "hot", "subscribe", "bulk")
INGEST = ("realistic", "hot")
BASELINES = ("a", "b", "v")
TITLES = {
    "a": "(a) bare aiohttp, 204",
    "b": "(b) aiohttp + 1 asyncpg INSERT",
    "v": "(v) (b) + the RSA-SHA256 check",
    "full": "the receiver, 1 process",
    "b_sub": "(b) at /v1/subscriptions",
    "sub": "POST /v1/subscriptions, 1 process",
    "bulk": "POST /v1/subscriptions/batch",
}
PACKAGE_PREFIX = "1ZWRK"
HOT_PACKAGE = "1ZWRKHOT0001"
WARMUP_PACKAGE = "1ZWRKWARM001"  # nobody tracks it: the receiver's warm-up files nothing

SUBSCRIBE_PREFIX = "1ZWSUB"
SUBSCRIBE_WARMUP_PREFIX = "1ZWSUBW"
BULK_PREFIX = "1ZWBULK"
BULK_WARMUP_PREFIX = "1ZWBULKW"

RATIO_TARGET = 1.0  # the receiver >= 1.0 x (v)
SUBSCRIBE_RATIO_TARGET = 0.8  # subscribe >= 0.8 x (b)
BULK_TARGET_PER_S = 20_000.0
CPU_RATIO_TARGET = 1.3  # the receiver's CPU per delivery <= 1.3 x (v)'s per request
BASELINE_SPREAD_MAX = 0.25
RESIGN_AFTER_S = 240.0
CORES = ("server", "wrk", "postgres", "others")


@dataclasses.dataclass(frozen=True)
class Plan:
    connections: int = 64
    packages: int = 6_000
    deliveries: int = 36_000
    repeat_share: float = 0.10
    warmup_s: float = 2.0
    run_s: float = 10.0
    pool_size: int = 10
    subscriptions: int = 60_000  # more than the API takes in a run: each one new
    bulk_batches: int = 400
    bulk_size: int = 1_000
    bulk_connections: int = 4


FULL = Plan()
QUICK = dataclasses.replace(
    FULL, deliveries=15_000, warmup_s=1.0, run_s=5.0, subscriptions=30_000, bulk_batches=200
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
            await subscribe_packages(conn, plan.packages, PACKAGE_PREFIX, HOT_PACKAGE)
            generator = await start_load_generator(procs, "loadgen")
            servers = await _start_servers(procs, database_url, generator.url, plan)
            lists = Lists(generator, procs.log_dir, plan)
            for load in (load for load in loads if load in INGEST):
                profile = bench.log_dir / f"wrk-{load}-api.pyspy.txt" if bench.profile else None
                await _measure(plan, report, procs, conn, lists, servers, load, profile)
            headers = {**apiload.JSON, **await api_headers(database_url)}
            if "subscribe" in loads:
                await _subscribe(plan, report, conn, servers, procs.log_dir, headers)
            if "bulk" in loads:
                await _bulk(plan, report, conn, servers["full"], procs.log_dir, headers)
        finally:
            await conn.close()


class Lists:
    """The signed lists, each (re)made when a run needs it."""

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
        spec: dict[str, Any] = {"load": name}
        if name == "realistic":
            spec |= {
                "kind": "realistic",
                "packages": self._plan.packages,
                "deliveries": self._plan.deliveries,
                "repeat_share": self._plan.repeat_share,
                "prefix": PACKAGE_PREFIX,
            }
        else:
            package = HOT_PACKAGE if name == "hot" else WARMUP_PACKAGE
            spec |= {"kind": "hot", "package": package, "requests": 1}
        signed_at = time.monotonic()
        await self._generator.call("/prepare", spec)
        path = self._folder / f"{name}.requests"
        written = await self._generator.call("/export", {"load": name, "path": str(path)})
        return Prepared(path, int(written["requests"]), signed_at)


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
        "API_WORKERS": "1",
    }
    url = await start_api(procs, env, name="api")
    servers["full"] = Server("full", url, procs.named("api"))
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
) -> None:
    best: dict[str, Measured] = {}
    for key in BASELINES:
        runs = [await _run(plan, conn, lists, servers[key], load, load) for _ in range(2)]
        best[key] = _better(report, load, key, runs)
    realistic = await lists.get(load)
    profiler = None
    if profile is not None:  # py-spy on the receiver, through its measured run
        await lists.get("warmup")
        profiler = await profiling.record(procs, servers["full"].process, plan.run_s, profile)
    full = await _run(plan, conn, lists, servers["full"], load, "warmup")
    if profiler is not None and profile is not None:
        await profiling.wait(profiler, timeout_s=plan.run_s + 30)
        title = f"the receiver under the {load} load"
        full_profile = profiling.report(profile, plan.run_s, title, STAGES, top=25)
    if load == "realistic" and full.run.requests > realistic.requests:
        report.note(
            f"realistic: the receiver took {full.run.requests:,} requests, more than the "
            f"{realistic.requests:,} of the list: the rest were repeats (make the list longer)"
        )
    _row(report, load, "full", full, "")
    if profiler is not None:
        report.scenarios[f"{load}/full"]["profile"] = full_profile
    _checks(report, load, full, best["v"])


async def _run(
    plan: Plan,
    conn: asyncpg.Connection,
    lists: Lists,
    server: Server,
    load: str,
    warmup: str,
) -> Measured:
    """A warm-up of `plan.warmup_s` (the receiver's on a list of its own: what it stores must
    not make the load's deliveries duplicates), then the measured run, with CPU around it."""
    warm = await lists.get(warmup)
    measured = await lists.get(load)
    return await _run_files(plan, conn, server, warm.path, measured.path, plan.connections)


async def _run_files(
    plan: Plan,
    conn: asyncpg.Connection,
    server: Server,
    warm: Path,
    requests_file: Path,
    connections: int,
) -> Measured:
    await wrk.run(server.url, warm, connections=connections, duration_s=plan.warmup_s)
    groups = {"server": with_children(server.process.pid), "postgres": await backend_pids(conn)}
    before = cpu_snapshot(groups)
    measured = await wrk.run(
        server.url, requests_file, connections=connections, duration_s=plan.run_s
    )
    cpu = cpu_cores(before, cpu_snapshot(groups))
    if cpu:
        cpu["wrk"] = round(measured.cpu_s / cpu["interval_s"], 3)
        cpu["others"] = round(cpu["others"] - cpu["wrk"], 3)
    if measured.failed:
        raise BenchError(f"{server.key} {requests_file.name}: {measured.errors}")
    return Measured(measured, cpu)


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
    conn: asyncpg.Connection,
    servers: dict[str, Server],
    folder: Path,
    headers: dict[str, str],
) -> None:
    """New subscriptions, one a request: (b) twice, then the API on packages all new to it."""
    single = {"kind": "single", "count": plan.subscriptions, "prefix": SUBSCRIBE_PREFIX}
    listed, count = _api_list(folder, "subscribe", headers, single)
    warm_spec = {**single, "count": 2_000, "prefix": SUBSCRIBE_WARMUP_PREFIX}
    warm, _ = _api_list(folder, "subscribe-warmup", headers, warm_spec)
    runs = [
        await _run_files(plan, conn, servers["b_sub"], listed, listed, plan.connections)
        for _ in range(2)
    ]
    b = _better(report, "subscribe", "b_sub", runs)
    api = await _run_files(plan, conn, servers["full"], warm, listed, plan.connections)
    if api.run.requests > count:
        report.note(f"subscribe: the API took {api.run.requests:,} of a list of {count:,}")
    _row(report, "subscribe", "sub", api, "")
    ratio = api.run.rate / b.run.rate if b.run.rate else float("nan")
    report.check(
        Check(
            "subscribe: POST /v1/subscriptions vs (b)",
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


def _checks(report: Report, load: str, full: Measured, v: Measured) -> None:
    ratio = full.run.rate / v.run.rate if v.run.rate else float("nan")
    report.check(
        Check(
            f"{load}: receiver deliveries/s vs (v)",
            f">= {RATIO_TARGET} x (v)",
            f"{number(full.run.rate)}/s vs {number(v.run.rate)}/s",
            ratio / RATIO_TARGET,
            ratio,
            ratio >= RATIO_TARGET,
        )
    )
    report.check(
        Check(
            f"{load}: receiver p99 vs (v)'s",
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
            f"{load}: receiver CPU a delivery vs (v)'s a request",
            f"<= {CPU_RATIO_TARGET} x (v)",
            f"{full.cpu_ms_per_request:.3f} vs {v.cpu_ms_per_request:.3f} ms",
            CPU_RATIO_TARGET / cpu_ratio if cpu_ratio else None,
            cpu_ratio,
            cpu_ratio is not None and cpu_ratio <= CPU_RATIO_TARGET,
        )
    )
