"""GET /v1/changes/stream: the change feed as Server-Sent Events (issue: change feed).

Every wait here reads the stream with a deadline, or polls the database: no sleeps. "Nothing
else was pending" is shown by a later change arriving next, never by a silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import change_stream
from service.api.change_stream import Published, Reader
from service.api.changes import read_page
from service.db.tokens import create_token
from service.domain.access import Scope
from service.settings import Settings
from tests.conftest import AppWith, bearer
from tests.payloads import track_body
from tests.raw_http import exchange, request_bytes
from tests.test_change_feed import MakeDispatcher, subscribe
from tests.waiting import eventually
from tests.webhook_sender import WebhookSender

Client = TestClient[web.Request, web.Application]
STREAM = "/v1/changes/stream"
NUMBER = "9405511899223197428490"
OTHER = "9405511899223197428491"
# A safety stop for a stream that never sends what it owes, not a guess at how long it takes.
READ_TIMEOUT_S = 10.0


# -- reading a stream ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """What the server wrote up to a blank line: fields (`id`, `event`, ...) and comments."""

    fields: dict[str, str]
    comments: list[str]

    @property
    def is_event(self) -> bool:
        return "data" in self.fields


@dataclasses.dataclass(frozen=True)
class Event:
    id: str
    type: str
    data: dict[str, Any]


def parse_block(raw: bytes) -> Block:
    fields: dict[str, str] = {}
    comments: list[str] = []
    for line in raw.decode().split("\n"):
        if not line:
            continue
        if line.startswith(":"):
            comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value
    return Block(fields, comments)


class EventStream:
    """An open /v1/changes/stream, read one block (or one event) at a time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def block(self) -> Block:
        raw = await asyncio.wait_for(self.response.content.readuntil(b"\n\n"), READ_TIMEOUT_S)
        return parse_block(raw)

    async def event(self) -> Event:
        """The next event, past any comment."""
        while True:
            block = await self.block()
            if block.is_event:
                return Event(
                    block.fields["id"], block.fields["event"], json.loads(block.fields["data"])
                )

    async def events(self, count: int) -> list[Event]:
        return [await self.event() for _ in range(count)]


@contextlib.asynccontextmanager
async def streaming(
    client: Client, *, headers: dict[str, str] | None = None, **params: str
) -> AsyncIterator[EventStream]:
    """A stream, open once its first block (`retry:`) arrived; closed on leaving."""
    response = await client.get(STREAM, headers=headers or {}, params=params)
    try:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/event-stream"
        stream = EventStream(response)
        assert await stream.block() == Block({"retry": "2000"}, [])
        yield stream
    finally:
        response.close()


# -- the feed as GET /v1/changes shows it ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Listed:
    cursor: str  # the `next_cursor` of a page ending with this change
    change: dict[str, Any]


async def listed(api: Client, **query: str) -> list[Listed]:
    """Every change GET /v1/changes shows, a page of one each: with its own cursor."""
    found: list[Listed] = []
    after: dict[str, str] = {}
    while True:
        answer = await api.get("/v1/changes", params={"limit": "1", **query, **after})
        assert answer.status == 200, await answer.text()
        page = await answer.json()
        if not page["items"]:
            return found
        (change,) = page["items"]
        found.append(Listed(page["next_cursor"], change))
        after = {"after": page["next_cursor"]}


def as_listed(events: list[Event]) -> list[Listed]:
    """What the events say, in the shape `listed` gives; their `event:` is their type."""
    for event in events:
        assert event.type == event.data["type"]
    return [Listed(event.id, event.data) for event in events]


async def step(hooks: WebhookSender, steps: int, number: str = NUMBER) -> None:
    """ShipEngine's news of `number` after `steps` events: one change each (AC, IT, IT, DE)."""
    await hooks.deliver(track_body(number, "stamps_com", steps))


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = await response.json()
    (error,) = body["errors"]
    assert isinstance(error, dict)
    return error


# -- what a stream sends ---------------------------------------------------------------------


