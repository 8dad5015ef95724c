"""The ingest suite: signed `track` deliveries a second through the whole webhook receiver.

One database, one load generator process (`bench/loadgen.py`: ShipEngine's signing key, its
JWKS, 64 senders over keep-alive connections) and three servers, each its own process:

    (a)   a bare aiohttp handler that reads the body and answers 204 (`bench/baseline_server.py`)
    (b)   an aiohttp handler doing one asyncpg INSERT of the body (pool of 10), then 204
    full  `python -m service api`: POST /v1/webhooks/shipengine verifies the signature (keys
          from the load generator's /jwks), stores the raw delivery, files events, updates status

Two loads, each sent to (a), (b) and full in that order, the same signed bytes to all three
(and `refusals`, unsigned junk sent by the harness to (a) and full: refusals a second):

    realistic  10,000 active subscriptions; each delivery a new state of its package (step k
               carries k events, newest first), 10% exact repeats of an earlier one
    hot        one package, one delivery, over and over from all 64 senders (a retry burst):
               after the first, every one must be recognised as a duplicate, cheaply

Afterwards the database is checked (each realistic delivery stored once, filed; repeats kept as
`duplicate`) and the API's peak RSS (`VmHWM`) is read. `--profile` samples the API with py-spy
during the realistic load and prints where its time goes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

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
    memory_mb,
    start_api,
    start_load_generator,
    with_children,
)
from bench.loadgen import WEBHOOK_PATH
from bench.report import Check, Report, cores, number
from bench.sending import Request, send
from bench.suite import Bench
from service.db.engine import asyncpg_dsn

SCENARIOS = ("realistic", "hot", "refusals")

SERVERS = ("a", "b", "full", "full2")
RECEIVERS = ("full", "full2")
SERVER_TITLES = {
    "a": "(a) bare aiohttp, 204",
    "b": "(b) aiohttp + 1 asyncpg INSERT",
    "full": "full receiver, 1 process",
    "full2": "full receiver, API_WORKERS=2",
}
EXPECTED_STATUS = {"a": "204", "b": "204", "full": "200", "full2": "200"}

# Each receiver gets packages of its own: what one stored must not make the other's duplicates.
# The baselines get the 1-process receiver's bytes.
PACKAGE_PREFIX = {"full": "1ZBENCH", "full2": "1ZBENCW"}
HOT_PACKAGE = {"full": "1ZHOT00000001", "full2": "1ZHOT00000002"}
WARMUP_PREFIX = "1ZWARM"

RATIO_TO_B_TARGET = 1.0
P99_TARGET_MS = 50.0
HOT_SHARE_OF_REALISTIC = 0.5  # "not collapsing": at least half the realistic rate
RSS_TARGET_MB = 150.0


@dataclasses.dataclass(frozen=True)
class Plan:
    concurrency: int = 64
    packages: int = 10_000
    realistic_deliveries: int = 12_000
    repeat_share: float = 0.10
    hot_requests: int = 4_000
    refusal_requests: int = 6_000
    warmup_requests: int = 256
    baseline_pool_size: int = 10
    profile_s: float = 10.0
    # A baseline gets the list again until this long has passed: a second is too short to
    # measure a rate. The full receiver gets each list once (the database is checked after).
    baseline_min_s: float = 5.0


FULL = Plan()
QUICK = dataclasses.replace(
    FULL,
    realistic_deliveries=5_000,
    hot_requests=1_500,
    refusal_requests=2_000,
    warmup_requests=128,
    profile_s=4.0,
    baseline_min_s=2.0,
)


@dataclasses.dataclass(frozen=True)
class Server:
    key: str
    url: str
    process: ServiceProcess


async def run(bench: Bench, report: Report) -> None:
    plan = QUICK if bench.quick else FULL
    if bench.concurrency is not None:
        plan = dataclasses.replace(plan, concurrency=bench.concurrency)
    loads = [load for load in SCENARIOS if bench.wants(load)]
    if not loads:
        return
    report.options["plan"] = dataclasses.asdict(plan)
    async with (
        bench.postgres.database() as database_url,
        bench.processes("ingest") as procs,
    ):
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            for key in RECEIVERS:
                await subscribe_packages(conn, plan.packages, PACKAGE_PREFIX[key], HOT_PACKAGE[key])
            generator = await start_load_generator(procs, "loadgen")
            servers = await _start_servers(procs, database_url, generator.url, plan)
            scrape = await api_headers(database_url)  # /metrics needs the `metrics` scope
            rates: dict[str, float] = {}
            for load in loads:
                if load == "refusals":
                    await _refusals(plan, report, conn, servers)
                    continue
                await _measure(
                    bench, plan, report, procs, conn, generator, servers, load, rates, scrape
                )
            _rss_check(report, servers)
            report.options["loadgen_peak_rss_mb"] = memory_mb(generator.process.pid, "VmHWM")
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


async def _start_servers(
    procs: Processes, database_url: str, generator_url: str, plan: Plan
) -> dict[str, Server]:
    servers = {}
    for key, mode in (("a", "bare"), ("b", "insert")):
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        argv = [
            sys.executable, "-m", "bench.baseline_server", mode, "--port", str(port),
            "--database-url", database_url, "--pool-size", str(plan.baseline_pool_size),
        ]  # fmt: skip
        process = await procs.start(f"baseline-{key}", argv, {}, answers(f"{url}/healthz"))
        servers[key] = Server(key, url, process)
    env = {
        "DATABASE_URL": database_url,
        "SHIPENGINE_BASE_URL": generator_url,
        "SHIPENGINE_JWKS_URL": f"{generator_url}/jwks",
    }
    for key, workers in (("full", "1"), ("full2", "2")):
        url = await start_api(procs, {**env, "API_WORKERS": workers}, name=f"api-{key}")
        api = procs.named(f"api-{key}")
        servers[key] = Server(key, url, api)
    return servers


async def _measure(
    bench: Bench,
    plan: Plan,
    report: Report,
    procs: Processes,
    conn: asyncpg.Connection,
    generator: LoadGenerator,
    servers: dict[str, Server],
    load: str,
    rates: dict[str, float],
    scrape: dict[str, str],
) -> None:
    # Signed now: every signature must still be fresh when the receivers get them.
    facts = {key: await _prepare(generator, plan, load, key) for key in RECEIVERS}
    results: dict[str, dict[str, Any]] = {}
    for key in SERVERS:
        server = servers[key]
        warm = {
            "url": server.url,
            "concurrency": plan.concurrency,
            "requests": plan.warmup_requests,
            "package": f"{WARMUP_PREFIX}-{load}-{key}",
        }
        await generator.call("/warmup", warm)
        groups = {
            "server": with_children(server.process.pid),
            "loadgen": [generator.process.pid],
            "postgres": await backend_pids(conn),
            "bench": [os.getpid()],
        }
        before = cpu_snapshot(groups)
        groups_before = await _group_commits(server.url, scrape) if key in RECEIVERS else None
        profiler, profile_to = None, None
        if bench.profile and key == "full" and load == "realistic":
            profile_to = bench.log_dir / f"ingest-{load}-api.pyspy.txt"
            profiler = await profiling.record(procs, server.process, plan.profile_s, profile_to)
        run_spec = {
            "load": _list_name(load, key),
            "url": server.url,
            "concurrency": plan.concurrency,
            "min_s": 0.0 if key in RECEIVERS else plan.baseline_min_s,
        }
        result = await generator.call("/run", run_spec)
        result["cpu_cores"] = cpu_cores(before, cpu_snapshot(groups))
        result["server_cpu_ms_per_request"] = (
            1000.0
            * result["cpu_cores"].get("server", math.nan)
            * result["cpu_cores"].get("interval_s", math.nan)
            / result["requests"]
        )
        if groups_before is not None:
            items, commits = (
                after - before
                for after, before in zip(
                    await _group_commits(server.url, scrape), groups_before, strict=True
                )
            )
            result["mean_group_commit"] = items / commits if commits else math.nan
        if profiler is not None and profile_to is not None:
            await profiling.wait(profiler, timeout_s=plan.profile_s + 30)
            result["profile"] = profiling.report(
                profile_to, plan.profile_s, "the API during the realistic load", STAGES, top=20
            )
        results[key] = result
        _row(report, load, key, result, results)
    for key in RECEIVERS:
        database = await _check_database(conn, load, key, facts[key])
        rates[f"{load}/{key}"] = results[key]["per_s"]
        report.scenarios[f"{load}/{key}"]["database"] = database
        report.scenarios[f"{load}/{key}"]["load"] = facts[key]
        _checks(report, load, key, results, database, rates)


# Junk as the issue measured it: no signature headers, a 60 KB body and 64 KB of headers.
UNSIGNED_BODY = b'{"data": "' + b"x" * (60 * 1024 - 12) + b'"}'
UNSIGNED_HEADERS = {
    "Content-Type": "application/json",
    **{f"X-Filler-{n:02d}": "f" * 4_000 for n in range(16)},
}


async def _refusals(
    plan: Plan, report: Report, conn: asyncpg.Connection, servers: dict[str, Server]
) -> None:
    """Unsigned posts a second: (a) reads each body and answers 204, the receiver answers 404
    without reading it (aiohttp drains it) and stores nothing. Sent from the harness itself
    (`bench/sending.py`, the load generator's sender), the same bytes to both."""
    requests = [Request(WEBHOOK_PATH, UNSIGNED_BODY, UNSIGNED_HEADERS)] * plan.refusal_requests
    results: dict[str, dict[str, Any]] = {}
    for key in ("a", "full"):
        # Both get the list again until baseline_min_s: nothing is stored to check after.
        result = await send(servers[key].url, requests, plan.concurrency, min_s=plan.baseline_min_s)
        results[key] = result
        latency = result["latency_ms"]
        report.scenario(
            f"refusals/{key}",
            SERVER_TITLES[key] if key == "a" else "full receiver, unsigned posts (404)",
            f"{number(result['per_s'])}/s p50 {latency['p50']:.1f} p99 {latency['p99']:.1f} ms",
            "1.00 (is a)" if key == "a" else f"{result['per_s'] / results['a']['per_s']:.2f} a",
            f"{result['requests']:,} unsigned posts of {len(UNSIGNED_BODY) // 1024} KB, "
            f"{result['concurrency']} senders, {result['elapsed_s']:.1f} s; "
            f"statuses {result['statuses']}",
            result,
        )
    stored = await conn.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE refusal = 'missing_headers'"
    )
    statuses = results["full"]["statuses"]
    ok = statuses == {"404": results["full"]["requests"]} and stored == 0
    report.check(
        Check(
            "refusals: unsigned posts answered 404, none stored",
            "all",
            "all" if ok else f"statuses {statuses}, {stored} stored",
            None,
            results["full"]["per_s"] / results["a"]["per_s"],
            ok,
        )
    )


