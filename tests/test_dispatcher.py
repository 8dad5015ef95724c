"""The dispatcher against the ShipEngine simulator over real HTTP, on a real database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.subscriptions import NewSubscription, create_subscription, request_stop
from service.dispatcher.worker import Dispatcher
from tests.conftest import RunningSimulator
from tests.waiting import eventually

MakeDispatcher = Callable[..., Dispatcher]


async def subscribe(
    engine: AsyncEngine, tracking_number: str = "9405511899223197428490", **extra: Any
) -> uuid.UUID:
    async with engine.begin() as conn:
        row, _ = await create_subscription(
            conn, NewSubscription("stamps_com", tracking_number, **extra)
        )
    subscription_id: uuid.UUID = row["id"]
    return subscription_id


async def row_of(engine: AsyncEngine, subscription_id: uuid.UUID) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT state, last_error, attempts, next_attempt_at - now() AS due_in "
                    "FROM subscriptions WHERE id = :id"
                ),
                {"id": subscription_id},
            )
        ).one()
    return dict(row._mapping)


async def make_retries_due(engine: AsyncEngine) -> None:
    """Move scheduled retries to now: the test's stand-in for waiting out the backoff."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE subscriptions SET next_attempt_at = now() "
                "WHERE next_attempt_at IS NOT NULL AND claim_token IS NULL"
            )
        )


def start_calls(shipengine: RunningSimulator) -> list[dict[str, str]]:
    return [
        call.query
        for call in shipengine.simulator.calls
        if call.path == "/v1/tracking/start" and call.http_status == 204
    ]


