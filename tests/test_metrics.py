"""/metrics in Prometheus' text format: requests, webhooks, dispatch calls, backlog, pauses."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import RunningSimulator
from tests.payloads import track_body
from tests.webhook_sender import WebhookSender

Client = TestClient[web.Request, web.Application]


async def scrape(api: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await api.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


async def test_requests_are_counted_by_route_pattern(api: Client) -> None:
    body = {"carrier_code": "ups", "tracking_number": "1Z1"}
    created = await (await api.post("/v1/subscriptions", json=body)).json()
    await api.get(f"/v1/subscriptions/{created['id']}")
    await api.get("/v1/subscriptions/not-a-uuid")
    samples = await scrape(api)
    key = "tracking_http_requests_total"
    assert samples[(key, labels(method="POST", route="/v1/subscriptions", status="202"))] == 1
    assert samples[(key, labels(method="GET", route="/v1/subscriptions/{id}", status="200"))] == 1
    assert samples[(key, labels(method="GET", route="/v1/subscriptions/{id}", status="404"))] == 1


async def test_methods_nobody_serves_share_one_series(api: Client) -> None:
    """Any token is a method to HTTP (aiohttp's C parser knows some 40, its Python parser takes
    any): counted by name, each would be series of its own for the life of the process. The
    methods the API serves keep their names."""
    for method in ("PROPFIND", "MKCOL", "LOCK"):
        await api.request(method, "/v1/subscriptions")
    await api.request("PURGE", "/nowhere")
    for method in ("DELETE", "DELETE", "HEAD"):
        await api.request(method, "/nowhere")
    samples = await scrape(api)
    methods = {dict(key[1]).get("method") for key in samples if key[0].startswith("tracking_http")}
    assert methods == {"OTHER", "DELETE", "HEAD"}
    key = "tracking_http_requests_total"
    assert samples[(key, labels(method="OTHER", route="unmatched", status="405"))] == 3
    assert samples[(key, labels(method="OTHER", route="unmatched", status="404"))] == 1
    assert samples[(key, labels(method="DELETE", route="unmatched", status="404"))] == 2
    latency = "tracking_http_request_seconds_count"
    assert samples[(latency, labels(method="DELETE", route="unmatched"))] == 2


async def test_webhooks_backlog_and_pause(
    api: Client, engine: AsyncEngine, shipengine: RunningSimulator
) -> None:
    hooks = WebhookSender(api, shipengine.simulator.keys)
    await hooks.deliver(track_body("NOBODY", "ups", 1))
    await hooks.deliver(b"not json", 400)
    for number in ("A1", "A2"):
        await api.post("/v1/subscriptions", json={"carrier_code": "ups", "tracking_number": number})
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE dispatch_control SET pause_kind = 'rate_limit', "
                "paused_until = now() + interval '1 minute'"
            )
        )
    samples: dict[Any, float] = await scrape(api)
    assert samples[("tracking_webhook_deliveries_total", labels(outcome="orphan"))] == 1
    assert samples[("tracking_webhook_refusals_total", labels(reason="invalid_json"))] == 1
    assert samples[("tracking_dispatch_backlog", ())] == 2
    assert samples[("tracking_dispatch_oldest_due_seconds", ())] >= 0
    assert samples[("tracking_dispatch_paused", labels(kind="rate_limit"))] == 1
    assert samples[("tracking_dispatch_paused", labels(kind="account"))] == 0


async def test_open_change_streams_and_what_holds_the_feed_back_are_gauges(
    api: Client, engine: AsyncEngine
) -> None:
    readers, held_back = "tracking_change_stream_readers", "tracking_change_feed_held_back_seconds"
    assert (await scrape(api))[(readers, ())] == 0
    async with engine.connect() as conn:
        await conn.begin()
        await conn.execute(sa.text("SELECT pg_current_xact_id(), pg_sleep(0.2)"))  # writes
        streams = [await api.get("/v1/changes/stream") for _ in range(2)]
        try:
            samples = await scrape(api)
        finally:
            for stream in streams:
                stream.close()
    assert samples[(readers, ())] == 2
    assert samples[(held_back, ())] >= 0.2
