"""`python -m bench [SUITE ...] [--quick] [--only SCENARIO ...] [--profile] [--keep-logs]`.

Suites: dispatch, wrk (the webhook receiver, POST /v1/subscriptions and /batch under wrk, next
to baselines of one asyncpg INSERT a request, with and without the signature check), queries
(lists, events and the ops summary at 1,000,000 subscriptions), changes (the change feed:
pages, the SSE stream's lag, the outbox's cost, idle readers) and notify (notifications: to 1
and 100 endpoints against a bare client, lag, a dead consumer), floor (the receiver's work
beyond (v) alone, without HTTP: reading a delivery, filing it, against one INSERT).
Starts what it needs (PostgreSQL, simulator, API, dispatchers), runs the suites' scenarios,
prints a row per scenario and a table of targets, writes JSON under bench/results/, and stops
everything it started, also on failure, Ctrl-C, SIGTERM or when `--timeout-s` runs out.
PostgreSQL: BENCH_DATABASE_URL's server, else TEST_DATABASE_URL's (a fresh database is
created there and dropped after), else an embedded one.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

from bench import changes, dispatch, floor, notify, queries, wrkload
from bench.infra import BenchError, machine, postgres_facts, postgres_server
from bench.report import RESULTS_DIR, Report
from bench.suite import Bench

SUITES: dict[str, ModuleType] = {
    "dispatch": dispatch,
    "queries": queries,
    "changes": changes,
    "notify": notify,
    "wrk": wrkload,
    "floor": floor,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"of {', '.join(SUITES)}; default: all")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about 1 min)")
    scenarios = sorted({key for suite in SUITES.values() for key in suite.SCENARIOS})
    parser.add_argument(
        "--only", action="append", default=[], choices=scenarios, help="run only these scenarios"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the service under load (dispatch t1; wrk: the 1-process receiver under "
        "realistic and hot, subscribe's sub; queries reads) and print where its time goes",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="DISPATCH_CONCURRENCY and the baseline client's calls in flight (default 100); "
        "the wrk suite's connections (default 64)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where JSON goes")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="stop everything after")
    args = parser.parse_args(argv)
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    chosen = args.suites or list(SUITES)
    try:
        return asyncio.run(_main(args, chosen))
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


async def _main(args: argparse.Namespace, chosen: list[str]) -> int:
    task = asyncio.current_task()
    assert task is not None
    terminated: list[int] = []

    def terminate() -> None:
        terminated.append(signal.SIGTERM)
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    log_dir = Path(tempfile.mkdtemp(prefix="tracking-bench-logs-"))
    keep_logs = args.keep_logs or args.profile
    began = time.monotonic()
    try:
        async with asyncio.timeout(args.timeout_s):
            return await _run_suites(args, chosen, log_dir)
    except asyncio.CancelledError:
        if not terminated:
            raise  # Ctrl-C: asyncio.run turns it into KeyboardInterrupt
        print("bench: terminated; everything started was stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    except TimeoutError:
        print(f"bench: stopped after --timeout-s {args.timeout_s:.0f} s", file=sys.stderr)
        keep_logs = True
        return 1
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        keep_logs = True
        return 1
    finally:
        print(f"bench: {time.monotonic() - began:.0f} s", file=sys.stderr)
        if keep_logs:
            print(f"bench: logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


async def _run_suites(args: argparse.Namespace, chosen: list[str], log_dir: Path) -> int:
    async with postgres_server() as postgres:
        print(f"bench: PostgreSQL from {postgres.source}; logs in {log_dir}", flush=True)
        bench = Bench(
            postgres=postgres,
            log_dir=log_dir,
            quick=args.quick,
            only=frozenset(args.only),
            profile=args.profile,
            concurrency=args.concurrency,
        )
        async with postgres.database() as url:
            facts = {**machine(), "postgresql": await postgres_facts(url)}
        facts["postgresql"]["source"] = postgres.source
        for name in chosen:
            suite: ModuleType = SUITES[name]
            run: Callable[[Bench, Report], Awaitable[None]] = suite.run
            report = Report(
                name,
                facts,
                {"quick": args.quick, "only": sorted(args.only), "concurrency": args.concurrency},
            )
            print(f"\n== {name}{' (quick)' if args.quick else ''} ==", flush=True)
            complete = False
            try:
                await run(bench, report)
                complete = True
            finally:
                if report.scenarios:
                    report.print_summary()
                    written = report.write(args.results, complete=complete)
                    print(f"bench: results in {written}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
