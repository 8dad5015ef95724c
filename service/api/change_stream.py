"""/v1/changes/stream: the change feed as Server-Sent Events, as the changes commit.

One `Broadcaster` per API process holds the one LISTEN connection and reads the feed once for
every reader: woken by the NOTIFY each committing change sends (`db/changes.py`), it reads what
became visible and hands the same rows to every stream. A reader starts from its own cursor:
it registers first, then reads what it missed from the database until it reaches the feed's
edge, then takes the broadcaster's pages, skipping what it already sent. Every page the
broadcaster reads after the reader registered starts at or before the edge the reader reached
(horizons only grow), so nothing falls between the two. A reader too slow for its queue drops
back to reading the database, from its own cursor, and catches up again.

A NOTIFY can arrive before its change is visible (an older transaction still running holds
the horizon back, and ends without notifying anything): the broadcaster then looks again
shortly, until the horizon has passed every transaction it was told of. Without NOTIFY (its
connection lost) it polls every FALLBACK_POLL_S until it listens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import structlog
from aiohttp import web
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.changes import (
    TAG,
    change_filter,
    change_out,
    decode_cursor,
    encode_cursor,
    read_page,
)
from service.api.keys import ENGINE, METRICS, SETTINGS
from service.api.operations import Answer, Param, operation
from service.api.schemas import ChangesQuery, parse_query
from service.api.subscriptions import READERS
from service.db import changes as feed
from service.db.changes import CHANGES_CHANNEL, ChangeFilter, Position
from service.db.engine import asyncpg_dsn
from service.process.waiting import wait_set

log = structlog.get_logger(__name__)

PAGE = 500  # changes read at once, by a reader catching up and by the broadcaster
QUEUE_PAGES = 64  # pages a reader may fall behind the broadcaster before it reads on its own
QUEUE_CHANGES = 2000  # ... or changes: what a slow reader pins in memory stays small
FALLBACK_POLL_S = 2.0  # how often the feed is read while NOTIFY cannot wake it
# Read even while listening, this often: a LISTEN connection can be dead without knowing it
# (a network that drops packets silently, PgBouncer in transaction mode), and is then pinged.
SAFETY_POLL_S = 5.0
LISTENER_TIMEOUT_S = 5.0
# A stream whose client takes no bytes for this long (its buffers full) is cut: it holds
# memory and the server's shutdown. EventSource reconnects and resumes.
WRITE_TIMEOUT_S = 30.0
# Looking again for a change notified but not yet visible: soon, then less often.
RECHECK_FIRST_S = 0.005
RECHECK_MAX_S = 0.25
RECONNECT_S = 2.0
# EventSource reconnects after this long (its default is about 3 s).
RETRY_MS = 2000
# How ops tell the broadcaster's connection in pg_stat_activity.
LISTENER_NAME = "tracking-changes-listener"


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A change read, and its event as a stream writes it."""

    row: RowMapping
    event: bytes


def rendered(rows: list[RowMapping]) -> list[Rendered]:
    return [Rendered(row, _event(row)) for row in rows]


@dataclasses.dataclass(frozen=True)
class Published:
    """A page the broadcaster read: every change in (start, end], in commit order, each
    rendered once for all the streams it goes to."""

    start: Position
    end: Position
    changes: list[Rendered]


class Reader:
    """A stream's place in the broadcaster's fan-out."""

    def __init__(self) -> None:
        self.pages: asyncio.Queue[Published] = asyncio.Queue(QUEUE_PAGES)
        self.queued = 0  # changes in `pages`
        self.overflowed = False

    def offer(self, page: Published) -> None:
        if self.overflowed:
            return
        if self.pages.full() or self.queued + len(page.changes) > QUEUE_CHANGES:
            self.overflowed = True  # the reader reads the database again, from its cursor
            return
        self.pages.put_nowait(page)
        self.queued += len(page.changes)

    async def next_page(self) -> Published:
        page = await self.pages.get()
        self.queued -= len(page.changes)
        return page

    def reset(self) -> None:
        while not self.pages.empty():
            self.pages.get_nowait()
        self.queued = 0
        self.overflowed = False


