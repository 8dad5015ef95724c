"""/dashboard/changes: the feed's newest changes, and its stream for the session's cookie.

Every wait reads the stream with a deadline, or polls the database: no sleeps.
tests/test_dashboard_browser.py watches a row arrive in a real Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.change_stream import LISTENER_NAME
from service.dashboard import changes as changes_page
from tests.payloads import track_body
from tests.test_change_feed import subscribe
from tests.test_dashboard import log_in
from tests.waiting import eventually
from tests.webhook_sender import WebhookSender

Client = TestClient[web.Request, web.Application]
PAGE = "/dashboard/changes"
STREAM = "/dashboard/changes/stream"
NUMBER = "9405511899223197428490"
OTHER = "9405511899223197428491"
# A safety stop for a stream that never sends what it owes, not a guess at how long it takes.
READ_TIMEOUT_S = 10.0
STREAM_URL = re.compile(r'data-stream="([^"]+)"')
LISTENER = sa.text(
    "SELECT EXISTS (SELECT FROM pg_stat_activity"
    " WHERE datname = current_database() AND state = 'idle' AND application_name = :name)"
).bindparams(name=LISTENER_NAME)
TYPE_CELL = '<td class="mono">tracking.status_changed</td>'


async def changes_page_text(api: Client) -> str:
    response = await api.get(PAGE)
    assert response.status == 200, await response.text()
    return await response.text()


async def shown_with(api: Client, changes: int) -> str:
    """The page once it shows `changes` changes: a transaction running anywhere on the
    server (another test run's) may hold the feed's horizon back a moment."""

    async def probe() -> str | None:
        text = await changes_page_text(api)
        return text if text.count(TYPE_CELL) == changes else None

    return await eventually(probe)


async def listening(engine: AsyncEngine) -> None:
    """Until the API's broadcaster, which the first stream starts, LISTENs to this database:
    every change that commits from then on wakes it. A change committed before, while another
    transaction on the server (another test run's) holds the feed's horizon back, would wait
    for the next NOTIFY."""

    async def probe() -> bool | None:
        async with engine.connect() as conn:
            found = await conn.scalar(LISTENER)
        return True if found else None

    await eventually(probe)


def stream_url_of(text: str) -> str:
    """The stream the page's script opens: after the rows it was rendered with."""
    found = STREAM_URL.search(text)
    assert found is not None
    return html.unescape(found.group(1))


async def next_block(response: aiohttp.ClientResponse) -> str:
    raw = await asyncio.wait_for(response.content.readuntil(b"\n\n"), READ_TIMEOUT_S)
    return raw.decode()


async def next_event(response: aiohttp.ClientResponse) -> tuple[str, str, dict[str, Any]]:
    """(id, type, change) of the next event, past the `retry:` and any heartbeat."""
    while True:
        fields = dict(
            line.split(": ", 1)
            for line in (await next_block(response)).splitlines()
            if line and not line.startswith(":")
        )
        if "data" in fields:
            return fields["id"], fields["event"], json.loads(fields["data"])


@contextlib.asynccontextmanager
async def streaming(
    api: Client, url: str = STREAM, headers: dict[str, str] | None = None
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The stream, open once its first block (`retry:`) arrived; closed on leaving."""
    response = await api.get(url, headers=headers or {}, allow_redirects=False)
    try:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/event-stream"
        assert await next_block(response) == "retry: 2000\n\n"
        yield response
    finally:
        response.close()


async def status_change(api: Client, hooks: WebhookSender, number: str) -> str:
    """A `tracking.status_changed` of a new subscription; returns the subscription's id."""
    subscription_id = await subscribe(api, number)
    await hooks.deliver(track_body(number, "stamps_com", 2))
    return subscription_id


async def test_the_page_lists_the_newest_changes_first(
    api: Client, hooks: WebhookSender, token: str
) -> None:
    first = await status_change(api, hooks, NUMBER)
    second = await status_change(api, hooks, OTHER)
    await log_in(api, token)

    text = await shown_with(api, changes=2)
    assert text.count("Departed facility") == 2  # the newest event's description
    second_row = text.index(f'<a href="/dashboard/subscriptions/{second}">{OTHER}</a>')
    first_row = text.index(f'<a href="/dashboard/subscriptions/{first}">{NUMBER}</a>')
    assert second_row < first_row
    assert '<a href="/dashboard/changes" aria-current="page">Changes</a>' in text
    assert stream_url_of(text).startswith(f"{STREAM}?after=")


async def test_the_page_renders_with_no_changes_and_allows_its_stream(
    api: Client, token: str
) -> None:
    await log_in(api, token)
    response = await api.get(PAGE)
    assert response.status == 200
    text = await response.text()
    assert "No changes yet." in text
    policy = response.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce is not None
    assert f'<script nonce="{nonce.group(1)}">' in text
    assert "connect-src 'self'" in policy  # else the browser refuses the EventSource
    assert "location.reload()" not in text  # the stream, not a reload, keeps it current
    assert 'http-equiv="refresh"' in text  # inside <noscript>: without JavaScript, it reloads


@pytest.mark.parametrize("path", [PAGE, STREAM])
async def test_the_page_and_its_stream_need_a_session(api: Client, path: str) -> None:
    """The `api` client sends a valid bearer token: the dashboard does not take it."""
    response = await api.get(path, allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"].startswith("/dashboard/login?next=")


async def test_the_stream_sends_a_change_made_after_it_opened(
    api: Client, hooks: WebhookSender, token: str, engine: AsyncEngine
) -> None:
    await log_in(api, token)
    async with streaming(api) as stream:
        await listening(engine)
        subscription_id = await status_change(api, hooks, NUMBER)
        cursor, change_type, change = await next_event(stream)
    assert change_type == change["type"] == "tracking.status_changed"
    assert change["subscription_id"] == subscription_id
    assert change["data"]["tracking_number"] == NUMBER
    assert change["data"]["newest_event"]["description"] == "Departed facility"
    assert re.fullmatch(r"[0-9a-f]{32}", cursor)


async def test_the_stream_goes_on_from_the_pages_rows_then_from_the_last_event(
    api: Client, hooks: WebhookSender, token: str, engine: AsyncEngine
) -> None:
    """What commits between the page's read and its script's connect is not lost; a
    reconnect (Last-Event-ID) resumes after the last event, whatever `after` says."""
    await log_in(api, token)
    async with streaming(api):  # the broadcaster up, as in a process serving streams
        await listening(engine)
        url = stream_url_of(await changes_page_text(api))
        await status_change(api, hooks, NUMBER)  # after the page, before its stream
        async with streaming(api, url) as stream:
            cursor, _, change = await next_event(stream)
    assert change["data"]["tracking_number"] == NUMBER

    await status_change(api, hooks, OTHER)
    async with streaming(api, url, headers={"Last-Event-ID": cursor}) as stream:
        _, _, change = await next_event(stream)
    assert change["data"]["tracking_number"] == OTHER


@pytest.mark.parametrize(
    ("url", "headers", "named"),
    [
        pytest.param(STREAM, {"Last-Event-ID": "garbage"}, "Last-Event-ID", id="last-event-id"),
        pytest.param(STREAM, {"Last-Event-ID": "f" * 32}, "Last-Event-ID", id="out-of-range"),
        pytest.param(f"{STREAM}?after=zz", {}, "after", id="after"),
    ],
)
async def test_a_malformed_cursor_is_a_400_page(
    api: Client, token: str, url: str, headers: dict[str, str], named: str
) -> None:
    await log_in(api, token)
    response = await api.get(url, headers=headers)
    assert response.status == 400
    assert response.headers["Content-Type"].startswith("text/html")
    assert f"{named} is not a cursor this feed gave" in await response.text()


async def test_logging_out_ends_an_open_stream(
    api: Client, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request that lasts for hours: it still ends with its session."""
    monkeypatch.setattr(changes_page, "SESSION_RECHECK_S", 0.05)
    csrf = await log_in(api, token)
    async with streaming(api) as stream:
        out = await api.post("/dashboard/logout", data={"csrf": csrf}, allow_redirects=False)
        assert out.status == 303
        # The connection is cut (the body is not ended cleanly), well before the deadline.
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(stream.content.read(), READ_TIMEOUT_S)
