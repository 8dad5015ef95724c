"""/v1/ops and the timeline: what ops see, and the levers they pull."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.ops import SUMMARY
from service.dispatcher.worker import Dispatcher
from tests.conftest import RunningSimulator
from tests.payloads import track_body
from tests.webhook_sender import WebhookSender

Client = TestClient[web.Request, web.Application]


async def subscribe(api: Client, number: str, carrier_code: str = "ups") -> str:
    response = await api.post(
        "/v1/subscriptions", json={"carrier_code": carrier_code, "tracking_number": number}
    )
    assert response.status == 202
    subscription_id: str = (await response.json())["id"]
    return subscription_id


async def execute(engine: AsyncEngine, sql: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(sql))


async def test_the_summary_counts_everything_ops_watch(
    api: Client,
    engine: AsyncEngine,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    shipengine.simulator.script("BAD", status=400, error_code="invalid_identifier")
    for number in ("OK1", "OK2", "BAD"):
        await subscribe(api, number)
    await subscribe(api, "WAIT", carrier_code="fedex")
    await execute(engine, "UPDATE subscriptions SET next_attempt_at = now() + interval '1 hour' "
                  "WHERE tracking_number = 'WAIT'")  # fmt: skip
    await make_dispatcher().drain()
    hooks = WebhookSender(api, shipengine.simulator.keys)
    await hooks.deliver(track_body("NOBODY", "ups", 1))
    await hooks.deliver(b"{", 400)

    summary = await (await api.get("/v1/ops/summary")).json()
    assert summary["by_state"] == {"active": 2, "failed": 1, "pending": 1}
    assert summary["by_carrier"] == {"ups": 3, "fedex": 1}
    assert summary["failures_by_error_code"] == {"invalid_identifier": 1}
    assert summary["dispatch"]["backlog"] == 0
    assert summary["dispatch"]["paused"] is False
    assert summary["deliveries_last_hour"] == {"orphan": 1, "refused:invalid_json": 1}
    assert summary["as_of"]


async def test_the_timeline_tells_why_a_shipment_is_where_it_is(
    api: Client,
    engine: AsyncEngine,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    number = "9405511899223197428490"
    shipengine.simulator.script(number, status=503, times=1)
    subscription_id = await subscribe(api, number, carrier_code="stamps_com")
    dispatcher = make_dispatcher()
    await dispatcher.drain()
    # The test's stand-in for waiting out the backoff.
    await execute(engine, "UPDATE subscriptions SET next_attempt_at = now()")
    await dispatcher.drain()
    hooks = WebhookSender(api, shipengine.simulator.keys)
    await hooks.deliver(track_body(number, "stamps_com", 2))

    timeline = await (await api.get(f"/v1/subscriptions/{subscription_id}/timeline")).json()
    kinds = [entry["kind"] for entry in timeline["items"]]
    assert kinds == ["created", "start_attempt", "start_attempt", "webhook", "status_change"]
    first, second = timeline["items"][1:3]
    assert (first["detail"]["outcome"], first["detail"]["http_status"]) == ("transient", 503)
    assert second["detail"]["outcome"] == "accepted"
    assert timeline["items"][4]["detail"]["to"] == "IT"
    missing = "/v1/subscriptions/6a1c2e64-6d5e-4bd4-9d56-3b1b1ad2a1b0/timeline"
    assert (await api.get(missing)).status == 404


async def test_stuck_and_failing_views(
    api: Client,
    engine: AsyncEngine,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    shipengine.simulator.script("BAD", status=400, error_code="tracking_not_supported")
    await subscribe(api, "BAD")
    await subscribe(api, "QUIET")
    await make_dispatcher().drain()
    await subscribe(api, "LATE")
    await execute(engine, "UPDATE subscriptions SET created_at = now() - interval '2 hours'")

    stuck = await (await api.get("/v1/ops/stuck?pending_minutes=30&silent_hours=1")).json()
    assert [s["tracking_number"] for s in stuck["pending"]] == ["LATE"]
    assert [s["tracking_number"] for s in stuck["silent"]] == ["QUIET"]
    failing = await (await api.get("/v1/ops/failures")).json()
    group = failing["by_error_code"]["tracking_not_supported"]
    assert group["count"] == 1
    assert group["examples"][0]["tracking_number"] == "BAD"
    assert (await api.get("/v1/ops/stuck?limit=0")).status == 400


async def test_bulk_retry_by_filter_with_a_dry_run(
    api: Client, shipengine: RunningSimulator, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    failures = [("A", "invalid_identifier"), ("B", "invalid_identifier"), ("C", "other")]
    for number, code in failures:
        shipengine.simulator.script(number, status=400, error_code=code, times=1)
        await subscribe(api, number)
    dispatcher = make_dispatcher()
    await dispatcher.drain()

    wanted = {"error_code": "invalid_identifier"}
    dry = await api.post("/v1/ops/retry", json={**wanted, "dry_run": True})
    assert await dry.json() == {"dry_run": True, "matched": 2}
    done = await api.post("/v1/ops/retry", json=wanted)
    assert await done.json() == {"dry_run": False, "matched": 2}
    assert await dispatcher.drain() == 2
    summary = await (await api.get("/v1/ops/summary")).json()
    assert summary["by_state"] == {"active": 2, "failed": 1}


async def test_pause_and_resume_dispatching_by_hand(
    api: Client, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    paused = await api.post("/v1/ops/dispatch/pause", json={"reason": "carrier outage"})
    assert (await paused.json())["reason"] == {"message": "carrier outage", "by": "tests"}
    await subscribe(api, "HELD")
    dispatcher = make_dispatcher()
    assert await dispatcher.drain() == 0
    ready: dict[str, Any] = await (await api.get("/readyz")).json()
    assert ready["dispatch"]["kind"] == "manual"
    assert (await api.post("/v1/ops/dispatch/resume")).status == 200
    assert await dispatcher.drain() == 1


async def test_the_summary_is_served_from_memory_and_recounted_behind(api: Client) -> None:
    await subscribe(api, "FIRST")
    first = await (await api.get("/v1/ops/summary")).json()
    assert first["by_state"] == {"pending": 1}
    await subscribe(api, "SECOND")
    cache = api.app[SUMMARY]
    cache["expires"] = 0.0  # the copy is stale now
    stale = await (await api.get("/v1/ops/summary")).json()
    assert stale == first  # answered at once from the copy, while it is recounted
    await cache["recounting"]
    fresh = await (await api.get("/v1/ops/summary")).json()
    assert fresh["by_state"] == {"pending": 2}
