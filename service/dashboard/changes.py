"""The live changes page: the feed's newest changes, then each new one as it commits.

The page reads the newest changes and the feed's edge in one snapshot, and its script streams
from that edge (`/changes/stream?after=`), so no change falls between the rows shown and the
first event. The stream is /v1/changes/stream's (`serve_stream`), for the session's cookie
instead of a bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import web
from yarl import URL

from service.api.change_stream import resume_after as stream_resume_after
from service.api.change_stream import serve_stream
from service.api.changes import change_out, encode_cursor
from service.api.errors import BadRequest
from service.api.keys import ENGINE
from service.dashboard.keys import VIEWER
from service.dashboard.render import Refused, page
from service.db import changes as feed
from service.db.changes import ChangeFilter, Position
from service.db.dashboard_sessions import find_session
from service.domain.changes import ChangeType

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

SHOWN = 50  # changes the page is rendered with; its script keeps more as they come
STREAM = "/dashboard/changes/stream"
# How often an open stream looks its session up again. One request, the stream lasts for
# hours: without this, logging out or revoking the token would not end it.
SESSION_RECHECK_S = 30.0


@routes.get("/changes")
async def changes_page(request: web.Request) -> web.Response:
    # The primary, as /v1/changes reads it: the horizon is the server's own.
    async with feed.snapshot(request.config_dict[ENGINE]) as conn:
        newest = await feed.newest(conn, SHOWN)
    context = {
        "changes": [change_out(row) for row in newest.changes],
        "shown": SHOWN,
        "stream_url": str(URL(STREAM).with_query(after=encode_cursor(newest.edge))),
        "types": [change_type.value for change_type in ChangeType],
        "section": "changes",
    }
    # `refresh`: without JavaScript (no stream) the page reloads itself like the others.
    return page(request, "changes.html", context, refresh=True)


@routes.get("/changes/stream")
async def changes_stream(request: web.Request) -> web.StreamResponse:
    after = resume_after(request)
    session_id = request[VIEWER].session.session_id
    watch = asyncio.create_task(_end_with_session(request, session_id), name="stream-session")
    try:
        return await serve_stream(request, after, ChangeFilter())
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


def resume_after(request: web.Request) -> Position | None:
    """The stream's `resume_after`, from the rows the page showed (`after`), as a page's 400."""
    try:
        return stream_resume_after(request, request.query.get("after"))
    except BadRequest as error:
        raise Refused(400, str(error)) from None


async def _end_with_session(request: web.Request, session_id: str) -> None:
    """Close the stream's connection once its session has ended (logged out, expired, its
    token revoked). EventSource then reconnects, meets the login redirect, and stops."""
    while True:
        await asyncio.sleep(SESSION_RECHECK_S)  # the guard has just looked, when it opened
        if not await _session_lives(request, session_id):
            break
    log.info("dashboard.stream_session_ended")
    if request.transport is not None:
        # serve_stream notices at its next write (a heartbeat at most) and returns.
        request.transport.close()


async def _session_lives(request: web.Request, session_id: str) -> bool:
    """Whether the session is live; True when it cannot be told (the database away): the
    stream is no worse off for lasting until the next look."""
    try:
        async with request.config_dict[ENGINE].connect() as conn:
            return await find_session(conn, session_id) is not None
    except Exception as error:
        log.warning("dashboard.stream_session_check_failed", error=type(error).__name__)
        return True
