"""The subscription API over real HTTP and a real database."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.app import create_app
from service.settings import Settings
from tests.test_dashboard import log_in

Client = TestClient[web.Request, web.Application]

PACKAGE = {"carrier_code": "stamps_com", "tracking_number": "9405511899223197428490"}


async def subscribe(api: Client, body: dict[str, Any], status: int = 202) -> dict[str, Any]:
    response = await api.post("/v1/subscriptions", json=body)
    assert response.status == status, await response.text()
    document: dict[str, Any] = await response.json()
    return document


def assert_error(document: dict[str, Any], error_code: str, field_name: str | None = None) -> None:
    assert document["request_id"]
    codes = [(error["error_code"], error.get("field_name")) for error in document["errors"]]
    assert (error_code, field_name) in codes, codes
    for error in document["errors"]:
        assert error["error_source"] == "tracking_service"
        assert error["message"]


async def test_metadata_keeps_integers_past_64_bits(api: Client) -> None:
    # Written by orjson where it can; this one only the standard library's encoder takes.
    created = await subscribe(api, {**PACKAGE, "metadata": {"erp_id": 2**70, "note": "ü"}})
    assert created["metadata"] == {"erp_id": 2**70, "note": "ü"}


async def test_subscribe_records_a_pending_subscription(api: Client) -> None:
    body = {
        **PACKAGE,
        "carrier_id": "se-28529731",
        "reference": "order-17",
        "metadata": {"order": 17, "tags": ["gift"]},
    }
    created = await subscribe(api, body)

    assert created["state"] == "pending"
    assert created["carrier_code"] == "stamps_com"
    assert created["carrier_id"] == "se-28529731"
    assert created["reference"] == "order-17"
    assert created["metadata"] == {"order": 17, "tags": ["gift"]}
    for field in (
        "status_code",
        "status_description",
        "estimated_delivery_date",
        "actual_delivery_date",
        "last_event_at",
        "last_error",
    ):
        assert created[field] is None
    fetched = await (await api.get(f"/v1/subscriptions/{created['id']}")).json()
    assert fetched == created


async def test_subscribing_again_returns_the_live_subscription(api: Client) -> None:
    first = await subscribe(api, PACKAGE)
    again = await subscribe(api, {**PACKAGE, "reference": "other"}, status=200)
    assert again["id"] == first["id"]
    assert again["reference"] is None


async def test_concurrent_subscribes_create_one_row(api: Client) -> None:
    responses = await asyncio.gather(
        *(api.post("/v1/subscriptions", json=PACKAGE) for _ in range(20))
    )
    statuses = sorted(response.status for response in responses)
    ids = {(await response.json())["id"] for response in responses}
    assert statuses == [200] * 19 + [202]
    assert len(ids) == 1


async def test_a_stopped_package_can_be_subscribed_again(api: Client, engine: AsyncEngine) -> None:
    first = await subscribe(api, PACKAGE)
    await api.delete(f"/v1/subscriptions/{first['id']}")
    await mark_stopped(engine, first["id"])
    second = await subscribe(api, PACKAGE)
    assert second["id"] != first["id"]


async def mark_stopped(engine: AsyncEngine, subscription_id: str) -> None:
    """What the dispatcher does once ShipEngine confirms the stop."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE subscriptions SET state = 'stopped', next_attempt_at = NULL WHERE id = :id"
            ),
            {"id": subscription_id},
        )