async def test_a_change_made_while_a_stream_is_open_is_an_event_showing_it_as_the_feed_does(
    api: Client, hooks: WebhookSender
) -> None:
    await subscribe(api)
    async with streaming(api) as stream:
        await step(hooks, 2)
        event = await stream.event()

    (shown,) = await listed(api)
    assert event.type == "tracking.status_changed"
    assert event.data == shown.change
    assert event.id == shown.cursor
    after = await api.get("/v1/changes", params={"after": event.id})
    assert (await after.json())["items"] == []


@pytest.mark.parametrize("resume_by", ["Last-Event-ID", "after"])
async def test_a_stream_reopened_after_its_last_event_gets_exactly_what_it_missed_in_order(
    api: Client, hooks: WebhookSender, resume_by: str
) -> None:
    await subscribe(api)
    async with streaming(api) as stream:
        await step(hooks, 1)
        first = await stream.event()
    await step(hooks, 2)  # made while nobody listened
    await step(hooks, 3)

    resume = (
        {"headers": {"Last-Event-ID": first.id}}
        if resume_by == "Last-Event-ID"
        else {"after": first.id}
    )
    async with streaming(api, **resume) as stream:
        missed = await stream.events(2)
        await step(hooks, 4)
        # The next event is the change made now: nothing else was waiting before it.
        after_them = await stream.event()

    assert as_listed([first, *missed, after_them]) == await listed(api)
    assert [event.data["sequence"] for event in missed] == [2, 3]


async def test_a_stream_without_a_cursor_starts_with_the_changes_made_after_it_opened(
    api: Client, hooks: WebhookSender
) -> None:
    await subscribe(api)
    await step(hooks, 1)
    async with streaming(api) as stream:
        await step(hooks, 2)
        event = await stream.event()

    assert event.data["sequence"] == 2, "the change made before the stream opened was sent"
    before, after = await listed(api)
    assert as_listed([event]) == [after]
    assert before.change["data"]["status_code"] == "AC"


