"""The receiver's promises: authentic, nothing lost, nothing doubled, never backwards."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.settings import SHIPENGINE_PRODUCTION_URL, Settings, SettingsError
from tests.conftest import RunningSimulator
from tests.payloads import event, track_body
from tests.webhook_sender import WebhookSender

Client = TestClient[web.Request, web.Application]
NUMBER = "9405511899223197428490"


async def subscribe(api: Client, number: str = NUMBER) -> dict[str, Any]:
    response = await api.post(
        "/v1/subscriptions", json={"carrier_code": "stamps_com", "tracking_number": number}
    )
    assert response.status == 202
    document: dict[str, Any] = await response.json()
    return document


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run SQL in its own committed transaction; the rows it returns, if any."""
    async with engine.begin() as conn:
        result = await conn.execute(sa.text(sql), params)
        return [tuple(row) for row in result] if result.returns_rows else []


async def get(api: Client, path: str) -> Any:
    return await (await api.get(path)).json()


# -- authenticity ------------------------------------------------------------------------------


async def test_a_signed_delivery_is_verified_and_kept_as_such(
    hooks: WebhookSender, engine: AsyncEngine
) -> None:
    await hooks.deliver(track_body(NUMBER, "stamps_com", 1))
    assert await rows(engine, "SELECT verification FROM webhook_deliveries") == [("verified",)]


@pytest.mark.parametrize(
    ("tamper", "status", "reason"),
    [
        ("drop_all", 404, "missing_headers"),
        ("drop_signature", 404, "missing_headers"),
        ("body", 401, "bad_signature"),
        ("timestamp", 401, "bad_signature"),
        ("unknown_kid", 401, "unknown_key"),
        ("stale", 400, "stale_timestamp"),
        ("future", 400, "stale_timestamp"),
        ("garbage_signature", 401, "malformed_headers"),
    ],
)
async def test_deliveries_that_fail_verification_are_refused_and_recorded(
    hooks: WebhookSender, engine: AsyncEngine, tamper: str, status: int, reason: str
) -> None:
    body = json.dumps(track_body(NUMBER, "stamps_com", 1)).encode()
    now = datetime.now(UTC)
    when = {"stale": now - timedelta(minutes=6), "future": now + timedelta(minutes=6)}
    headers = hooks.keys.headers(body, now=when.get(tamper, now))
    if tamper == "drop_all":
        headers = {}
    elif tamper == "drop_signature":
        del headers["x-shipengine-rsa-sha256-signature"]
    elif tamper == "body":
        body = body.replace(b"Shipment", b"Shipmenx")
    elif tamper == "timestamp":
        headers["x-shipengine-timestamp"] = now.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    elif tamper == "unknown_kid":
        headers["x-shipengine-rsa-sha256-key-id"] = "no-such-key"
    elif tamper == "garbage_signature":
        headers["x-shipengine-rsa-sha256-signature"] = "%%% not base64 %%%"
    answer = await hooks.deliver(body, status, headers=headers, sign=False)
    assert answer["errors"][0]["error_code"] == reason
    # Without signature headers it is not ShipEngine's: counted, not stored
    # (tests/test_webhook_refusals.py).
    stored = [] if reason == "missing_headers" else [("refused", reason)]
    assert await rows(engine, "SELECT outcome, refusal FROM webhook_deliveries") == stored
    assert await rows(engine, "SELECT count(*) FROM tracking_events") == [(0,)]


async def test_a_rotated_key_is_fetched_once_the_refresh_interval_allows(
    app_with: Any, live_settings: Settings, shipengine: RunningSimulator
) -> None:
    # Within WEBHOOK_KEYS_REFRESH_S a new key is refused (401: ShipEngine retries later); the
    # signature tests show the interval itself, here it is zero to show the rotation.
    settings = dataclasses.replace(live_settings, webhook_keys_refresh_s=0.0)
    hooks = WebhookSender(await app_with(settings), shipengine.simulator.keys)
    await hooks.deliver(track_body(NUMBER, "stamps_com", 1))
    hooks.keys.rotate()
    await hooks.deliver(track_body(NUMBER, "stamps_com", 2))


async def test_unreachable_keys_answer_503_so_shipengine_retries(
    app_with: Any, live_settings: Settings, shipengine: RunningSimulator
) -> None:
    settings = dataclasses.replace(live_settings, shipengine_jwks_url="http://127.0.0.1:9/jwks")
    hooks = WebhookSender(await app_with(settings), shipengine.simulator.keys)
    answer = await hooks.deliver(track_body(NUMBER, "stamps_com", 1), 503)
    assert answer["errors"][0]["error_code"] == "keys_unavailable"


async def test_a_shared_secret_header_is_required_when_configured(
    app_with: Any, live_settings: Settings, shipengine: RunningSimulator
) -> None:
    settings = dataclasses.replace(
        live_settings, webhook_secret_header="X-Tracking-Secret", webhook_secret="s3cret"
    )
    hooks = WebhookSender(await app_with(settings), shipengine.simulator.keys)
    body = track_body(NUMBER, "stamps_com", 1)
    await hooks.deliver(body, 401)
    await hooks.deliver(body, 401, headers={"X-Tracking-Secret": "guess"})
    await hooks.deliver(body, 200, headers={"X-Tracking-Secret": "s3cret"})


