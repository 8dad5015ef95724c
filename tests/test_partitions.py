"""Time partitions: created ahead, rows routed to them, dropped whole past retention, and a
DEFAULT partition that catches what has no partition yet and gives it up when one comes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.api import app as app_module
from service.api.app import create_app
from service.db import partitions
from service.db.deliveries import Incoming, store_and_file
from service.db.driver import driver_connection
from service.db.partitions import DELIVERIES, EVENTS, Maintenance
from service.db.subscriptions import NewSubscription, create_subscription
from service.domain.tracking import RearmPolicy
from service.settings import Settings
from tests.payloads import track_body

REARM = RearmPolicy(max_rearms=0, delay_s=60)
NOW = datetime.now(UTC)


async def maintain(
    engine: AsyncEngine, now: datetime, *, deliveries_days: int = 35, events_days: int = 400
) -> Maintenance:
    async with engine.begin() as conn:
        return await partitions.maintain(
            conn, delivery_retention_days=deliveries_days, event_retention_days=events_days, now=now
        )


async def partitions_of(engine: AsyncEngine, table: str) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = CAST(:table AS regclass)"
            ),
            {"table": table},
        )
        return {row.relname for row in rows}


async def where_rows_are(engine: AsyncEngine, table: str) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.text(f"SELECT tableoid::regclass::text AS p, count(*) AS n FROM {table} GROUP BY 1")
        )
        return {row.p: row.n for row in rows}


async def subscribe_and_deliver(
    engine: AsyncEngine, number: str, created_at: datetime | None = None
) -> None:
    """A subscription (created at `created_at`) and one delivery with two events for it."""
    async with engine.begin() as conn:
        row, _ = await create_subscription(conn, NewSubscription("ups", number))
        if created_at is not None:
            await conn.execute(
                sa.text("UPDATE subscriptions SET created_at = :at WHERE id = :id"),
                {"at": created_at, "id": row["id"]},
            )
        await deliver(conn, number)


async def deliver(conn: AsyncConnection, number: str) -> None:
    payload = track_body(number, "ups", 2)
    incoming = Incoming.read(
        payload, json.dumps(payload).encode(), headers={}, verification="verified"
    )
    await store_and_file(await driver_connection(conn), [incoming], REARM)


async def test_the_migration_leaves_this_period_and_two_ahead_and_maintenance_keeps_it_so(
    engine: AsyncEngine,
) -> None:
    week, month = DELIVERIES.start_of(NOW), EVENTS.start_of(NOW)
    expected_weeks = {DELIVERIES.name(week + timedelta(days=7 * k)) for k in range(3)}
    assert expected_weeks <= await partitions_of(engine, "webhook_deliveries")
    assert EVENTS.name(month) in await partitions_of(engine, "tracking_events")

    later = NOW + timedelta(days=70)
    async with engine.begin() as conn:
        planned = await partitions.maintain(
            conn, delivery_retention_days=35, event_retention_days=400, now=later, dry_run=True
        )
    assert DELIVERIES.name(DELIVERIES.start_of(later)) in planned.created
    assert DELIVERIES.name(week) in planned.dropped  # ended more than 35 days before `later`
    assert DELIVERIES.name(DELIVERIES.start_of(later)) not in await partitions_of(
        engine, "webhook_deliveries"
    )

    done = await maintain(engine, later)
    assert done.created == planned.created
    assert done.dropped == planned.dropped
    created = await partitions_of(engine, "webhook_deliveries")
    assert DELIVERIES.name(DELIVERIES.start_of(later) + timedelta(days=14)) in created
    assert DELIVERIES.name(week) not in created
    assert (await maintain(engine, later)).created == []  # nothing left to do


async def test_deliveries_are_dropped_before_the_events_they_made(engine: AsyncEngine) -> None:
    await subscribe_and_deliver(engine, "1ZKEPT")
    this_week = DELIVERIES.name(DELIVERIES.start_of(NOW))
    this_month = EVENTS.name(EVENTS.start_of(NOW))
    assert await where_rows_are(engine, "webhook_deliveries") == {this_week: 1}
    assert await where_rows_are(engine, "tracking_events") == {this_month: 2}

    await maintain(engine, NOW + timedelta(days=60))
    assert await where_rows_are(engine, "webhook_deliveries") == {}
    assert await where_rows_are(engine, "tracking_events") == {this_month: 2}

    await maintain(engine, NOW + timedelta(days=500))
    assert await where_rows_are(engine, "tracking_events") == {}


async def test_the_default_partition_holds_rows_until_their_partition_comes(
    engine: AsyncEngine,
) -> None:
    future = NOW + timedelta(days=400)  # beyond what the migration created
    await subscribe_and_deliver(engine, "1ZFUTURE", created_at=future)
    assert await where_rows_are(engine, "tracking_events") == {"tracking_events_default": 2}

    done = await maintain(engine, future)
    home = EVENTS.name(EVENTS.start_of(future))
    assert done.moved == {home: 2}
    assert await where_rows_are(engine, "tracking_events") == {home: 2}
    assert "tracking_events_default" in await partitions_of(engine, "tracking_events")


async def test_rows_past_retention_are_deleted_from_the_default_partition(
    engine: AsyncEngine,
) -> None:
    await subscribe_and_deliver(engine, "1ZANCIENT", created_at=NOW - timedelta(days=3000))
    assert await where_rows_are(engine, "tracking_events") == {"tracking_events_default": 2}
    done = await maintain(engine, NOW)
    assert done.purged == {"tracking_events_default": 2}
    assert await where_rows_are(engine, "tracking_events") == {}


async def test_a_copy_is_recognised_within_the_week(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await create_subscription(conn, NewSubscription("ups", "1ZTWICE"))
        await deliver(conn, "1ZTWICE")
        await deliver(conn, "1ZTWICE")
        outcomes = await conn.scalars(sa.text("SELECT outcome FROM webhook_deliveries ORDER BY id"))
        assert list(outcomes) == ["filed", "duplicate"]


async def test_a_copy_is_filed_against_this_weeks_original_when_last_week_had_one_too(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        await create_subscription(conn, NewSubscription("ups", "1ZWEEKS"))
        await deliver(conn, "1ZWEEKS")
        await conn.execute(  # as if it had come last week
            sa.text("UPDATE webhook_deliveries SET received_week = received_week - 7")
        )
    async with engine.begin() as conn:
        await deliver(conn, "1ZWEEKS")  # filed again: dedup is within the week
        await deliver(conn, "1ZWEEKS")
        outcomes = await conn.scalars(sa.text("SELECT outcome FROM webhook_deliveries ORDER BY id"))
        assert list(outcomes) == ["filed", "filed", "duplicate"]


async def test_one_process_at_a_time_maintains(engine: AsyncEngine) -> None:
    async with engine.begin() as holder:
        await holder.execute(sa.text(f"SELECT pg_advisory_xact_lock({partitions.ADVISORY_KEY})"))
        assert (await maintain(engine, NOW + timedelta(days=70))).skipped
    assert not (await maintain(engine, NOW + timedelta(days=70))).skipped


async def test_the_api_creates_missing_partitions_when_it_starts(
    engine: AsyncEngine, settings: Settings
) -> None:
    ahead = DELIVERIES.name(DELIVERIES.start_of(NOW) + timedelta(days=14))
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"DROP TABLE {ahead}"))
    async with TestClient(TestServer(create_app(settings))):
        assert ahead in await partitions_of(engine, "webhook_deliveries")


async def test_the_api_starts_while_maintenance_waits_and_defers_it(
    engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "PARTITION_MAINTENANCE_START_S", 0.5)
    ahead = DELIVERIES.name(DELIVERIES.start_of(NOW) + timedelta(days=14))
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"DROP TABLE {ahead}"))
    async with engine.begin() as holder:
        # A long query on the table: creating its partition waits (up to its 5 s lock_timeout).
        await holder.execute(sa.text("LOCK TABLE webhook_deliveries IN ACCESS SHARE MODE"))
        with structlog.testing.capture_logs() as logs:
            async with TestClient(TestServer(create_app(settings))) as client:
                assert (await client.get("/healthz")).status == 200
        assert "partitions.maintenance_deferred" in [entry["event"] for entry in logs]
    assert ahead not in await partitions_of(engine, "webhook_deliveries")


async def test_the_cli_says_what_it_would_do_and_then_does_it(
    engine: AsyncEngine, settings: Settings
) -> None:
    ahead = EVENTS.name(EVENTS.after(EVENTS.after(EVENTS.start_of(NOW))))  # the furthest
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"DROP TABLE {ahead}"))

    said = await asyncio.to_thread(cli, settings, "--dry-run")
    assert said["dry_run"] is True
    assert said["created"] == [ahead]
    assert ahead not in await partitions_of(engine, "tracking_events")
    assert (await asyncio.to_thread(cli, settings))["created"] == [ahead]
    assert ahead in await partitions_of(engine, "tracking_events")


def cli(settings: Settings, *args: str) -> dict[str, Any]:
    env = {"DATABASE_URL": settings.database_url, "SHIPENGINE_API_KEY": "TEST_cli"}
    run = subprocess.run(
        [sys.executable, "-m", "service", "partitions", "maintain", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    said: dict[str, Any] = json.loads(run.stdout)
    return said