async def _group_commits(url: str, headers: dict[str, str]) -> tuple[float, float]:
    """Deliveries and commits so far of the receiver's group commit, from its /metrics (one
    process's, with API_WORKERS=2)."""
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{url}/metrics") as response,
    ):
        response.raise_for_status()
        exposition = await response.text()
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(exposition):
        if family.name == "tracking_group_commit_size":
            for sample in family.samples:
                kind = sample.name.removeprefix("tracking_group_commit_size_")
                if sample.labels.get("path") == "webhook" and kind in totals:
                    totals[kind] += sample.value
    return totals["sum"], totals["count"]


def _list_name(load: str, key: str) -> str:
    """The prepared list a server gets: the baselines get the 1-process receiver's bytes."""
    return f"{load}/full2" if key == "full2" else load


async def _prepare(generator: LoadGenerator, plan: Plan, load: str, key: str) -> dict[str, Any]:
    if load == "realistic":
        spec: dict[str, Any] = {
            "load": _list_name(load, key),
            "kind": "realistic",
            "prefix": PACKAGE_PREFIX[key],
            "packages": plan.packages,
            "deliveries": plan.realistic_deliveries,
            "repeat_share": plan.repeat_share,
        }
    else:
        spec = {
            "load": _list_name(load, key),
            "kind": "hot",
            "package": HOT_PACKAGE[key],
            "requests": plan.hot_requests,
        }
    facts = await generator.call("/prepare", spec)
    print(
        f"{spec['load']}: {facts['requests']:,} requests prepared ({facts['unique']:,} distinct)"
        + (f", signed in {facts['sign_s']:.1f} s" if "sign_s" in facts else ""),
        flush=True,
    )
    return facts


