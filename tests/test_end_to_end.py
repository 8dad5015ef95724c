"""The whole loop on real parts: subscribe -> start call -> signed webhooks -> history -> stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.api.app import create_app
from service.dispatcher import runtime as dispatcher_runtime
from service.settings import Settings
from tests.conftest import RunningSimulator, bearer
from tests.waiting import eventually

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def product(
    live_settings: Settings, shipengine: RunningSimulator, token: str
) -> AsyncIterator[Client]:
    """API with its in-process dispatcher, registered as the simulator's `track` webhook."""
    app = create_app(live_settings)
    app.cleanup_ctx.append(dispatcher_runtime.in_app)
    async with TestClient(TestServer(app), headers=bearer(token)) as client:
        webhook_url = str(client.make_url("/v1/webhooks/shipengine"))
        async with aiohttp.ClientSession(headers={"API-Key": "TEST_simulator"}) as session:
            registered = await session.post(
                f"{shipengine.url}/v1/environment/webhooks",
                json={"event": "track", "url": webhook_url},
            )
            assert registered.status == 200
        yield client


async def until(api: Client, path: str, predicate: Any) -> dict[str, Any]:
    """The API's document at `path` once `predicate` holds for it."""

    async def probe() -> dict[str, Any] | None:
        document: dict[str, Any] = await (await api.get(path)).json()
        return document if predicate(document) else None

    return await eventually(probe)


async def test_the_whole_loop(product: Client, shipengine: RunningSimulator) -> None:
    body = {"carrier_code": "stamps_com", "tracking_number": "9405511899223197428490"}
    created = await product.post("/v1/subscriptions", json=body)
    assert created.status == 202
    path = f"/v1/subscriptions/{(await created.json())['id']}"

    await until(product, path, lambda s: s["state"] == "active")
    await asyncio.wait_for(shipengine.simulator.wait_idle(), 10)

    delivered = await (await product.get(path)).json()
    assert delivered["status_code"] == "DE"
    assert delivered["actual_delivery_date"] is not None
    assert delivered["last_event_at"] is not None
    events = (await (await product.get(f"{path}/events")).json())["items"]
    assert events[0]["status_code"] == "DE"
    assert "AC" in {event["status_code"] for event in events}
    assert [e["occurred_at"] for e in events] == sorted(
        (e["occurred_at"] for e in events), reverse=True
    )
    deliveries = [d for d in shipengine.simulator.deliveries if d.http_status == 200]
    assert len(deliveries) >= 4

    cancelled = await product.delete(path)
    assert cancelled.status == 202
    await until(product, path, lambda s: s["state"] == "stopped")
    tracking_calls = [c for c in shipengine.simulator.calls if c.path.startswith("/v1/tracking")]
    assert [(call.path, call.http_status) for call in tracking_calls] == [
        ("/v1/tracking/start", 204),
        ("/v1/tracking/stop", 204),
    ]