class Broadcaster:
    def __init__(self, engine: AsyncEngine, database_url: str) -> None:
        self._engine = engine
        self._database_url = database_url
        self._readers: set[Reader] = set()
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._position = feed.START  # set from the feed's edge when the first reader comes
        self._told_txid = 0  # the newest transaction NOTIFY told of
        self._horizon = 0  # the horizon of the latest read
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._recheck_s = RECHECK_FIRST_S

    @property
    def closing(self) -> asyncio.Event:
        return self._closing

    @property
    def readers(self) -> int:
        return len(self._readers)

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[Reader]:
        """A reader registered for the pages read from now on. The broadcast starts with the
        first reader, from the feed's edge as it is before that reader reads anything, and
        ends (its LISTEN connection closed) once the last reader has left."""
        reader = Reader()
        async with self._starting:
            if self._task is None or self._task.done():
                async with feed.snapshot(self._engine) as conn:
                    self._position = await feed.current_edge(conn)
                self._horizon = self._position.txid + 1
                # A context of its own: not the first stream's (its request id in every log).
                self._task = asyncio.create_task(
                    self._run(), name="change-broadcaster", context=contextvars.Context()
                )
            self._readers.add(reader)
        try:
            yield reader
        finally:
            self._readers.discard(reader)
            if not self._readers:
                self._wake.set()  # the broadcast ends, unless a reader comes meanwhile

    async def close(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._close_listener()

    async def _run(self) -> None:
        while not self._closing.is_set():
            async with self._starting:
                if not self._readers:
                    # Under the lock that starts it: a reader that comes next starts anew.
                    self._task = None
                    await self._close_listener()
                    return
            try:
                await self._round()
            except Exception:
                # A database outage, a driver in a state it should not be in: the readers wait
                # (their heartbeats go on); the next round listens and reads again.
                log.warning("changes.broadcast_failed", exc_info=True)
                await self._close_listener()
                await wait_set(self._closing, RECONNECT_S)

    async def _round(self) -> None:
        """Wait for news (or the time to look again), then read what became visible."""
        listening = await self._ensure_listening()
        waiting_for_horizon = self._told_txid >= self._horizon > 0
        if waiting_for_horizon:
            timeout_s = self._recheck_s
            self._recheck_s = min(self._recheck_s * 2, RECHECK_MAX_S)
        else:
            timeout_s = SAFETY_POLL_S if listening else FALLBACK_POLL_S
            self._recheck_s = RECHECK_FIRST_S
        woken = await wait_set(self._wake, timeout_s)
        self._wake.clear()
        if listening and not woken and not waiting_for_horizon:
            await self._ping_listener()
        await self._read_new()

    async def _read_new(self) -> None:
        """Read what became visible since the last read, and hand it to every reader."""
        async with feed.snapshot(self._engine) as conn:
            while True:
                page = await feed.read(conn, self._position, PAGE, ChangeFilter())
                published = Published(self._position, page.next, rendered(page.changes))
                self._position, self._horizon = page.next, page.horizon
                if published.changes or published.end != published.start:
                    for reader in list(self._readers):
                        reader.offer(published)
                if page.at_edge:
                    return

    async def _ping_listener(self) -> None:
        """A listener that cannot answer within LISTENER_TIMEOUT_S is closed (and opened
        again next round): NOTIFY may never have reached it."""
        if self._listener is None:
            return
        try:
            await self._listener.fetchval("SELECT 1", timeout=LISTENER_TIMEOUT_S)
        except Exception as error:
            log.warning("changes.listener_lost", error=type(error).__name__)
            await self._close_listener()

    async def _ensure_listening(self) -> bool:
        if self._listener is not None and not self._listener.is_closed():
            return True
        try:
            self._listener = await asyncpg.connect(
                asyncpg_dsn(self._database_url),
                timeout=LISTENER_TIMEOUT_S,
                command_timeout=LISTENER_TIMEOUT_S,
                server_settings={"application_name": LISTENER_NAME},
            )
            await self._listener.add_listener(CHANGES_CHANNEL, self._notified)
            self._listener.add_termination_listener(self._listener_lost)
            # What committed before we listened notified nobody; if an older transaction
            # still hides it, look again until the horizon passes everything begun so far.
            begun: int = await self._listener.fetchval(feed.NEXT_TXID_SQL)
            self._told_txid = max(self._told_txid, begun - 1)
        except Exception as error:  # any: a failed LISTEN must never end the broadcast
            log.warning("changes.listen_unavailable", error=type(error).__name__)
            await self._close_listener()
            return False
        self._wake.set()  # what committed while nobody listened is read now
        return True

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            if int(payload) > self._told_txid:
                self._told_txid = int(payload)
                # News: a change hidden behind it is looked for soon again, not at the
                # back-off an older one had reached.
                self._recheck_s = RECHECK_FIRST_S
        self._wake.set()

    def _listener_lost(self, _conn: object) -> None:
        self._wake.set()  # listen again, or poll until it can

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None


BROADCASTER = web.AppKey("change_broadcaster", Broadcaster)


async def broadcasting(app: web.Application) -> AsyncIterator[None]:
    """The app's broadcaster; it connects only once a stream is opened."""
    broadcaster = Broadcaster(app[ENGINE], app[SETTINGS].database_url)
    app[BROADCASTER] = broadcaster
    app[METRICS].change_stream_readers.set_function(lambda: broadcaster.readers)
    yield
    await app[BROADCASTER].close()


async def end_streams(app: web.Application) -> None:
    """On shutdown, open streams end at once rather than holding the server's grace period."""
    if BROADCASTER in app:
        app[BROADCASTER].closing.set()


routes = web.RouteTableDef()


@routes.get("/v1/changes/stream")
@operation(
    "Stream the change feed (Server-Sent Events)",
    tag=TAG,
    scopes=READERS,
    query=ChangesQuery,
    headers={
        "Last-Event-ID": Param(
            {"type": "string"}, "the `id:` of the last event received: resume after it"
        )
    },
    description=(
        "The feed's changes as they commit, each an event with `id:` (its cursor), `event:` "
        "(its type) and `data:` (the change, as `GET /v1/changes` shows it); a comment every "
        "`CHANGE_STREAM_HEARTBEAT_S` when idle. Resumes after `Last-Event-ID` or `after`; with "
        "neither, starts with the changes that commit from now on. `limit` is not used."
    ),
    answers={200: Answer(None, "The event stream", media_type="text/event-stream")},
    errors=(400, 410),
)
async def stream_changes(request: web.Request) -> web.StreamResponse:
    query: ChangesQuery = parse_query(ChangesQuery, request.query)
    return await serve_stream(request, resume_after(request, query.after), change_filter(query))


def resume_after(request: web.Request, after: str | None) -> Position | None:
    """After the last event received (`Last-Event-ID`, which EventSource sends when it
    reconnects), else after `after`, else None (from now on); a 400 for either that is no
    cursor of this feed."""
    header = request.headers.get("Last-Event-ID")
    if header:
        return decode_cursor(header, "Last-Event-ID")
    return decode_cursor(after, "after") if after else None


async def serve_stream(
    request: web.Request, after: Position | None, where: ChangeFilter
) -> web.StreamResponse:
    """Stream `where`'s changes after `after` (None: from now on) until the client leaves or
    the server shuts down. Shared with the dashboard's live page."""
    broadcaster = request.config_dict[BROADCASTER]
    heartbeat_s = request.config_dict[SETTINGS].change_stream_heartbeat_s
    async with broadcaster.reading() as reader:
        committed: feed.Committed | None = None
        async with feed.snapshot(request.config_dict[ENGINE]) as conn:
            if after is None:
                cursor, committed = await feed.opening(conn)
            else:
                cursor = after
                await read_page(conn, cursor, 1, where)  # an expired cursor is a 410 first
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx would hold events back otherwise
            }
        )
        await response.prepare(request)
        stream = _Stream(request, response, reader, where, cursor, committed)
        try:
            await stream.run(broadcaster.closing, heartbeat_s)
        except ConnectionResetError:
            pass  # the client left
        except Exception:
            # The head is sent: no error answer can follow. The stream ends, and the client
            # resumes after its last event (a 410 then, if its cursor expired meanwhile).
            log.warning("changes.stream_failed", exc_info=True)
    return response


