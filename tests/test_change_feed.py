"""The change feed: what makes a change, of which type, and what it shows (issue: change feed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.schemas import ChangePage, SubscriptionOut
from service.db import changes as feed
from service.dispatcher.runtime import build_reconciler
from service.dispatcher.worker import Dispatcher
from service.settings import Settings
from tests.conftest import RunningSimulator
from tests.payloads import event, track_body
from tests.webhook_sender import WebhookSender

Client = TestClient[web.Request, web.Application]
MakeDispatcher = Callable[..., Dispatcher]
NUMBER = "9405511899223197428490"


async def subscribe(api: Client, number: str = NUMBER, **extra: Any) -> str:
    answer = await api.post(
        "/v1/subscriptions", json={"carrier_code": "stamps_com", "tracking_number": number, **extra}
    )
    assert answer.status == 202, await answer.text()
    subscription_id: str = (await answer.json())["id"]
    return subscription_id


async def page_of(api: Client, **query: Any) -> dict[str, Any]:
    answer = await api.get("/v1/changes", params=query)
    assert answer.status == 200, await answer.text()
    page: dict[str, Any] = await answer.json()
    ChangePage.model_validate(page)  # the answer is what the document declares
    return page


async def changes(api: Client, **query: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await page_of(api, **query))["items"]
    return items


async def types(api: Client, **query: Any) -> list[str]:
    return [change["type"] for change in await changes(api, **query)]


async def test_a_delivery_that_moves_the_status_is_one_change_showing_the_subscription(
    api: Client, hooks: WebhookSender
) -> None:
    subscription_id = await subscribe(api, reference="order-77", metadata={"shop": "eu"})
    await hooks.deliver(track_body(NUMBER, "stamps_com", 2))

    (change,) = await changes(api)
    shown = await (await api.get(f"/v1/subscriptions/{subscription_id}")).json()
    assert change["type"] == "tracking.status_changed"
    assert change["id"].startswith("chg_")
    assert (change["subscription_id"], change["sequence"]) == (subscription_id, 1)
    data = change["data"]
    assert data["previous_status_code"] is None
    assert data["newest_event"]["description"] == "Departed facility"
    assert data["newest_event"]["occurred_at"] == "2026-11-21T03:10:00Z"
    # Everything GET shows, as it showed it right after the change (the caller's own fields
    # included, so a consumer needs no second call).
    assert {key: data[key] for key in SubscriptionOut.model_fields} == shown
    assert (data["reference"], data["metadata"]) == ("order-77", {"shop": "eu"})
    assert change["occurred_at"] == shown["updated_at"]


async def test_each_type_of_news_is_its_own_change_and_the_most_significant_wins(
    api: Client, hooks: WebhookSender
) -> None:
    subscription_id = await subscribe(api)
    await hooks.deliver(track_body(NUMBER, "stamps_com", 1))  # AC: a status
    await hooks.deliver(  # the same status, a new estimate
        track_body(NUMBER, "stamps_com", 1, estimated_delivery_date="2026-11-24T00:00:00Z")
    )
    more = track_body(NUMBER, "stamps_com", 1, estimated_delivery_date="2026-11-24T00:00:00Z")
    more["data"]["events"].append(event("2026-11-20T08:00:00Z", "AC", "Label created"))
    await hooks.deliver(more)  # the same status and estimate, one event more
    # Status, estimate and events at once: one change, of the status.
    await hooks.deliver(track_body(NUMBER, "stamps_com", 3))

    found = await changes(api)
    assert [c["type"] for c in found] == [
        "tracking.status_changed",
        "tracking.eta_changed",
        "tracking.events_added",
        "tracking.status_changed",
    ]
    assert [c["sequence"] for c in found] == [1, 2, 3, 4]
    assert {c["subscription_id"] for c in found} == {subscription_id}
    assert [c["data"]["previous_status_code"] for c in found] == [None, "AC", "AC", "AC"]
    assert found[1]["data"]["estimated_delivery_date"] == "2026-11-24T00:00:00Z"
    assert found[3]["data"]["status_code"] == "IT"


async def test_a_duplicate_a_refused_regression_and_an_orphan_make_no_change(
    api: Client, hooks: WebhookSender
) -> None:
    await hooks.deliver(track_body("ORPHAN-1", "stamps_com", 2))  # no subscription yet
    assert await changes(api) == []
    await subscribe(api)
    await hooks.deliver(track_body(NUMBER, "stamps_com", 2))
    await hooks.deliver(track_body(NUMBER, "stamps_com", 2))  # the same again: a duplicate
    await hooks.deliver(track_body(NUMBER, "stamps_com", 1))  # older, another status: refused
    assert await types(api) == ["tracking.status_changed"]


async def test_an_orphan_adopted_by_a_new_subscription_is_its_first_change(
    api: Client, hooks: WebhookSender
) -> None:
    await hooks.deliver(track_body(NUMBER, "stamps_com", 2))
    subscription_id = await subscribe(api)
    (change,) = await changes(api)
    assert (change["type"], change["subscription_id"]) == (
        "tracking.status_changed",
        subscription_id,
    )
    assert change["data"]["state"] == "pending"


async def test_a_batch_of_deliveries_makes_a_change_each_in_order_with_what_each_showed(
    api: Client, hooks: WebhookSender
) -> None:
    """The receiver commits deliveries in groups: each still makes its own change."""
    subscription_id = await subscribe(api)
    bodies = [track_body(NUMBER, "stamps_com", steps) for steps in (1, 2, 3, 4)]
    await asyncio.gather(*(hooks.deliver(body) for body in bodies))
    found = await changes(api, subscription_id=subscription_id)
    assert [c["sequence"] for c in found] == list(range(1, len(found) + 1))
    assert found[-1]["data"]["status_code"] == "DE"
    for change in found:
        assert change["data"]["status_code"] in {"AC", "IT", "DE"}


async def test_the_dispatcher_makes_active_failed_and_stopped(
    api: Client, make_dispatcher: MakeDispatcher, shipengine: RunningSimulator
) -> None:
    shipengine.simulator.script("BAD1", status=400, error_code="invalid_identifier")
    good = await subscribe(api)
    bad = await subscribe(api, "BAD1")
    dispatcher = make_dispatcher()
    await dispatcher.drain()
    stopped = await api.delete(f"/v1/subscriptions/{good}")
    assert stopped.status == 202, await stopped.text()
    await dispatcher.drain()

    found = {(c["subscription_id"], c["type"]): c for c in await changes(api)}
    assert set(found) == {
        (good, "subscription.active"),
        (bad, "subscription.failed"),
        (good, "subscription.stopped"),
    }
    assert found[(bad, "subscription.failed")]["data"]["last_error"]["http_status"] == 400
    assert found[(good, "subscription.stopped")]["sequence"] == 2
    assert found[(good, "subscription.stopped")]["data"]["state"] == "stopped"


async def database_now(engine: AsyncEngine) -> datetime:
    async with engine.connect() as conn:
        now: datetime = (await conn.execute(sa.select(sa.func.now()))).scalar_one()
    return now


async def test_a_silent_package_is_stale_once_per_silence(
    api: Client, hooks: WebhookSender, make_dispatcher: MakeDispatcher, engine: AsyncEngine
) -> None:
    subscription_id = await subscribe(api)
    await make_dispatcher().drain()  # active
    await hooks.deliver(track_body(NUMBER, "stamps_com", 2))
    start = await database_now(engine)

    async def sweep(hours: float) -> int:
        async with engine.begin() as conn:
            return await feed.note_stale(
                conn, silent_for=STALE, limit=100, now=start + timedelta(hours=hours)
            )

    assert await sweep(71) == 0
    assert await sweep(73) == 1
    assert await sweep(100) == 0  # the same silence: reported once
    (stale,) = await changes(api, type="tracking.stale")
    assert (stale["subscription_id"], stale["sequence"]) == (subscription_id, 3)
    assert stale["data"]["status_code"] == "IT"
    assert stale["data"]["newest_event"]["description"] == "Departed facility"

    await hooks.deliver(track_body(NUMBER, "stamps_com", 3))  # news ends the silence
    assert await sweep(71) == 0
    assert await sweep(100) == 1  # a new silence, reported in its turn
    assert await sweep(200) == 0


async def test_neither_a_delivered_a_stopped_nor_a_pending_package_goes_stale(
    api: Client, hooks: WebhookSender, make_dispatcher: MakeDispatcher, engine: AsyncEngine
) -> None:
    await subscribe(api)  # pending: no start accepted yet
    delivered = await subscribe(api, "DELIVERED-1")
    stopped = await subscribe(api, "STOPPED-1")
    await make_dispatcher().drain()
    await hooks.deliver(track_body("DELIVERED-1", "stamps_com", 4))
    assert (await api.delete(f"/v1/subscriptions/{stopped}")).status == 202
    await make_dispatcher().drain()
    await subscribe(api, "PENDING-1")
    later = await database_now(engine) + timedelta(days=30)
    async with engine.begin() as conn:
        reported = await feed.note_stale(conn, silent_for=STALE, limit=100, now=later)
    stale = await changes(api, type="tracking.stale")
    assert reported == len(stale) == 1  # only NUMBER: active, in transit, silent
    assert stale[0]["subscription_id"] not in (delivered, stopped)


async def test_the_reconciler_reports_silence_by_its_clock(
    api: Client,
    make_dispatcher: MakeDispatcher,
    live_settings: Settings,
    engine: AsyncEngine,
    shipengine_http: aiohttp.ClientSession,
) -> None:
    subscription_id = await subscribe(api)
    await make_dispatcher().drain()
    later = await database_now(engine) + timedelta(hours=live_settings.stale_after_hours + 1)
    reconciler = build_reconciler(live_settings, engine, shipengine_http, clock=lambda: later)
    await reconciler.run_once()
    (stale,) = await changes(api, type="tracking.stale")
    assert stale["subscription_id"] == subscription_id


STALE = timedelta(hours=72)