async def test_verification_can_be_turned_off_locally_only(
    app_with: Any, live_settings: Settings, shipengine: RunningSimulator, engine: AsyncEngine
) -> None:
    settings = dataclasses.replace(live_settings, webhook_verify=False)
    hooks = WebhookSender(await app_with(settings), shipengine.simulator.keys)
    await hooks.deliver(track_body(NUMBER, "stamps_com", 1), sign=False)
    assert await rows(engine, "SELECT verification FROM webhook_deliveries") == [("skipped",)]
    with pytest.raises(SettingsError, match=r"^WEBHOOK_VERIFY"):
        dataclasses.replace(
            live_settings, webhook_verify=False, shipengine_base_url=SHIPENGINE_PRODUCTION_URL
        )


async def test_with_the_database_down_a_delivery_gets_503(
    app_with: Any, live_settings: Settings, shipengine: RunningSimulator
) -> None:
    settings = dataclasses.replace(
        live_settings, database_url="postgresql://postgres@127.0.0.1:9/nowhere"
    )
    hooks = WebhookSender(await app_with(settings), shipengine.simulator.keys)
    answer = await hooks.deliver(track_body(NUMBER, "stamps_com", 1), 503)
    assert answer["errors"][0]["error_code"] == "database_unavailable"


# -- nothing lost, nothing doubled -------------------------------------------------------------