@pytest.mark.parametrize(
    ("body", "error_code", "field_name"),
    [
        ({"tracking_number": "1Z999"}, "field_value_required", "carrier_code"),
        ({"carrier_code": "ups"}, "field_value_required", "tracking_number"),
        ({"carrier_code": "", "tracking_number": "1Z999"}, "invalid_string_length", "carrier_code"),
        (
            {"carrier_code": "UPS", "tracking_number": "1Z999"},
            "invalid_field_value",
            "carrier_code",
        ),
        (
            {"carrier_code": "dhl__express", "tracking_number": "1Z999"},
            "invalid_field_value",
            "carrier_code",
        ),
        (
            {"carrier_code": "ups", "tracking_number": "   "},
            "invalid_string_length",
            "tracking_number",
        ),
        (
            {"carrier_code": "ups", "tracking_number": "1Z 999"},
            "invalid_field_value",
            "tracking_number",
        ),
        (
            {"carrier_code": "ups", "tracking_number": "9" * 65},
            "invalid_string_length",
            "tracking_number",
        ),
        (
            {"carrier_code": "ups", "tracking_number": 12345},
            "invalid_field_value",
            "tracking_number",
        ),
        (
            {"carrier_code": "ups", "tracking_number": "1Z9", "metadata": [1]},
            "invalid_field_value",
            "metadata",
        ),
        (
            {"carrier_code": "ups", "tracking_number": "1Z9", "metadata": {"x": "y" * 9000}},
            "invalid_field_value",
            "metadata",
        ),
        (
            {"carrier_code": "ups", "tracking_number": "1Z9", "metadata": {"a": math.inf}},
            "invalid_field_value",
            "metadata",
        ),
        (  # past 64 bits, the standard library writes the JSON, and would write NaN
            {
                "carrier_code": "ups",
                "tracking_number": "1Z9",
                "metadata": {"a": math.nan, "b": 2**80},
            },
            "invalid_field_value",
            "metadata",
        ),
        (
            {"carrier_code": "ups", "tracking_number": "1Z9", "surprise": 1},
            "invalid_field_value",
            "surprise",
        ),
    ],
)
async def test_invalid_subscriptions_get_422_naming_the_field(
    api: Client, body: dict[str, Any], error_code: str, field_name: str
) -> None:
    response = await api.post("/v1/subscriptions", json=body)
    assert response.status == 422
    assert_error(await response.json(), error_code, field_name)


