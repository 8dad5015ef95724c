"""The subscribe suite: new subscriptions a second through `POST /v1/subscriptions`, one at a
time and in batches of 1,000.

One database, one load generator process (`bench/apiload.py`: 64 senders over keep-alive
connections, the bodies built before anything is measured) and two servers, each its own
process:

    (b)   an aiohttp handler doing one asyncpg INSERT of the body (pool of 10), then 204
          (`bench/baseline_server.py insert --path /v1/subscriptions`)
    api   `python -m service api` with a bearer token of the `subscriptions:write` scope:
          validate, INSERT ... ON CONFLICT DO NOTHING RETURNING with the dispatch due, look
          for deliveries that came first, answer 202 with the subscription

    sub_b  (b) gets the subscription bodies, again and again for 5 s
    sub    the API gets the same bodies once: each a new package, 202 and one row each
    sub2   the same with API_WORKERS=2 (both cores, as the ingest suite's `full2`), on
           packages of its own
    bulk   POST /v1/subscriptions/batch, 1,000 new packages a request, 4 senders, 1 process

Afterwards the database is checked (a pending subscription per package, none twice).
`--profile` samples the API with py-spy during `sub` and prints where its time goes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import asyncpg

from bench import profiling
from bench.infra import (
    LOOPBACK,
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
from bench.report import Check, Report, cores, number
from bench.suite import Bench
from service.db.engine import asyncpg_dsn

SCENARIOS = ("sub_b", "sub", "sub2", "bulk")

SINGLE_PREFIX = "1ZSUB"
SINGLE2_PREFIX = "1ZSUBW"
BULK_PREFIX = "1ZBULK"
WARMUP_PREFIX = "1ZWARM"

RATIO_TO_B_TARGET = 0.8
BULK_TARGET_PER_S = 20_000.0


@dataclasses.dataclass(frozen=True)
class Plan:
    concurrency: int = 64
    single_requests: int = 5_000
    warmup_requests: int = 256
    baseline_pool_size: int = 10
    # (b) gets the list again until this long has passed: a second is too short for a rate.
    # The API gets each list once (every package new; the database is checked after).
    baseline_min_s: float = 5.0
    batch_size: int = 1_000
    batches: int = 100
    batch_concurrency: int = 4
    batch_warmup: int = 4
    profile_s: float = 6.0


FULL = Plan()
QUICK = dataclasses.replace(
    FULL,
    single_requests=3_000,
    warmup_requests=128,
    baseline_min_s=2.0,
    batches=30,
    batch_warmup=2,
    profile_s=2.0,
)


@dataclasses.dataclass(frozen=True)
class Target:
    key: str
    url: str
    process: ServiceProcess
    headers: dict[str, str]
    load: str = "single"  # the prepared list it is sent
    prefix: str = SINGLE_PREFIX  # of that list's tracking numbers


CORES = ("server", "loadgen", "postgres", "others")
TITLES = {
    "sub_b": "(b) aiohttp + 1 asyncpg INSERT",
    "sub": "POST /v1/subscriptions",
    "sub2": "POST /v1/subscriptions, API_WORKERS=2",
}


async def run(bench: Bench, report: Report) -> None:
    plan = QUICK if bench.quick else FULL
    if bench.concurrency is not None:
        plan = dataclasses.replace(plan, concurrency=bench.concurrency)
    if not any(bench.wants(key) for key in SCENARIOS):
        return
    report.options["plan"] = dataclasses.asdict(plan)
    async with (
        bench.postgres.database() as database_url,
        bench.processes("subscribe") as procs,
    ):
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            generator = await start_load_generator(procs, "apiload")
            baseline = await _start_baseline(procs, database_url, plan)
            url = await start_api(procs, {"DATABASE_URL": database_url})
            api_process = procs.named("api")
            api = Target("sub", url, api_process, await api_headers(database_url))
            singles = [baseline]  # (b) always: `sub` and `sub2` are judged against it
            if bench.wants("sub"):
                singles.append(api)
            if bench.wants("sub2"):
                # Both cores for the API, as the ingest suite's `full2`; packages of its own.
                env = {"DATABASE_URL": database_url, "API_WORKERS": "2"}
                url2 = await start_api(procs, env, name="api-2")
                api2 = procs.named("api-2")
                singles.append(Target("sub2", url2, api2, api.headers, "single2", SINGLE2_PREFIX))
            results: dict[str, dict[str, Any]] = {}
            if any(bench.wants(key) for key in ("sub_b", "sub", "sub2")):
                await _single(bench, plan, report, procs, conn, generator, singles, results)
            if bench.wants("bulk"):
                await _bulk(bench, plan, report, procs, conn, generator, api, results)
        finally:
            await conn.close()


async def _start_baseline(procs: Processes, database_url: str, plan: Plan) -> Target:
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    argv = [
        sys.executable, "-m", "bench.baseline_server", "insert", "--port", str(port),
        "--database-url", database_url, "--pool-size", str(plan.baseline_pool_size),
        "--path", "/v1/subscriptions",
    ]  # fmt: skip
    process = await procs.start("baseline-b", argv, {}, answers(f"{url}/healthz"))
    return Target("sub_b", url, process, {})


async def _single(
    bench: Bench,
    plan: Plan,
    report: Report,
    procs: Processes,
    conn: asyncpg.Connection,
    generator: LoadGenerator,
    targets: list[Target],
    results: dict[str, dict[str, Any]],
) -> None:
    for load, prefix in sorted({(t.load, t.prefix) for t in targets}):
        facts = await generator.call(
            "/prepare",
            {"load": load, "kind": "single", "prefix": prefix, "count": plan.single_requests},
        )
        print(
            f"{load}: {facts['requests']:,} subscriptions prepared, "
            f"{facts['mean_body_bytes']:.0f} bytes each",
            flush=True,
        )
    # The API is sent its bodies with its token; (b) the same bodies with the same headers.
    headers = next(t.headers for t in targets if t.headers)
    for target in targets:
        await generator.call(
            "/warmup",
            {
                "url": target.url,
                "kind": "single",
                "prefix": f"{WARMUP_PREFIX}-{target.key}-",
                "requests": plan.warmup_requests,
                "headers": headers,
                "concurrency": plan.concurrency,
            },
        )
        result = await _measured(
            bench,
            plan,
            procs,
            conn,
            generator,
            target,
            {
                "load": target.load,
                "url": target.url,
                "headers": headers,
                "concurrency": plan.concurrency,
                "min_s": plan.baseline_min_s if target.key == "sub_b" else 0.0,
            },
        )
        results[target.key] = result
        if target.key != "sub_b":
            result["database"] = await _check_database(conn, target.prefix, plan.single_requests)
        _single_row(report, target.key, result, results)
    _single_checks(report, results)


async def _bulk(
    bench: Bench,
    plan: Plan,
    report: Report,
    procs: Processes,
    conn: asyncpg.Connection,
    generator: LoadGenerator,
    api: Target,
    results: dict[str, dict[str, Any]],
) -> None:
    spec = {
        "load": "bulk",
        "kind": "batch",
        "prefix": BULK_PREFIX,
        "count": plan.batches,
        "size": plan.batch_size,
    }
    facts = await generator.call("/prepare", spec)
    print(
        f"bulk: {facts['requests']:,} batches of {plan.batch_size:,} prepared, "
        f"{facts['mean_body_bytes'] / 1024:.0f} KiB each",
        flush=True,
    )
    await generator.call(
        "/warmup",
        {
            "url": api.url,
            "kind": "batch",
            "prefix": f"{WARMUP_PREFIX}-bulk-",
            "requests": plan.batch_warmup,
            "size": plan.batch_size,
            "headers": api.headers,
            "concurrency": plan.batch_concurrency,
        },
    )
    result = await _measured(
        bench,
        plan,
        procs,
        conn,
        generator,
        dataclasses.replace(api, key="bulk"),
        {
            "load": "bulk",
            "url": api.url,
            "headers": api.headers,
            "concurrency": plan.batch_concurrency,
            "min_s": 0.0,
        },
    )
    expected = plan.batches * plan.batch_size
    result["database"] = await _check_database(conn, BULK_PREFIX, expected)
    results["bulk"] = result
    per_s = result["items_per_s"]
    latency = result["latency_ms"]
    cpu = result["cpu_cores"]
    single = results.get("sub", {}).get("per_s", math.nan)
    b = results.get("sub_b", {}).get("per_s", math.nan)
    report.scenario(
        "bulk",
        f"POST /v1/subscriptions/batch x {plan.batch_size:,}",
        f"{number(per_s)} subs/s p50 {latency['p50']:.0f} p99 {latency['p99']:.0f} ms",
        "-" if math.isnan(b) else f"{per_s / b:.1f} b, {per_s / single:.1f} sub",
        f"{result['requests']:,} batches ({result['items']:,} subscriptions), "
        f"{result['concurrency']} senders, {result['elapsed_s']:.1f} s; statuses "
        f"{result['statuses']}; cores: {cores(cpu, CORES)}; API CPU "
        f"{result['server_cpu_ms_per_request'] / plan.batch_size * 1000:.0f} us/subscription",
        result,
    )
    report.note_if_noisy("bulk", cpu)
    report.check(
        Check(
            "bulk: subscriptions/s via /batch (1,000 a call)",
            f">= {number(BULK_TARGET_PER_S)}/s",
            f"{number(per_s)}/s",
            per_s / BULK_TARGET_PER_S,
            None if math.isnan(b) else per_s / b,
            per_s >= BULK_TARGET_PER_S,
        )
    )
    wrong = {s: n for s, n in result["statuses"].items() if s != "200"}
    problems = result["database"]["problems"]
    report.check(
        Check(
            "bulk: answers 200, every subscription stored once",
            "all",
            "all" if not wrong and not problems else f"{wrong} {'; '.join(problems)}".strip(),
            None,
            None,
            not wrong and not problems,
        )
    )


async def _measured(
    bench: Bench,
    plan: Plan,
    procs: Processes,
    conn: asyncpg.Connection,
    generator: LoadGenerator,
    target: Target,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """One /run of the load generator, with the CPU of each side counted (and the API
    sampled by py-spy during `sub` with --profile)."""
    groups = {
        "server": with_children(target.process.pid),
        "loadgen": [generator.process.pid],
        "postgres": await backend_pids(conn),
        "bench": [os.getpid()],
    }
    before = cpu_snapshot(groups)
    profiler, profile_to = None, None
    if bench.profile and target.key in ("sub", "bulk"):
        profile_to = bench.log_dir / f"subscribe-{target.key}-api.pyspy.txt"
        profiler = await profiling.record(procs, target.process, plan.profile_s, profile_to)
    result = await generator.call("/run", spec)
    result["cpu_cores"] = cpu_cores(before, cpu_snapshot(groups))
    result["server_cpu_ms_per_request"] = (
        1000.0
        * result["cpu_cores"].get("server", math.nan)
        * result["cpu_cores"].get("interval_s", math.nan)
        / result["requests"]
    )
    if profiler is not None and profile_to is not None:
        await profiling.wait(profiler, timeout_s=plan.profile_s + 30)
        result["profile"] = profiling.report(
            profile_to, plan.profile_s, f"the API during `{target.key}`", STAGES, top=20
        )
    return result


def _single_row(
    report: Report, key: str, result: dict[str, Any], results: dict[str, dict[str, Any]]
) -> None:
    per_s = result["per_s"]
    b = results.get("sub_b", {}).get("per_s", math.nan)
    latency = result["latency_ms"]
    cpu = result["cpu_cores"]
    report.scenario(
        key,
        TITLES[key],
        f"{number(per_s)}/s p50 {latency['p50']:.1f} p99 {latency['p99']:.1f} ms",
        "1.00 (is b)" if key == "sub_b" else f"{per_s / b:.2f} b",
        f"{result['requests']:,} requests ({result['passes']} pass"
        f"{'es' if result['passes'] > 1 else ''}), {result['concurrency']} senders, "
        f"{result['elapsed_s']:.1f} s; statuses {result['statuses']}; cores: {cores(cpu, CORES)}; "
        f"server CPU {result['server_cpu_ms_per_request']:.2f} ms/request",
        result,
    )
    report.note_if_noisy(key, cpu)


def _single_checks(report: Report, results: dict[str, dict[str, Any]]) -> None:
    b = results.get("sub_b", {}).get("per_s", math.nan)
    for key in ("sub", "sub2"):
        if key not in results:
            continue
        result = results[key]
        ratio = result["per_s"] / b
        latency = result["latency_ms"]
        who = "" if key == "sub" else ", API_WORKERS=2"
        report.check(
            Check(
                f"{key}: POST /v1/subscriptions/s vs (b), {result['concurrency']} senders{who}",
                f">= {RATIO_TO_B_TARGET:.1f} x (b)",
                f"{number(result['per_s'])}/s (p99 {latency['p99']:.0f} ms) vs {number(b)}/s",
                ratio / RATIO_TO_B_TARGET,
                ratio,
                None if math.isnan(ratio) else ratio >= RATIO_TO_B_TARGET,
            )
        )
        wrong = {s: n for s, n in result["statuses"].items() if s != "202"}
        problems = result["database"]["problems"]
        report.check(
            Check(
                f"{key}: answers 202, one pending subscription per package",
                "all",
                "all" if not wrong and not problems else f"{wrong} {'; '.join(problems)}".strip(),
                None,
                None,
                not wrong and not problems,
            )
        )


async def _check_database(conn: asyncpg.Connection, prefix: str, expected: int) -> dict[str, Any]:
    """What the API kept of a load: one pending subscription (its start due) per package."""
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
    if row["n"] != expected or row["packages"] != expected:
        problems.append(f"{row['n']} rows ({row['packages']} packages), not {expected}")
    if row["due"] != row["n"]:
        problems.append(f"{row['n'] - row['due']} not pending with their start due")
    return {"rows": row["n"], "packages": row["packages"], "due": row["due"], "problems": problems}


# Frames on the stack that tell which part of the subscribe path a sample belongs to.
STAGES = {
    "subscribe (": "the single handler, all of it",
    "subscribe_many (": "the batch handler, all of it",
    "read_json (": "read_json (body, json.loads)",
    "parse_body (": "parse_body (pydantic validation)",
    "_create (": "_create (transaction: insert + orphans)",
    "create_subscriptions (": "create_subscriptions",
    "_insert_new (": "_insert_new (INSERT ... ON CONFLICT ... RETURNING)",
    "adopt_orphans (": "adopt_orphans (SELECT orphan deliveries)",
    "subscription_json (": "subscription_json (pydantic dump)",
    "authenticate (": "auth middleware, all of it",
    "(sqlalchemy/sql/": "SQLAlchemy Core: building, caching, compiling",
    "(sqlalchemy/engine/": "SQLAlchemy engine (execute, result rows)",
    "(sqlalchemy/pool/": "SQLAlchemy pool",
    "(asyncpg/": "asyncpg",
    "(structlog/": "structlog",
    "(prometheus_client/": "prometheus_client",
    "web_log.py": "aiohttp access log",
}
