"""Bad input to the receiver gets a 4xx (or is stored, when ShipEngine signed it), never a 500.

Header bytes that are not UTF-8, times no datetime can hold once moved to UTC, JSON nested
deeper than anything but recursion can follow: each of these once answered 500.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.tracking import json_depth_exceeds, timestamp
from service.settings import Settings
from service.webhooks.signatures import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from tests.conftest import RunningSimulator, bearer
from tests.payloads import event, track_body
from tests.raw_http import header_bytes, raw_post
from tests.webhook_sender import WEBHOOK, WebhookSender

Client = TestClient[web.Request, web.Application]
NUMBER = "9405511899223197428490"
SECRET_HEADER = "X-Tracking-Secret"
# Not UTF-8: a lone continuation byte, an unfinished sequence, an overlong one, a stray 0xff.
GARBAGE = (b"\xff\xfe", b"\xc3(", b"ok\x80ok", b"\xf0\x28\x8c\xbc", b"\xc0\xaf")


async def rows(engine: AsyncEngine, sql: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(sa.text(sql))]


async def refusals_counted(client: Client, reason: str, token: str | None = None) -> float:
    """The refusal counter's value; `token` for a client built without one."""
    response = await client.get("/metrics", headers=bearer(token) if token else None)
    assert response.status == 200
    metrics = await response.text()
    prefix = f'tracking_webhook_refusals_total{{reason="{reason}"}} '
    found = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(found[0].removeprefix(prefix)) if found else 0.0


