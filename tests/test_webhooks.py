"""The `track` webhook receiver: stores every delivery, files its news, tolerates its shape."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.payloads import track_body
from tests.webhook_sender import WEBHOOK, WebhookSender

Client = TestClient[web.Request, web.Application]
TRACKING_NUMBER = "9405511899223197428490"


async def subscribe(api: Client, carrier_code: str = "stamps_com") -> str:
    response = await api.post(
        "/v1/subscriptions",
        json={"carrier_code": carrier_code, "tracking_number": TRACKING_NUMBER},
    )
    assert response.status == 202
    subscription_id: str = (await response.json())["id"]
    return subscription_id


async def events_of(api: Client, subscription_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/v1/subscriptions/{subscription_id}/events")
    items: list[dict[str, Any]] = (await response.json())["items"]
    return items


async def subscription(api: Client, subscription_id: str) -> dict[str, Any]:
    document: dict[str, Any] = await (await api.get(f"/v1/subscriptions/{subscription_id}")).json()
    return document


async def test_a_delivery_files_status_and_events(api: Client, hooks: WebhookSender) -> None:
    subscription_id = await subscribe(api)
    answer = await hooks.deliver(track_body(TRACKING_NUMBER, "stamps_com", 2))
    assert answer["outcome"] == "filed"
    assert answer["subscription_id"] == subscription_id

    current = await subscription(api, subscription_id)
    assert current["status_code"] == "IT"
    assert current["status_description"] == "Departed facility"
    assert current["estimated_delivery_date"] == "2026-11-23T00:00:00Z"
    assert current["last_event_at"] == "2026-11-21T03:10:00Z"
    events = await events_of(api, subscription_id)
    assert [event["description"] for event in events] == ["Departed facility", "Shipment accepted"]
    assert events[0]["city_locality"] == "DALLAS"
    assert events[0]["occurred_at"] == "2026-11-21T03:10:00Z"
    assert events[0]["received_at"]


async def test_the_whole_history_in_each_delivery_is_stored_once(
    api: Client, hooks: WebhookSender
) -> None:
    subscription_id = await subscribe(api)
    for steps in (1, 2, 3, 4, 4):
        await hooks.deliver(track_body(TRACKING_NUMBER, "stamps_com", steps))

    events = await events_of(api, subscription_id)
    assert [event["status_code"] for event in events] == ["DE", None, "IT", "AC"]
    delivered = await subscription(api, subscription_id)
    assert delivered["status_code"] == "DE"
    assert delivered["actual_delivery_date"] == "2026-11-22T15:30:00Z"


async def test_an_older_delivery_adds_history_but_does_not_move_status_back(
    api: Client,
    hooks: WebhookSender,
) -> None:
    subscription_id = await subscribe(api)
    await hooks.deliver(track_body(TRACKING_NUMBER, "stamps_com", 4))
    await hooks.deliver(track_body(TRACKING_NUMBER, "stamps_com", 2))
    current = await subscription(api, subscription_id)
    assert current["status_code"] == "DE"
    assert current["last_event_at"] == "2026-11-22T15:30:00Z"


async def test_the_carrier_code_in_resource_url_picks_the_subscription(
    api: Client, hooks: WebhookSender
) -> None:
    usps = await subscribe(api, carrier_code="usps")
    fedex = await subscribe(api, carrier_code="fedex")
    answer = await hooks.deliver(track_body(TRACKING_NUMBER, "fedex", 1))
    assert answer["subscription_id"] == fedex
    assert await events_of(api, usps) == []


async def test_without_a_carrier_code_the_tracking_number_decides(
    api: Client, hooks: WebhookSender
) -> None:
    subscription_id = await subscribe(api)
    answer = await hooks.deliver(track_body(TRACKING_NUMBER, None, 1))
    assert answer["subscription_id"] == subscription_id


async def test_unknown_packages_are_kept_as_orphans(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    answer = await hooks.deliver(track_body("NOSUCHNUMBER", "ups", 2))
    assert answer["outcome"] == "orphan"
    assert answer["subscription_id"] is None
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text("SELECT tracking_number, outcome FROM webhook_deliveries WHERE id = :id"),
                {"id": answer["delivery_id"]},
            )
        ).one()
    assert tuple(row) == ("NOSUCHNUMBER", "orphan")


async def test_raw_bytes_and_headers_are_kept(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    await subscribe(api)
    raw = json.dumps(track_body(TRACKING_NUMBER, "stamps_com", 1), indent=3).encode()
    answer = await hooks.deliver(raw)
    async with engine.connect() as conn:
        body, headers = (
            await conn.execute(
                sa.text("SELECT body, headers FROM webhook_deliveries WHERE id = :id"),
                {"id": answer["delivery_id"]},
            )
        ).one()
    assert bytes(body) == raw
    assert headers["x-custom"] == "kept"
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "data",
    [
        {"data": None},
        {"data": {"tracking_number": TRACKING_NUMBER, "events": None, "status_code": None}},
        {"data": {"tracking_number": TRACKING_NUMBER, "events": [None, 3, {"occurred_at": 5}]}},
        {"data": {"tracking_number": 9405511899223197428490, "events": "nope"}},
        {"resource_url": None, "data": {"tracking_number": "", "status_code": ""}},
        {},
    ],
)
async def test_loose_shapes_are_stored_not_refused(
    api: Client, hooks: WebhookSender, data: dict[str, Any]
) -> None:
    await subscribe(api)
    answer = await hooks.deliver(data)
    assert answer["outcome"] in ("filed", "orphan")
    assert answer["delivery_id"] > 0


async def test_a_tracking_number_sent_as_a_json_number_keeps_every_digit(
    api: Client, hooks: WebhookSender
) -> None:
    subscription_id = await subscribe(api)
    body = json.dumps(track_body(TRACKING_NUMBER, "stamps_com", 1)).encode()
    # 22 digits: past 64 bits, which a float (or orjson, reading one) would round.
    as_number = body.replace(f'"{TRACKING_NUMBER}"'.encode(), TRACKING_NUMBER.encode())
    assert as_number != body
    answer = await hooks.deliver(as_number)
    assert (answer["outcome"], answer["subscription_id"]) == ("filed", subscription_id)


async def test_routine_filings_log_at_debug_and_orphans_at_info(
    api: Client, hooks: WebhookSender
) -> None:
    await subscribe(api)
    with structlog.testing.capture_logs() as logs:
        await hooks.deliver(track_body(TRACKING_NUMBER, "stamps_com", 1))
        await hooks.deliver(track_body("1ZNOBODY", "ups", 1))
    levels = [(e["outcome"], e["log_level"]) for e in logs if e["event"] == "webhook.delivery"]
    assert levels == [("filed", "debug"), ("orphan", "info")]


async def test_events_with_missing_fields_are_filed(api: Client, hooks: WebhookSender) -> None:
    subscription_id = await subscribe(api)
    body = track_body(TRACKING_NUMBER, "stamps_com", 0)
    body["data"]["events"] = [
        {"occurred_at": None, "description": "No time at all"},
        {"occurred_at": "not a time", "status_code": "", "latitude": "35.1", "longitude": None},
        {"occurred_at": "2026-11-20T09:00:00", "description": "No zone means UTC"},
    ]
    await hooks.deliver(body)
    events = await events_of(api, subscription_id)
    assert len(events) == 3
    assert events[0]["occurred_at"] == "2026-11-20T09:00:00Z"
    assert {event["latitude"] for event in events} == {None, 35.1}


async def test_event_text_is_stored_exactly_as_sent(api: Client, hooks: WebhookSender) -> None:
    subscription_id = await subscribe(api)
    # What JSON escapes, and what it need not: quotes, a backslash, control and line
    # separators, accents, CJK, an emoji; and a NUL, which PostgreSQL's text cannot hold.
    tricky = 'Left at "back door" \\ C:\\box\n\tNachbar: Müller 東京 \u2028 📦 end\u0000'
    body = track_body(TRACKING_NUMBER, "stamps_com", 0)
    body["data"]["events"] = [
        {"occurred_at": "2026-11-20T09:00:00Z", "description": tricky, "city_locality": "\\"},
    ]
    await hooks.deliver(body)
    [event] = await events_of(api, subscription_id)
    assert event["description"] == tricky.replace("\u0000", "").strip()
    assert event["city_locality"] == "\\"


@pytest.mark.parametrize(
    ("data", "content_type", "status", "reason"),
    [
        (b"{broken", "application/json", 400, "invalid_json"),
        (b"[]", "application/json", 400, "not_an_object"),
        (b"", "application/json", 400, "invalid_json"),
        (b'{"data": {"tracking_number": "\\ud800"}}', "application/json", 400, "invalid_json"),
        (b"<xml/>", "text/xml", 415, "unsupported_media_type"),
    ],
)
async def test_unreadable_deliveries_get_a_json_4xx_and_are_kept(
    hooks: WebhookSender,
    engine: AsyncEngine,
    data: bytes,
    content_type: str,
    status: int,
    reason: str,
) -> None:
    answer = await hooks.deliver(data, status, content_type=content_type)
    assert answer["errors"][0]["error_code"] == reason
    async with engine.connect() as conn:
        kept = (
            await conn.execute(
                sa.text("SELECT outcome, refusal, verification FROM webhook_deliveries")
            )
        ).all()
    assert [tuple(row) for row in kept] == [("refused", reason, "verified")]


async def test_oversized_deliveries_get_413_before_being_read(
    hooks: WebhookSender, engine: AsyncEngine
) -> None:
    huge = io.BytesIO(b'{"padding": "' + b"x" * (1024 * 1024) + b'"}')
    # Signature headers (a request without them is a 404), never checked: the size goes first.
    headers = {"Content-Type": "application/json", **hooks.keys.headers(b"")}
    response = await hooks.api.post(WEBHOOK, data=huge, headers=headers)
    assert response.status == 413
    assert (await response.json())["errors"][0]["error_code"] == "request_too_large"
    async with engine.connect() as conn:
        kept = (
            await conn.execute(sa.text("SELECT refusal, length(body) FROM webhook_deliveries"))
        ).all()
    assert [tuple(row) for row in kept] == [("too_large", 0)]