def _row(
    report: Report,
    load: str,
    key: str,
    result: dict[str, Any],
    results: dict[str, dict[str, Any]],
) -> None:
    per_s = result["per_s"]
    if key == "a":
        vs = "1.00 (is a)"
    elif key == "b":
        vs = f"{per_s / results['a']['per_s']:.2f} of a"
    else:
        vs = f"{per_s / results['a']['per_s']:.2f} a, {per_s / results['b']['per_s']:.2f} b"
    latency = result["latency_ms"]
    cpu = result["cpu_cores"]
    used = cores(cpu, ("server", "loadgen", "postgres", "others"))
    report.scenario(
        f"{load}/{key}",
        SERVER_TITLES[key],
        f"{number(per_s)}/s p50 {latency['p50']:.1f} p99 {latency['p99']:.1f} ms",
        vs,
        f"{result['requests']:,} requests ({result['passes']} pass"
        f"{'es' if result['passes'] > 1 else ''}), {result['concurrency']} senders, "
        f"{result['elapsed_s']:.1f} s; statuses {result['statuses']}; cores: {used}; "
        f"server CPU {result['server_cpu_ms_per_request']:.2f} ms/request"
        + (
            f", mean group {result['mean_group_commit']:.1f}"
            if "mean_group_commit" in result
            else ""
        ),
        result,
    )
    report.note_if_noisy(f"{load}/{key}", cpu)