async def test_a_repeated_delivery_is_kept_as_a_duplicate_and_changes_nothing(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    subscription = await subscribe(api)
    body = track_body(NUMBER, "stamps_com", 2)
    first = await hooks.deliver(body)
    # The same state again, re-serialised differently: still the same content.
    again = await hooks.deliver(json.dumps(body, indent=2, sort_keys=True).encode())
    assert (first["outcome"], again["outcome"]) == ("filed", "duplicate")
    assert again["subscription_id"] == subscription["id"]
    assert await rows(engine, "SELECT outcome FROM webhook_deliveries ORDER BY id") == [
        ("filed",),
        ("duplicate",),
    ]
    assert len((await get(api, f"/v1/subscriptions/{subscription['id']}/events"))["items"]) == 2


async def test_a_burst_of_the_same_delivery_files_it_once(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    await subscribe(api)
    body = track_body(NUMBER, "stamps_com", 3)
    answers = await asyncio.gather(*(hooks.deliver(body) for _ in range(16)))
    assert sorted(a["outcome"] for a in answers) == ["duplicate"] * 15 + ["filed"]
    assert await rows(engine, "SELECT count(*) FROM status_changes") == [(1,)]


async def test_orphans_are_filed_when_their_subscription_arrives(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    for steps in (1, 2):
        assert (await hooks.deliver(track_body(NUMBER, "stamps_com", steps)))["outcome"] == (
            "orphan"
        )
    subscription = await subscribe(api)
    assert subscription["status_code"] == "IT"
    events = await get(api, f"/v1/subscriptions/{subscription['id']}/events")
    assert len(events["items"]) == 2
    assert await rows(engine, "SELECT DISTINCT outcome FROM webhook_deliveries") == [("filed",)]


async def test_replay_is_idempotent_and_refuses_refused_deliveries(
    api: Client, hooks: WebhookSender
) -> None:
    subscription = await subscribe(api)
    delivered = await hooks.deliver(track_body(NUMBER, "stamps_com", 2))
    before = await get(api, f"/v1/subscriptions/{subscription['id']}")
    replayed = await api.post(f"/v1/webhooks/deliveries/{delivered['delivery_id']}/replay")
    assert replayed.status == 200
    assert (await replayed.json())["new_events"] == 0
    after = await get(api, f"/v1/subscriptions/{subscription['id']}")
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"
    }

    refused = await hooks.deliver(b"{", 400)
    assert refused["errors"]
    assert (await api.post("/v1/webhooks/deliveries/999999/replay")).status == 404
    assert (await api.post("/v1/webhooks/deliveries/x/replay")).status == 404


async def test_bulk_replay_by_time_range_with_a_dry_run(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    for steps in (1, 2, 3):
        await hooks.deliver(track_body(NUMBER, "stamps_com", steps))
    subscription = await subscribe(api)  # adopts the orphans
    await rows(engine, "DELETE FROM tracking_events")  # lose the history: replay restores it
    window = {
        "received_from": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "received_to": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }
    dry = await (
        await api.post("/v1/webhooks/deliveries/replay", json={**window, "dry_run": True})
    ).json()
    assert dry == {"dry_run": True, "matched": 3, "outcomes": {}}
    assert await rows(engine, "SELECT count(*) FROM tracking_events") == [(0,)]

    done = await (await api.post("/v1/webhooks/deliveries/replay", json=window)).json()
    assert done == {"dry_run": False, "matched": 3, "outcomes": {"filed": 3}}
    events = await get(api, f"/v1/subscriptions/{subscription['id']}/events")
    assert len(events["items"]) == 3
    bad = await api.post(
        "/v1/webhooks/deliveries/replay",
        json={"received_from": window["received_to"], "received_to": window["received_from"]},
    )
    assert bad.status == 422


# -- never backwards ---------------------------------------------------------------------------


async def test_the_status_history_records_each_change(api: Client, hooks: WebhookSender) -> None:
    subscription = await subscribe(api)
    for steps in (1, 2, 3, 4):
        await hooks.deliver(track_body(NUMBER, "stamps_com", steps))
    history = (await get(api, f"/v1/subscriptions/{subscription['id']}/statuses"))["items"]
    assert [(h["previous_status_code"], h["status_code"]) for h in history] == [
        ("IT", "DE"),
        ("AC", "IT"),
        (None, "AC"),
    ]
    assert history[0]["occurred_at"] == "2026-11-22T15:30:00Z"
    assert history[0]["learned_at"]


async def test_an_older_state_never_moves_a_delivered_package_back(
    api: Client, hooks: WebhookSender
) -> None:
    subscription = await subscribe(api)
    await hooks.deliver(track_body(NUMBER, "stamps_com", 4))
    await hooks.deliver(track_body(NUMBER, "stamps_com", 2))
    current = await get(api, f"/v1/subscriptions/{subscription['id']}")
    assert current["status_code"] == "DE"
    metrics = await (await api.get("/metrics")).text()
    assert "tracking_status_regressions_refused_total 1.0" in metrics


async def test_an_exception_can_be_followed_by_transit(api: Client, hooks: WebhookSender) -> None:
    subscription = await subscribe(api)
    body = track_body(NUMBER, "stamps_com", 2)
    body["data"]["status_code"] = "EX"
    body["data"]["events"].insert(0, event("2026-11-21T08:00:00Z", "EX", "Weather delay"))
    await hooks.deliver(body)
    await hooks.deliver(track_body(NUMBER, "stamps_com", 3))
    history = (await get(api, f"/v1/subscriptions/{subscription['id']}/statuses"))["items"]
    assert [h["status_code"] for h in history] == ["IT", "EX"]


async def test_an_exception_rearms_tracking_a_limited_number_of_times(
    api: Client, hooks: WebhookSender, engine: AsyncEngine, live_settings: Settings
) -> None:
    subscription = await subscribe(api)
    await rows(
        engine,
        "UPDATE subscriptions SET state = 'active', next_attempt_at = NULL",
    )
    for rearm in range(live_settings.tracking_ex_rearm_max + 1):
        body = track_body(NUMBER, "stamps_com", 1)
        stamp = f"2026-11-2{rearm + 1}T10:00:00Z"
        body["data"]["status_code"] = "EX"
        body["data"]["events"].insert(0, event(stamp, "EX", f"Exception {rearm}"))
        await hooks.deliver(body)
        ((due, rearms),) = await rows(
            engine,
            "SELECT coalesce(next_attempt_at > now() + interval '10 minutes', false), rearms "
            "FROM subscriptions",
        )
        expected = min(rearm + 1, live_settings.tracking_ex_rearm_max)
        assert (due, rearms) == (rearm < live_settings.tracking_ex_rearm_max, expected)
        # The restart happens (the dispatcher's job); the row has no call due again.
        await rows(engine, "UPDATE subscriptions SET next_attempt_at = NULL")
        body["data"]["status_code"] = "IT"
        body["data"]["events"].insert(0, event(f"2026-11-2{rearm + 1}T11:00:00Z", "IT", "Moving"))
        await hooks.deliver(body)
    state = await get(api, f"/v1/subscriptions/{subscription['id']}")
    assert state["state"] == "active"


@pytest.mark.parametrize(
    "where_it_stands",
    ["state = 'active', done_at = now()", "state = 'failed'"],
    ids=["done", "failed"],
)
async def test_an_exception_rearms_only_an_active_subscription_not_done(
    api: Client, hooks: WebhookSender, engine: AsyncEngine, where_it_stands: str
) -> None:
    await subscribe(api)
    await rows(engine, f"UPDATE subscriptions SET {where_it_stands}, next_attempt_at = NULL")
    body = track_body(NUMBER, "stamps_com", 1)
    body["data"]["status_code"] = "EX"
    body["data"]["events"].insert(0, event("2026-11-21T10:00:00Z", "EX", "Exception"))
    await hooks.deliver(body)
    ((due, rearms, status),) = await rows(
        engine, "SELECT next_attempt_at IS NOT NULL, rearms, status_code FROM subscriptions"
    )
    assert (due, rearms, status) == (False, 0, "EX")


async def test_a_batch_adopts_orphans_too(api: Client, hooks: WebhookSender) -> None:
    await hooks.deliver(track_body(NUMBER, "stamps_com", 2))
    items = [{"carrier_code": "stamps_com", "tracking_number": NUMBER}]
    results = (
        await (await api.post("/v1/subscriptions/batch", json={"subscriptions": items})).json()
    )["results"]
    assert results[0]["subscription"]["status_code"] == "IT"