async def test_a_change_committed_before_a_stream_opened_is_not_sent_though_visible_only_later(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    """An older transaction still open (anywhere on the server) holds the feed's horizon back:
    a change committed meanwhile is in the feed only once that transaction ends. It was
    committed before the stream opened all the same: "from now on" leaves it out."""
    await subscribe(api)
    async with engine.connect() as older:
        holding = await older.begin()
        await older.execute(sa.text("SELECT pg_current_xact_id()"))  # an id: it holds the horizon
        await step(hooks, 1)  # committed, not yet visible
        async with streaming(api) as stream:
            await holding.commit()
            await step(hooks, 2)
            event = await stream.event()

    assert event.data["sequence"] == 2, "the change committed before the stream opened was sent"
    before, after = await listed(api)
    assert as_listed([event]) == [after]
    assert before.change["data"]["status_code"] == "AC"


async def test_a_change_hidden_when_the_broadcast_began_arrives_once_the_horizon_passes_it(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    """It committed before the broadcaster listened, so no NOTIFY will ever name it, and an
    older transaction hid it from the stream's catch-up: the broadcaster must look again until
    the horizon has passed it, though the older transaction ends without notifying anyone."""
    await subscribe(api)
    before = (await (await api.get("/v1/changes")).json())["next_cursor"]
    async with engine.connect() as older:
        holding = await older.begin()
        await older.execute(sa.text("SELECT pg_current_xact_id()"))  # an id: it holds the horizon
        await step(hooks, 1)  # committed, not yet visible
        async with streaming(api, after=before) as stream:
            await eventually(lambda: _listening(engine))
            await holding.commit()  # writes nothing to the feed: no NOTIFY
            event = await stream.event()
    assert (event.type, event.data["sequence"]) == ("tracking.status_changed", 1)


async def _listening(engine: AsyncEngine) -> bool | None:
    """True once the broadcaster listens, else None (`eventually` polls on)."""
    return True if await listening_connections(engine) else None


async def test_a_stream_filtered_by_type_gets_only_changes_of_that_type(
    api: Client, hooks: WebhookSender, make_dispatcher: MakeDispatcher
) -> None:
    subscription_id = await subscribe(api)
    async with streaming(api, type="subscription.active") as stream:
        await step(hooks, 1)  # tracking.status_changed: not for this stream
        await make_dispatcher().drain()  # ShipEngine accepts it: subscription.active
        event = await stream.event()

    assert (event.type, event.data["subscription_id"]) == ("subscription.active", subscription_id)
    assert as_listed([event]) == await listed(api, type="subscription.active")


async def test_a_stream_filtered_by_subscription_gets_only_that_subscriptions_changes(
    api: Client, hooks: WebhookSender
) -> None:
    await subscribe(api, OTHER)
    wanted = await subscribe(api)
    async with streaming(api, subscription_id=wanted) as stream:
        await step(hooks, 1, OTHER)  # another subscription's: not for this stream
        await step(hooks, 1)
        await step(hooks, 2, OTHER)
        await step(hooks, 2)
        events = await stream.events(2)

    assert {event.data["subscription_id"] for event in events} == {wanted}
    assert as_listed(events) == await listed(api, subscription_id=wanted)


async def test_an_idle_stream_sends_heartbeat_comments(
    live_settings: Settings, token: str, app_with: AppWith
) -> None:
    client = await app_with(dataclasses.replace(live_settings, change_stream_heartbeat_s=0.05))
    async with streaming(client, headers=bearer(token)) as stream:
        beats = [await stream.block() for _ in range(3)]
    assert beats == [Block({}, ["heartbeat"])] * 3


# -- one LISTEN connection for every reader --------------------------------------------------


LISTENING = sa.text(
    "SELECT pid, query FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name = :name AND state = 'idle'"
).bindparams(name=change_stream.LISTENER_NAME)


async def listening_connections(engine: AsyncEngine) -> list[str]:
    """What the sessions of the test's database that last ran a LISTEN on `changes` ran."""
    async with engine.connect() as conn:
        return [row.query for row in await conn.execute(LISTENING)]


async def listening_pids(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return [row.pid for row in await conn.execute(LISTENING)]


async def test_many_streams_of_one_process_share_one_listen_connection(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    await subscribe(api)
    async with contextlib.AsyncExitStack() as streams:
        readers = [await streams.enter_async_context(streaming(api)) for _ in range(5)]
        await step(hooks, 1)
        received = await asyncio.gather(*(reader.event() for reader in readers))
        listening = await listening_connections(engine)

    (shown,) = await listed(api)
    assert as_listed(list(received)) == [shown] * 5
    assert len(listening) == 1


# -- what a stream refuses -------------------------------------------------------------------


@pytest.mark.parametrize("cursor", ["zz", "0" * 31, "A" * 32, "0" * 33, "8" + "0" * 31, "0x" * 16])
async def test_a_last_event_id_that_is_no_cursor_is_a_400(api: Client, cursor: str) -> None:
    response = await api.get(STREAM, headers={"Last-Event-ID": cursor})
    assert response.status == 400
    error = await error_of(response)
    assert (error["error_code"], error["field_name"]) == ("invalid_field_value", "Last-Event-ID")


async def test_an_after_that_is_no_cursor_is_a_400(api: Client) -> None:
    response = await api.get(STREAM, params={"after": "zz"})
    assert response.status == 400
    error = await error_of(response)
    assert (error["error_code"], error["field_name"]) == ("invalid_field_value", "after")


async def test_a_last_event_id_of_bytes_that_are_not_utf8_is_a_400(api: Client, token: str) -> None:
    host, port = api.server.host, api.server.port
    assert port is not None
    headers = [(b"Authorization", f"Bearer {token}".encode()), (b"Last-Event-ID", b"\xff\xfe0")]
    request = request_bytes(b"GET", STREAM.encode(), headers, b"", f"{host}:{port}".encode())
    answer = await exchange(host, port, request)
    assert answer.status == 400, answer.head
    (error,) = answer.json()["errors"]
    assert (error["error_code"], error["field_name"]) == ("invalid_field_value", "Last-Event-ID")


async def test_a_cursor_older_than_what_retention_kept_is_a_410(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    await subscribe(api)
    await step(hooks, 1)
    await step(hooks, 2)

    async def both() -> list[Listed] | None:  # once no older transaction holds them back
        found = await listed(api)
        return found if len(found) == 2 else None

    first, second = await eventually(both)
    async with engine.begin() as conn:  # retention deleted up to the second change
        await conn.execute(
            sa.text(
                "UPDATE changes_pruned SET txid = c.txid, change_id = c.id "
                "FROM changes c WHERE c.sequence = 2"
            )
        )
    response = await api.get(STREAM, headers={"Last-Event-ID": first.cursor})
    assert response.status == 410
    assert (await error_of(response))["error_code"] == "cursor_expired"
    # From the newest change retention deleted, nothing is lost: a stream opens.
    async with streaming(api, after=second.cursor):
        pass


async def test_a_stream_needs_a_token(live_settings: Settings, app_with: AppWith) -> None:
    anonymous = await app_with(live_settings)
    response = await anonymous.get(STREAM)
    assert response.status == 401
    assert (await error_of(response))["error_code"] == "unauthorized"


async def test_a_token_with_only_the_metrics_scope_may_not_stream(
    api: Client, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        metrics_only = await create_token(conn, "metrics-only", [Scope.METRICS])
    response = await api.get(STREAM, headers=bearer(metrics_only.plaintext))
    assert response.status == 403
    assert (await error_of(response))["error_code"] == "forbidden"


# -- a reader slower than the feed -----------------------------------------------------------


async def test_a_reader_that_falls_behind_its_queue_still_gets_every_change_once_in_order(
    api: Client, hooks: WebhookSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream is held while writing its first event (a client that does not read), so the
    broadcaster's pages overflow its queue of one; once let go, it reads on from the database."""
    monkeypatch.setattr(change_stream, "QUEUE_PAGES", 1)
    monkeypatch.setattr(change_stream, "PAGE", 1)
    writing, let_go, overflowed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    send_published = change_stream._Stream._send_published
    offer = Reader.offer

    async def held_send(self: Any, page: Published) -> None:
        writing.set()
        await let_go.wait()
        await send_published(self, page)

    def watched_offer(self: Reader, page: Published) -> None:
        offer(self, page)
        if self.overflowed:
            overflowed.set()

    monkeypatch.setattr(change_stream._Stream, "_send_published", held_send)
    monkeypatch.setattr(Reader, "offer", watched_offer)

    await subscribe(api)
    await subscribe(api, OTHER)
    async with streaming(api) as stream:
        await step(hooks, 1)
        await asyncio.wait_for(writing.wait(), READ_TIMEOUT_S)
        for steps in (2, 3, 4):
            await step(hooks, steps)
        await asyncio.wait_for(overflowed.wait(), READ_TIMEOUT_S)
        let_go.set()
        behind = await stream.events(4)
        await step(hooks, 1, OTHER)  # once caught up, it follows the broadcast again
        caught_up = await stream.event()

    assert as_listed([*behind, caught_up]) == await listed(api)


async def test_the_broadcaster_starts_with_the_first_stream_and_not_before(
    api: Client, engine: AsyncEngine
) -> None:
    assert await listening_connections(engine) == []

    async def listening() -> list[str] | None:
        return await listening_connections(engine) or None

    async with streaming(api):
        assert len(await eventually(listening)) == 1


async def test_a_stream_still_gets_changes_after_the_listen_connection_is_lost(
    api: Client, hooks: WebhookSender, engine: AsyncEngine
) -> None:
    """The broadcaster's LISTEN session is ended by the server (a restart, an admin, a proxy):
    the changes made next still reach the streams, by listening again or by polling."""
    await subscribe(api)
    async with streaming(api) as stream:
        await step(hooks, 1)
        first = await stream.event()
        (listener,) = await listening_pids(engine)
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": listener})

        async def ended() -> bool | None:
            return True if listener not in await listening_pids(engine) else None

        await eventually(ended)
        await step(hooks, 2)  # its NOTIFY reaches no one
        second = await stream.event()

    assert as_listed([first, second]) == await listed(api)


async def test_a_stream_whose_database_fails_after_it_began_ends_cleanly_without_a_second_answer(
    api: Client, hooks: WebhookSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its head is sent: a failure can only end it (the client resumes from its last event),
    never write an error answer into its body."""
    await subscribe(api)
    await step(hooks, 1)
    reads = 0

    async def failing_after_the_first(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads > 1:  # the first checks the cursor before the head is sent
            raise ConnectionRefusedError("the database is down")
        return await read_page(*args)

    monkeypatch.setattr(change_stream, "read_page", failing_after_the_first)
    response = await api.get(STREAM, params={"after": "0" * 32})
    try:
        assert response.status == 200
        body = await asyncio.wait_for(response.content.read(), READ_TIMEOUT_S)
    finally:
        response.close()
    assert reads == 2
    assert body == b"retry: 2000\n\n"


async def test_a_listen_that_fails_in_any_way_does_not_end_the_broadcast(
    api: Client, hooks: WebhookSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg can fail a LISTEN with errors of its own (an InternalClientError on a connection
    a restart left half-open): the broadcaster must poll, listen again, and go on."""
    failures = [asyncpg.InternalClientError("cannot switch to state 11")]
    add_listener = asyncpg.Connection.add_listener

    async def failing_once(self: asyncpg.Connection, *args: Any) -> None:
        if failures:
            raise failures.pop()
        await add_listener(self, *args)

    monkeypatch.setattr(asyncpg.Connection, "add_listener", failing_once)
    await subscribe(api)
    async with streaming(api) as stream:
        await step(hooks, 1)
        event = await stream.event()
    assert (event.type, failures) == ("tracking.status_changed", [])


async def test_a_listener_that_hears_nothing_is_covered_by_the_safety_poll(
    api: Client, hooks: WebhookSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LISTEN connection can be dead without knowing it (packets dropped silently, or
    PgBouncer in transaction mode): changes still arrive, by the poll it makes meanwhile."""
    monkeypatch.setattr(change_stream, "SAFETY_POLL_S", 0.2)
    monkeypatch.setattr(change_stream.Broadcaster, "_notified", lambda *_: None)
    await subscribe(api)
    async with streaming(api) as stream:
        await step(hooks, 1)
        event = await stream.event()
    assert event.type == "tracking.status_changed"


async def test_a_client_that_takes_nothing_is_cut_and_holds_nothing(
    api: Client, engine: AsyncEngine, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its socket's buffers full, every write waits: after WRITE_TIMEOUT_S its connection is
    cut and its reader let go (EventSource would reconnect and resume)."""
    monkeypatch.setattr(change_stream, "WRITE_TIMEOUT_S", 0.3)
    subscription_id = await subscribe(api, metadata={"filler": "x" * 8000})
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO changes (type, subscription_id, sequence, state)"
                " SELECT 'tracking.stale', :id, n, 'active' FROM generate_series(1, 2000) AS n"
            ),
            {"id": subscription_id},
        )
    broadcaster = api.server.app[change_stream.BROADCASTER]
    host, port = api.server.host, api.server.port
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((host, port))
    try:
        head = f"GET {STREAM}?after={'0' * 32} HTTP/1.1\r\nHost: {host}\r\n"
        stalled.sendall(f"{head}Authorization: Bearer {token}\r\n\r\n".encode())

        async def let_go() -> bool | None:
            return True if broadcaster.readers == 0 else None

        async def reading() -> bool | None:
            return True if broadcaster.readers == 1 else None

        await eventually(reading)
        await eventually(let_go)  # 16 MB of events owed, a 4 KiB buffer, nothing read
    finally:
        stalled.close()