async def _check_database(
    conn: asyncpg.Connection, load: str, key: str, facts: dict[str, Any]
) -> dict[str, Any]:
    """What a receiver kept of this load's deliveries, and whether that is right."""
    pattern = f"{PACKAGE_PREFIX[key]}%" if load == "realistic" else HOT_PACKAGE[key]
    rows = await conn.fetch(
        """
        SELECT outcome, count(*) AS n, count(DISTINCT body_sha256) AS bodies
        FROM webhook_deliveries WHERE tracking_number LIKE $1 GROUP BY outcome
        """,
        pattern,
    )
    outcomes = {row["outcome"]: {"rows": row["n"], "bodies": row["bodies"]} for row in rows}
    filed = outcomes.get("filed", {"rows": 0, "bodies": 0})
    duplicates = outcomes.get("duplicate", {"rows": 0, "bodies": 0})
    problems = []
    if filed["rows"] != facts["unique"] or filed["bodies"] != facts["unique"]:
        problems.append(f"{filed['rows']} filed ({filed['bodies']} bodies), not {facts['unique']}")
    if duplicates["rows"] != facts["repeats"]:
        problems.append(f"{duplicates['rows']} duplicates, not {facts['repeats']}")
    others = {k: v["rows"] for k, v in outcomes.items() if k not in ("filed", "duplicate")}
    if others:
        problems.append(f"unexpected outcomes {others}")
    checked: dict[str, Any] = {"outcomes": outcomes}
    if load == "realistic":
        touched = await conn.fetchval(
            "SELECT count(*) FROM subscriptions WHERE tracking_number LIKE $1 "
            "AND status_code IS NOT NULL",
            pattern,
        )
        events = await conn.fetchval(
            "SELECT count(*) FROM tracking_events AS e JOIN subscriptions AS s "
            "ON s.id = e.subscription_id WHERE s.tracking_number LIKE $1",
            pattern,
        )
        checked |= {"subscriptions_with_status": touched, "events": events}
        if touched != facts["packages_touched"]:
            problems.append(f"{touched} subscriptions updated, not {facts['packages_touched']}")
        if events != facts["events_expected"]:
            problems.append(f"{events} events stored, not {facts['events_expected']}")
    baseline_rows = await conn.fetchval("SELECT count(*) FROM ingest_baseline")
    checked |= {"baseline_b_rows_so_far": baseline_rows, "problems": problems}
    return checked