async def test_a_start_makes_the_subscription_active(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    subscription_id = await subscribe(engine, "94 05/55+1&x", carrier_id="se-28529731")
    assert await make_dispatcher().drain() == 1

    row = await row_of(engine, subscription_id)
    assert (row["state"], row["last_error"], row["due_in"]) == ("active", None, None)
    # The values arrive intact: URL-encoded on the way, decoded by the simulator.
    assert start_calls(shipengine) == [
        {
            "carrier_code": "stamps_com",
            "tracking_number": "94 05/55+1&x",
            "carrier_id": "se-28529731",
        }
    ]


async def test_a_rejection_fails_the_subscription_keeping_shipengines_error(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    shipengine.simulator.script("BAD1", status=400, error_code="invalid_identifier")
    subscription_id = await subscribe(engine, "BAD1")
    await make_dispatcher().drain()

    row = await row_of(engine, subscription_id)
    assert row["state"] == "failed"
    error = row["last_error"]
    assert error["operation"] == "start"
    assert error["http_status"] == 400
    uuid.UUID(error["request_id"])
    assert error["errors"][0]["error_code"] == "invalid_identifier"
    assert error["errors"][0]["error_source"] == "carrier"
    assert await make_dispatcher().drain() == 0


async def test_server_errors_are_retried_until_they_pass(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    shipengine.simulator.script("FLAKY", status=500, times=2)
    subscription_id = await subscribe(engine, "FLAKY")
    dispatcher = make_dispatcher()

    await dispatcher.drain()
    first = await row_of(engine, subscription_id)
    assert first["state"] == "pending"
    assert first["last_error"]["http_status"] == 500
    assert first["attempts"] == 1
    assert first["due_in"] is not None  # a retry is scheduled

    await make_retries_due(engine)
    await dispatcher.drain()
    assert (await row_of(engine, subscription_id))["attempts"] == 2

    await make_retries_due(engine)
    await dispatcher.drain()
    final = await row_of(engine, subscription_id)
    assert (final["state"], final["last_error"], final["attempts"]) == ("active", None, 0)


async def test_a_429_pauses_all_dispatching_for_retry_after(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    shipengine.simulator.script("LIMITED", status=429, retry_after_s=40, times=1)
    limited = await subscribe(engine, "LIMITED")
    dispatcher = make_dispatcher()
    await dispatcher.drain()
    row = await row_of(engine, limited)
    assert row["state"] == "pending"
    assert row["last_error"]["errors"][0]["error_code"] == "rate_limit_exceeded"
    assert row["due_in"].total_seconds() > 35
    assert row["attempts"] == 0  # a pause is not the package's failure

    # Everyone waits, new work included: one pause for all, not one per request.
    await subscribe(engine, "OTHER")
    assert await dispatcher.drain() == 0
    assert len(start_calls(shipengine)) == 0
    registry = dispatcher.metrics.registry
    assert registry.get_sample_value("tracking_dispatch_pauses_total", {"kind": "rate_limit"}) == 1


async def test_our_bad_api_key_pauses_dispatch_and_fails_no_subscription(
    engine: AsyncEngine,
    make_dispatcher: MakeDispatcher,
    shipengine: RunningSimulator,
    api: Any,
) -> None:
    first = await subscribe(engine)
    second = await subscribe(engine, "SECOND")
    refused = make_dispatcher(shipengine_api_key="TEST_wrong", dispatch_concurrency=1)
    assert await refused.drain() == 1
    row = await row_of(engine, first)
    assert row["state"] == "pending"
    assert row["last_error"]["http_status"] == 401
    assert row["last_error"]["errors"][0]["error_code"] == "unauthorized"
    assert (await row_of(engine, second))["state"] == "pending"
    assert await refused.drain() == 0

    ready = await (await api.get("/readyz")).json()
    assert ready["status"] == "ready"
    assert ready["dispatch"]["paused"] is True
    assert ready["dispatch"]["kind"] == "account"
    assert ready["dispatch"]["reason"]["errors"][0]["error_code"] == "unauthorized"

    # The key is fixed; after the probe interval one probe succeeds and everything resumes.
    await end_pause(engine)
    fixed = make_dispatcher()
    assert await fixed.drain() == 2  # one probe, then the rest once it passed
    probe, rest = [c for c in shipengine.simulator.calls if c.http_status == 204]
    assert probe.ended_at <= rest.at  # the probe went alone
    assert {(await row_of(engine, s))["state"] for s in (first, second)} == {"active"}
    assert (await (await api.get("/readyz")).json())["dispatch"] == {"paused": False}


async def end_pause(engine: AsyncEngine) -> None:
    """Let the probe interval pass: the test's stand-in for waiting a minute."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE dispatch_control SET paused_until = now() - interval '1 second'")
        )
    await make_retries_due(engine)


async def test_timeouts_are_retried(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    shipengine.simulator.script("SLOW", status=204, delay_s=2.0)
    slow = await subscribe(engine, "SLOW")
    await make_dispatcher(shipengine_timeout_s=0.2).drain()
    row = await row_of(engine, slow)
    assert row["state"] == "pending"
    assert row["last_error"]["message"] == "timed out"


async def test_an_unreachable_shipengine_is_retried(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher
) -> None:
    subscription_id = await subscribe(engine)
    await make_dispatcher(shipengine_base_url="http://127.0.0.1:9").drain()
    row = await row_of(engine, subscription_id)
    assert row["state"] == "pending"
    assert row["last_error"]["http_status"] is None
    assert "Connect" in row["last_error"]["message"]


async def test_a_cancel_calls_stop_then_marks_stopped(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    subscription_id = await subscribe(engine)
    dispatcher = make_dispatcher()
    await dispatcher.drain()
    async with engine.begin() as conn:
        await request_stop(conn, subscription_id)
    assert await dispatcher.drain() == 1
    assert (await row_of(engine, subscription_id))["state"] == "stopped"
    assert [call.path for call in shipengine.simulator.calls] == [
        "/v1/tracking/start",
        "/v1/tracking/stop",
    ]


async def test_many_dispatchers_call_once_per_subscription(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    numbers = [f"N{n:04}" for n in range(60)]
    for number in numbers:
        await subscribe(engine, number)
    dispatchers = [make_dispatcher(dispatch_concurrency=4) for _ in range(4)]
    made = await asyncio.gather(*(dispatcher.drain() for dispatcher in dispatchers))

    assert sum(made) == 60
    assert sorted(call["tracking_number"] for call in start_calls(shipengine)) == numbers
    async with engine.connect() as conn:
        states = (await conn.execute(sa.text("SELECT DISTINCT state FROM subscriptions"))).all()
    assert [state for (state,) in states] == ["active"]


async def test_a_running_dispatcher_wakes_on_notify_not_on_its_poll(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    dispatcher = make_dispatcher(dispatch_poll_interval_s=3600)
    running = asyncio.create_task(dispatcher.run())
    try:
        # With nothing due it waits for NOTIFY, or an hour: only NOTIFY can make this quick.
        await asyncio.wait_for(dispatcher.listening.wait(), 5)
        subscription_id = await subscribe(engine)
        await eventually(lambda: state_is(engine, subscription_id, "active"))
    finally:
        dispatcher.stop()
        await asyncio.wait_for(running, 10)


async def state_is(engine: AsyncEngine, subscription_id: uuid.UUID, state: str) -> bool | None:
    return True if (await row_of(engine, subscription_id))["state"] == state else None


async def test_attempts_are_readable_and_a_failed_subscription_can_be_retried(
    engine: AsyncEngine,
    make_dispatcher: MakeDispatcher,
    shipengine: RunningSimulator,
    api: Any,
) -> None:
    shipengine.simulator.script("BAD2", status=400, error_code="invalid_identifier", times=1)
    subscription_id = await subscribe(engine, "BAD2")
    dispatcher = make_dispatcher()
    await dispatcher.drain()
    path = f"/v1/subscriptions/{subscription_id}"

    attempts = (await (await api.get(f"{path}/attempts")).json())["items"]
    assert len(attempts) == 1
    assert attempts[0]["operation"] == "start"
    assert attempts[0]["outcome"] == "rejected"
    assert attempts[0]["http_status"] == 400
    assert attempts[0]["error_code"] == "invalid_identifier"
    assert attempts[0]["latency_ms"] > 0

    retried = await api.post(f"{path}/retry")
    assert retried.status == 202
    assert (await retried.json())["state"] == "pending"
    again = await api.post(f"{path}/retry")
    assert again.status == 409
    assert (await again.json())["errors"][0]["error_code"] == "invalid_status"

    await dispatcher.drain()
    assert (await row_of(engine, subscription_id))["state"] == "active"
    outcomes = [a["outcome"] for a in (await (await api.get(f"{path}/attempts")).json())["items"]]
    assert outcomes == ["accepted", "rejected"]


async def test_retry_and_attempts_of_unknown_subscriptions_are_404(api: Any) -> None:
    missing = "/v1/subscriptions/6a1c2e64-6d5e-4bd4-9d56-3b1b1ad2a1b0"
    assert (await api.post(f"{missing}/retry")).status == 404
    assert (await api.get(f"{missing}/attempts")).status == 404


async def test_a_rearm_restarts_tracking_and_keeps_the_subscription_active(
    engine: AsyncEngine, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    subscription_id = await subscribe(engine)
    dispatcher = make_dispatcher()
    await dispatcher.drain()
    # An EX was filed: tracking is to restart (what the receiver schedules, made due now).
    async with engine.begin() as conn:
        await conn.execute(sa.text("UPDATE subscriptions SET next_attempt_at = now()"))
    shipengine.simulator.script("9405511899223197428490", status=400, times=1)
    assert await dispatcher.drain() == 1
    row = await row_of(engine, subscription_id)
    # A restart ShipEngine refuses leaves tracking as it was, the error visible.
    assert (row["state"], row["due_in"]) == ("active", None)
    assert row["last_error"]["http_status"] == 400

    async with engine.begin() as conn:
        await conn.execute(sa.text("UPDATE subscriptions SET next_attempt_at = now()"))
    assert await dispatcher.drain() == 1
    row = await row_of(engine, subscription_id)
    assert (row["state"], row["due_in"], row["last_error"]) == ("active", None, None)
    assert len(start_calls(shipengine)) == 2
