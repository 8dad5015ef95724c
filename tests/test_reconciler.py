"""The reconciler on the simulator: polls the silent, files like a webhook, yields to starts."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.dispatch import current_pause
from service.db.errors import is_unavailable
from service.db.subscriptions import NewSubscription, create_subscription
from service.dispatcher.reconciler import Reconciler
from service.dispatcher.runtime import build_reconciler
from service.dispatcher.worker import Dispatcher
from service.settings import Settings
from tests.conftest import RunningSimulator
from tests.test_database_restart import terminate_backends

ALWAYS = {None: 0.0, "AC": 0.0, "IT": 0.0, "EX": 0.0, "AT": 0.0, "UN": 0.0, "NY": 0.0}


@pytest.fixture
def make_reconciler(
    live_settings: Settings, engine: AsyncEngine, shipengine_http: aiohttp.ClientSession
) -> Callable[..., Reconciler]:
    def make(silence_s: dict[str | None, float] = ALWAYS, **overrides: Any) -> Reconciler:
        settings = dataclasses.replace(live_settings, **overrides)
        return build_reconciler(settings, engine, shipengine_http, silence_s=silence_s)

    return make


async def execute(engine: AsyncEngine, sql: str) -> list[tuple[Any, ...]]:
    async with engine.begin() as conn:
        result = await conn.execute(sa.text(sql))
        return [tuple(row) for row in result] if result.returns_rows else []


@pytest.fixture
async def tracked(
    engine: AsyncEngine,
    make_dispatcher: Callable[..., Dispatcher],
    shipengine: RunningSimulator,
) -> uuid.UUID:
    """A subscription ShipEngine tracks, whose webhooks all went missing (none registered)."""
    async with engine.begin() as conn:
        row, _ = await create_subscription(conn, NewSubscription("stamps_com", "LOST1"))
    await make_dispatcher().drain()
    await shipengine.simulator.wait_idle()
    subscription_id: uuid.UUID = row["id"]
    return subscription_id


async def test_a_silent_package_is_polled_and_filed_like_a_webhook(
    tracked: uuid.UUID, engine: AsyncEngine, make_reconciler: Callable[..., Reconciler]
) -> None:
    reconciler = make_reconciler()
    assert await reconciler.run_once() == 1
    ((status, events),) = await execute(
        engine,
        "SELECT status_code, (SELECT count(*) FROM tracking_events) FROM subscriptions",
    )
    assert status == "DE"
    assert events >= 4
    assert await execute(
        engine, "SELECT source, outcome, verification FROM webhook_deliveries"
    ) == [("poll", "filed", "not_applicable")]
    # Nothing new the next time: kept as a duplicate, nothing changes. (DE is never polled,
    # so make it look unfinished to be asked again.)
    await execute(engine, "UPDATE subscriptions SET status_code = 'IT', last_polled_at = NULL")
    assert await reconciler.run_once() == 1
    outcomes = await execute(engine, "SELECT outcome FROM webhook_deliveries ORDER BY id")
    assert outcomes == [("filed",), ("duplicate",)]


async def test_packages_heard_from_recently_are_left_alone(
    tracked: uuid.UUID, engine: AsyncEngine, make_reconciler: Callable[..., Reconciler]
) -> None:
    await execute(engine, "UPDATE subscriptions SET status_code = 'IT', last_heard_at = now()")
    hours = {status: 3600.0 for status in ALWAYS}
    assert await make_reconciler(silence_s=hours).run_once() == 0
    await execute(engine, "UPDATE subscriptions SET last_heard_at = now() - interval '2 hours'")
    assert await make_reconciler(silence_s=hours).run_once() == 1


async def test_polls_yield_to_due_starts_and_to_the_budget(
    tracked: uuid.UUID, engine: AsyncEngine, make_reconciler: Callable[..., Reconciler]
) -> None:
    async with engine.begin() as conn:
        await create_subscription(conn, NewSubscription("ups", "WAITING"))
    assert await make_reconciler().run_once() == 0  # a start is due: it goes first
    await execute(engine, "DELETE FROM subscriptions WHERE tracking_number = 'WAITING'")

    await execute(engine, "UPDATE dispatch_control SET tokens = 0, refilled_at = clock_timestamp()")
    assert await make_reconciler(shipengine_rate_limit_per_minute=1).run_once() == 0
    assert await make_reconciler().run_once() == 1


async def test_delivered_packages_become_done_and_cost_nothing_more(
    tracked: uuid.UUID, engine: AsyncEngine, make_reconciler: Callable[..., Reconciler]
) -> None:
    await make_reconciler().run_once()  # learns DE
    await execute(engine, "UPDATE subscriptions SET last_heard_at = now() - interval '4 days'")
    await make_reconciler().run_once()
    ((done,),) = await execute(engine, "SELECT done_at IS NOT NULL FROM subscriptions")
    assert done
    await execute(engine, "UPDATE subscriptions SET status_code = 'IT'")
    assert await make_reconciler().run_once() == 0


async def test_a_429_on_a_poll_pauses_everyone(
    tracked: uuid.UUID,
    engine: AsyncEngine,
    make_reconciler: Callable[..., Reconciler],
    shipengine: RunningSimulator,
) -> None:
    shipengine.simulator.script("LOST1", operation="get", status=429, retry_after_s=30)
    assert await make_reconciler().run_once() == 1
    async with engine.connect() as conn:
        pause = await current_pause(conn)
    assert pause is not None
    assert pause.kind == "rate_limit"
    assert await execute(engine, "SELECT count(*) FROM webhook_deliveries") == [(0,)]


async def test_the_reconciler_recovers_after_the_database_drops_its_connections(
    tracked: uuid.UUID, database_url: str, make_reconciler: Callable[..., Reconciler]
) -> None:
    reconciler = make_reconciler()  # on the pool that `tracked` used
    assert await terminate_backends(database_url) > 0
    with pytest.raises(sa_exc.DBAPIError) as failed:
        await reconciler.run_once()
    assert is_unavailable(failed.value)
    assert await reconciler.run_once() == 1