class _Stream:
    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        reader: Reader,
        where: ChangeFilter,
        cursor: Position,
        opened: feed.Committed | None = None,
    ) -> None:
        self._opened = opened  # set from now on: what had committed then is left out
        self._request = request
        self._response = response
        self._reader = reader
        self._where = where
        self._cursor = cursor
        self._closing = asyncio.Event()

    async def run(self, closing: asyncio.Event, heartbeat_s: float) -> None:
        self._closing = closing
        await self._write(f"retry: {RETRY_MS}\n\n".encode())
        await self._catch_up()
        while not closing.is_set():
            if self._reader.overflowed:
                self._reader.reset()
                await self._catch_up()
                continue
            page = await _next_page(self._reader, closing, heartbeat_s)
            if page is None:
                await self._write(b": heartbeat\n\n")
                continue
            await self._send_published(page)

    async def _write(self, data: bytes) -> None:
        """Write, unless the client has taken nothing for WRITE_TIMEOUT_S or the server is
        shutting down: then the connection is cut (ConnectionResetError ends the stream)."""
        write = asyncio.ensure_future(self._response.write(data))
        closed = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait(
                {write, closed}, timeout=WRITE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closed.cancel()
        if not write.done():
            write.cancel()
            if self._request.transport is not None:
                self._request.transport.abort()
            raise ConnectionResetError("the client took nothing, or the server is stopping")
        write.result()

    async def _catch_up(self) -> None:
        """Read from the database until the feed's edge: what came before the broadcast."""
        while True:
            async with feed.snapshot(self._request.config_dict[ENGINE]) as conn:
                page = await read_page(conn, self._cursor, PAGE, self._where)
            await self._send(rendered(page.changes))
            self._cursor = page.next
            if page.at_edge:
                return

    async def _send_published(self, page: Published) -> None:
        if page.end <= self._cursor:
            return
        fresh = [
            change
            for change in page.changes
            if feed.position_of(change.row) > self._cursor
            and _lets_through(self._where, change.row)
        ]
        await self._send(fresh)
        self._cursor = page.end

    async def _send(self, changes: list[Rendered]) -> None:
        if self._opened is not None:
            opened = self._opened
            changes = [change for change in changes if not opened.holds(change.row["txid"])]
        if changes:
            await self._write(b"".join(change.event for change in changes))


async def _next_page(reader: Reader, closing: asyncio.Event, timeout_s: float) -> Published | None:
    """The reader's next page; None after `timeout_s` without one, or when closing."""
    page = asyncio.ensure_future(reader.next_page())
    closed = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait({page, closed}, timeout=timeout_s, return_when="FIRST_COMPLETED")
    finally:
        closed.cancel()
        if not page.done():
            page.cancel()
    return page.result() if page.done() and not page.cancelled() else None


def _lets_through(where: ChangeFilter, row: RowMapping) -> bool:
    return (
        (not where.types or row["type"] in where.types)
        and (where.subscription_id is None or row["subscription_id"] == where.subscription_id)
        and (where.created_by is None or row["created_by"] == where.created_by)
    )


def _event(row: RowMapping) -> bytes:
    change = change_out(row)
    cursor = encode_cursor(feed.position_of(row))
    return f"id: {cursor}\nevent: {change.type}\ndata: {change.model_dump_json()}\n\n".encode()