@pytest.mark.parametrize(
    ("data", "content_type", "status", "error_code"),
    [
        (b"{not json", "application/json", 400, "invalid_field_value"),
        (b"", "application/json", 400, "request_body_required"),
        (
            b'{"carrier_code": "ups", "tracking_number": "\\ud800"}',
            "application/json",
            400,
            "invalid_field_value",
        ),
        (b"[1, 2]", "application/json", 422, "invalid_field_value"),
        (b"carrier_code=ups", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)
async def test_malformed_bodies_get_a_json_4xx(
    api: Client, data: bytes, content_type: str, status: int, error_code: str
) -> None:
    response = await api.post(
        "/v1/subscriptions", data=data, headers={"Content-Type": content_type}
    )
    assert response.status == status
    assert_error(await response.json(), error_code)


async def test_unknown_paths_methods_and_ids_answer_json(api: Client) -> None:
    missing = await api.get("/v1/nothing-here")
    assert missing.status == 404
    assert_error(await missing.json(), "not_found")

    wrong_method = await api.put("/v1/subscriptions")
    assert wrong_method.status == 405
    assert_error(await wrong_method.json(), "method_not_allowed")

    for subscription_id in ("not-a-uuid", "6a1c2e64-6d5e-4bd4-9d56-3b1b1ad2a1b0"):
        for path in ("", "/events"):
            response = await api.get(f"/v1/subscriptions/{subscription_id}{path}")
            assert response.status == 404
            assert_error(await response.json(), "not_found")
        deleted = await api.delete(f"/v1/subscriptions/{subscription_id}")
        assert deleted.status == 404


async def test_request_id_is_echoed_and_generated(api: Client) -> None:
    given = await api.get("/v1/nothing", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    assert (await given.json())["request_id"] == "abc-123"

    generated = await api.get("/healthz")
    assert len(generated.headers["X-Request-ID"]) == 36


async def test_list_is_newest_first_with_keyset_pages(api: Client) -> None:
    created = [
        await subscribe(api, {"carrier_code": "ups", "tracking_number": f"1Z{n:04}"})
        for n in range(7)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await (await api.get(f"/v1/subscriptions{query}")).json()
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [item["id"] for item in reversed(created)]


async def test_list_filters(api: Client) -> None:
    await subscribe(api, {"carrier_code": "ups", "tracking_number": "1Z0001"})
    fedex = await subscribe(api, {"carrier_code": "fedex", "tracking_number": "7777"})
    by_carrier = await (await api.get("/v1/subscriptions?carrier_code=fedex")).json()
    assert [item["id"] for item in by_carrier["items"]] == [fedex["id"]]
    by_number = await (await api.get("/v1/subscriptions?tracking_number=7777")).json()
    assert [item["id"] for item in by_number["items"]] == [fedex["id"]]
    by_state = await (await api.get("/v1/subscriptions?state=pending&limit=10")).json()
    assert len(by_state["items"]) == 2
    by_status = await (await api.get("/v1/subscriptions?status_code=DE")).json()
    assert by_status == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("query", "field_name"),
    [
        ("state=lost", "state"),
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("limit=501", "limit"),
        ("cursor=%%%", "cursor"),
        ("colour=red", "colour"),
    ],
)
async def test_bad_list_queries_get_400(api: Client, query: str, field_name: str) -> None:
    response = await api.get(f"/v1/subscriptions?{query}")
    assert response.status == 400
    document = await response.json()
    assert [error["field_name"] for error in document["errors"]] == [field_name]


def forged_cursor(created_at: str) -> str:
    raw = f"{created_at}|{uuid.uuid4()}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "created_at",
    ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2026-11-20T10:00:00"],
)
@pytest.mark.parametrize("where", ["/v1/subscriptions", "/dashboard/subscriptions"])
async def test_a_cursor_whose_time_is_out_of_range_gets_400(
    api: Client, token: str, created_at: str, where: str
) -> None:
    if where.startswith("/dashboard"):
        await log_in(api, token)
    response = await api.get(f"{where}?cursor={forged_cursor(created_at)}")
    assert response.status == 400, await response.text()


async def test_cancel_marks_stopping_and_is_idempotent(api: Client) -> None:
    created = await subscribe(api, PACKAGE)
    first = await api.delete(f"/v1/subscriptions/{created['id']}")
    assert first.status == 202
    assert (await first.json())["state"] == "stopping"
    second = await api.delete(f"/v1/subscriptions/{created['id']}")
    assert second.status == 202
    assert (await second.json())["state"] == "stopping"


async def test_health_and_readiness(api: Client) -> None:
    assert (await api.get("/healthz")).status == 200
    ready = await api.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"]["database"] == "ok"


async def test_without_a_database_answers_are_503_not_500(settings: Settings) -> None:
    unreachable = dataclasses.replace(
        settings, database_url="postgresql://postgres@127.0.0.1:9/nowhere"
    )
    some_token = {"Authorization": "Bearer tt_0123456789ab_secret"}
    async with TestClient(TestServer(create_app(unreachable)), headers=some_token) as api:
        assert (await api.get("/healthz")).status == 200
        ready = await api.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["status"] == "unavailable"
        response = await api.post("/v1/subscriptions", json=PACKAGE)
        assert response.status == 503
        assert_error(await response.json(), "database_unavailable")


async def test_a_batch_is_answered_item_by_item(api: Client) -> None:
    existing = await subscribe(api, {"carrier_code": "ups", "tracking_number": "OLD1"})
    items = [
        {"carrier_code": "ups", "tracking_number": "NEW1", "reference": "r1"},
        {"carrier_code": "UPS", "tracking_number": "BAD"},
        {"carrier_code": "ups", "tracking_number": "OLD1"},
        {"carrier_code": "ups", "tracking_number": "NEW1"},
        {"carrier_code": "fedex", "tracking_number": "NEW2"},
    ]
    response = await api.post("/v1/subscriptions/batch", json={"subscriptions": items})
    assert response.status == 200
    results = (await response.json())["results"]
    assert [(r["index"], r["status"]) for r in results] == [
        (0, 202),
        (1, 422),
        (2, 200),
        (3, 200),
        (4, 202),
    ]
    assert results[1]["errors"][0]["field_name"] == "carrier_code"
    assert results[2]["subscription"]["id"] == existing["id"]
    assert results[3]["subscription"]["id"] == results[0]["subscription"]["id"]
    assert results[0]["subscription"]["reference"] == "r1"
    listed = await (await api.get("/v1/subscriptions?limit=10")).json()
    assert len(listed["items"]) == 3


@pytest.mark.parametrize(
    "body",
    [{"subscriptions": []}, {"subscriptions": [{}] * 1001}, {"subscriptions": "x"}, {"s": []}],
)
async def test_malformed_batches_get_422(api: Client, body: dict[str, Any]) -> None:
    response = await api.post("/v1/subscriptions/batch", json=body)
    assert response.status == 422
    fields = {error["field_name"] for error in (await response.json())["errors"]}
    assert "subscriptions" in fields