def signed(hooks: WebhookSender, body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", **hooks.keys.headers(body)}


async def subscribe(api: Client) -> str:
    response = await api.post(
        "/v1/subscriptions", json={"carrier_code": "stamps_com", "tracking_number": NUMBER}
    )
    assert response.status == 202
    subscription_id: str = (await response.json())["id"]
    return subscription_id


# -- header bytes that are not UTF-8 ---------------------------------------------------------


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_a_shared_secret_that_is_not_utf8_is_refused_as_a_bad_secret(
    app_with: Callable[[Settings], Awaitable[Client]],
    live_settings: Settings,
    shipengine: RunningSimulator,
    engine: AsyncEngine,
    token: str,
    garbage: bytes,
) -> None:
    settings = dataclasses.replace(
        live_settings, webhook_secret_header=SECRET_HEADER, webhook_secret="s3cret"
    )
    client = await app_with(settings)
    hooks = WebhookSender(client, shipengine.simulator.keys)
    body = json.dumps(track_body(NUMBER, "stamps_com", 1)).encode()
    headers = [*header_bytes(signed(hooks, body)), (SECRET_HEADER.encode(), garbage)]
    answer = await raw_post(client, WEBHOOK, headers, body)
    assert answer.status == 401
    assert answer.json()["errors"][0]["error_code"] == "bad_secret"
    assert await rows(engine, "SELECT outcome, refusal FROM webhook_deliveries") == [
        ("refused", "bad_secret")
    ]
    assert await refusals_counted(client, "bad_secret", token) == 1


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("header", [KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER])
async def test_a_signature_header_that_is_not_utf8_is_refused_401(
    api: Client, hooks: WebhookSender, engine: AsyncEngine, header: str, garbage: bytes
) -> None:
    body = json.dumps(track_body(NUMBER, "stamps_com", 1)).encode()
    headers = signed(hooks, body)
    sent = [(name.encode(), garbage if name == header else value.encode())
            for name, value in headers.items()]  # fmt: skip
    answer = await raw_post(api, WEBHOOK, sent, body)
    assert answer.status == 401, answer.body
    reason = answer.json()["errors"][0]["error_code"]
    assert reason in ("malformed_headers", "unknown_key", "bad_signature")
    assert await rows(engine, "SELECT outcome, refusal FROM webhook_deliveries") == [
        ("refused", reason)
    ]
    assert await refusals_counted(api, reason) == 1


async def test_other_headers_that_are_not_utf8_are_stored_readably(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    body = json.dumps(track_body(NUMBER, "stamps_com", 1)).encode()
    headers = [*header_bytes(signed(hooks, body)), (b"X-Custom", b"caf\xe9 \xff")]
    answer = await raw_post(api, WEBHOOK, headers, body)
    assert answer.status == 200, answer.body
    assert answer.json()["outcome"] == "orphan"
    # Each byte that is not UTF-8 is kept as U+FFFD: JSON (and jsonb) hold only Unicode.
    assert await rows(engine, "SELECT headers->>'x-custom' FROM webhook_deliveries") == [
        ("caf\ufffd \ufffd",)
    ]


# -- times past what a datetime holds ----------------------------------------------------------

# Valid ISO 8601, but moved to UTC the first is before the year 1 and the second after 9999.
UNREPRESENTABLE = ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00")


@pytest.mark.parametrize("moment", UNREPRESENTABLE)
def test_a_time_past_what_utc_can_hold_reads_as_absent(moment: str) -> None:
    assert timestamp(moment) is None


def test_the_edges_of_what_utc_can_hold_still_read() -> None:
    first, last = timestamp("0001-01-01T00:00:00Z"), timestamp("9999-12-31T09:59:59-14:00")
    assert first is not None
    assert last is not None
    assert (first.year, last.year) == (1, 9999)


@pytest.mark.parametrize("moment", UNREPRESENTABLE)
@pytest.mark.parametrize(
    "where", ["occurred_at", "estimated_delivery_date", "actual_delivery_date"]
)
async def test_a_signed_delivery_with_an_unrepresentable_time_is_stored_and_acknowledged(
    api: Client, hooks: WebhookSender, engine: AsyncEngine, moment: str, where: str
) -> None:
    subscription_id = await subscribe(api)
    body = track_body(NUMBER, "stamps_com", 2)
    if where == "occurred_at":
        body["data"]["events"].insert(0, event(moment, "IT", "A scan out of time"))
    else:
        body["data"][where] = moment
    answer = await hooks.deliver(body)
    assert answer["outcome"] == "filed"
    events = (await (await api.get(f"/v1/subscriptions/{subscription_id}/events")).json())["items"]
    expected = [None] if where == "occurred_at" else []
    assert [e["occurred_at"] for e in events if e["occurred_at"] is None] == expected
    current = await (await api.get(f"/v1/subscriptions/{subscription_id}")).json()
    assert current["status_code"] == "IT"
    if where != "occurred_at":
        assert current[where] is None
    assert await rows(engine, "SELECT outcome FROM webhook_deliveries") == [("filed",)]


@pytest.mark.parametrize(
    "url",
    [
        "https://[api.shipengine.com/v1/tracking?carrier_code=stamps_com&tracking_number=" + NUMBER,
        "https://]/?carrier_code=stamps_com&tracking_number=" + NUMBER + "#?x=[",
        "?carrier_code=stamps_com&tracking_number=" + NUMBER + "&tracking_number=%ff%00",
    ],
)
async def test_a_signed_delivery_with_a_resource_url_no_parser_reads_is_filed(
    api: Client, hooks: WebhookSender, url: str
) -> None:
    subscription_id = await subscribe(api)
    body = track_body(NUMBER, "stamps_com", 1)
    body["resource_url"] = url
    del body["data"]["tracking_number"]  # the URL alone names the package
    answer = await hooks.deliver(body)
    assert (answer["outcome"], answer["subscription_id"]) == ("filed", subscription_id)


# -- nesting --------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    """A track body whose `data` holds arrays nested so that the whole is `depth` deep."""
    inner = depth - 2  # the body's object and `data`'s
    return (
        b'{"resource_type":"API_TRACK","data":{"tracking_number":"1ZDEEP",'
        b'"deep":' + b"[" * inner + b"]" * inner + b"}}"
    )


@pytest.mark.parametrize("depth", [65, 900, 1_000, 100_000])
async def test_json_nested_too_deep_is_refused_400_before_it_is_hashed(
    hooks: WebhookSender, engine: AsyncEngine, depth: int
) -> None:
    answer = await hooks.deliver(nested(depth), 400)
    assert answer["errors"][0]["error_code"] == "too_deep"
    assert await rows(engine, "SELECT outcome, refusal, verification FROM webhook_deliveries") == [
        ("refused", "too_deep", "verified")
    ]
    assert await rows(engine, "SELECT count(*) FROM tracking_events") == [(0,)]


async def test_json_nested_as_deep_as_allowed_is_filed(
    hooks: WebhookSender, engine: AsyncEngine
) -> None:
    answer = await hooks.deliver(nested(64))
    assert answer["outcome"] == "orphan"


async def test_brackets_inside_strings_are_not_nesting(hooks: WebhookSender) -> None:
    body = track_body(NUMBER, "stamps_com", 1)
    body["data"]["events"][0]["description"] = "[{" * 5_000 + ' \\" [[' + '"\\\\' * 3
    answer = await hooks.deliver(body)
    assert answer["outcome"] == "orphan"


@pytest.mark.parametrize(
    ("text", "limit", "exceeds"),
    [
        (b"{}", 1, False),
        (b"{}", 0, True),
        (b'{"a": [1, {"b": []}]}', 4, False),
        (b'{"a": [1, {"b": []}]}', 3, True),
        (b'{"a": "[[[[[[", "b": "\\"[[["}', 1, False),
        (b"[[]][[[]]]", 2, True),  # not JSON, but its deepest point is what counts
        (b"[" * 100_000, 64, True),
        (b"[]" * 100_000, 1, False),
        (b'"unterminated [[[', 0, False),  # the string runs on to the end: all text
        # One string that never ends, its quotes escaped: read once, not once per quote.
        (b'"' + b'\\"[' * 100_000, 0, False),
    ],
)
def test_json_depth_is_measured_without_recursion(text: bytes, limit: int, exceeds: bool) -> None:
    assert json_depth_exceeds(text, limit) is exceeds


async def test_a_content_type_that_is_not_utf8_is_refused_415(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    body = json.dumps(track_body(NUMBER, "stamps_com", 1)).encode()
    headers = [*header_bytes(hooks.keys.headers(body)), (b"Content-Type", b"application/\xffjson")]
    answer = await raw_post(api, WEBHOOK, headers, body)
    assert answer.status == 415, answer.body
    assert await rows(engine, "SELECT refusal FROM webhook_deliveries") == [
        ("unsupported_media_type",)
    ]