def _checks(
    report: Report,
    load: str,
    key: str,
    results: dict[str, dict[str, Any]],
    database: dict[str, Any],
    rates: dict[str, float],
) -> None:
    full, b = results[key], results["b"]
    who = "full" if key == "full" else "full, API_WORKERS=2"
    ratio_b = full["per_s"] / b["per_s"]
    p99 = full["latency_ms"]["p99"]
    if load == "realistic":
        report.check(
            Check(
                f"realistic: deliveries/s, {who} vs (b)",
                f">= {RATIO_TO_B_TARGET:.1f} x (b)",
                f"{number(full['per_s'])}/s vs {number(b['per_s'])}/s",
                ratio_b / RATIO_TO_B_TARGET,
                ratio_b,
                ratio_b >= RATIO_TO_B_TARGET,
            )
        )
    else:
        realistic = rates.get(f"realistic/{key}", math.nan)
        floor = HOT_SHARE_OF_REALISTIC * realistic
        report.check(
            Check(
                f"hot: deliveries/s, {who}, not collapsing (vs b)",
                f">= {HOT_SHARE_OF_REALISTIC} x realistic"
                + (f" ({number(floor)}/s)" if not math.isnan(floor) else ""),
                f"{number(full['per_s'])}/s",
                full["per_s"] / floor if floor else math.nan,
                ratio_b,
                None if math.isnan(floor) else full["per_s"] >= floor,
            )
        )
    report.check(
        Check(
            f"{load}: p99 latency, {who}, {full['concurrency']} senders",
            f"< {P99_TARGET_MS:.0f} ms",
            f"{p99:.1f} ms (p50 {full['latency_ms']['p50']:.1f})",
            p99 / P99_TARGET_MS,
            p99 / b["latency_ms"]["p99"],
            p99 < P99_TARGET_MS,
        )
    )
    wrong = {
        server: {s: n for s, n in result["statuses"].items() if s != EXPECTED_STATUS[server]}
        for server, result in results.items()
        if server in (key, "a", "b")
    }
    wrong = {server: statuses for server, statuses in wrong.items() if statuses}
    problems = database["problems"]
    report.check(
        Check(
            f"{load}: {who} answers 200 (baselines 204); stored once, repeats `duplicate`",
            "all",
            "all" if not wrong and not problems else f"{wrong} {'; '.join(problems)}".strip(),
            None,
            None,
            not wrong and not problems,
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
            "API peak RSS (VmHWM) over the ingest loads",
            f"< {RSS_TARGET_MB:.0f} MB",
            f"{api:.0f} MB (a {peaks['a']:.0f}, b {peaks['b']:.0f}, "
            f"each of 2 workers {peaks['full2']:.0f})",
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
    "store_and_file (": "store_and_file (all SQL of a batch)",
    "_insert_originals (": "_insert_originals (INSERT ... ON CONFLICT DO NOTHING)",
    "_lock_live (": "_lock_live (SELECT ... FOR UPDATE)",
    "_insert_events (": "_insert_events",
    "_update_statuses (": "_update_statuses",
    "_insert_copies (": "_insert_copies",
    "file_update (": "file_update (the status fold)",
    "(sqlalchemy/sql/": "SQLAlchemy Core: building, caching, compiling",
    "_async_ping (": "pool pre-ping",
    "(structlog/": "structlog",
    "(prometheus_client/": "prometheus_client",
    "web_log.py": "aiohttp access log",
    "EpollSelector.select (": "epoll wait",
}
