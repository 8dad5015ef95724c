"""/v1/changes: the change feed, paged (here) and streamed (`service/api/change_stream.py`).

A cursor is a feed position (`service/db/changes.py`) written as 32 hex digits: opaque to
callers, checked strictly when it comes back.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from aiohttp import web
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.api.errors import BadRequest, ErrorDetail, Gone
from service.api.keys import ENGINE
from service.api.operations import Answer, json_answer, operation
from service.api.schemas import ChangeOut, ChangePage, ChangesQuery, parse_query
from service.api.subscriptions import READERS
from service.db import changes as feed
from service.db.changes import ChangeFilter, Position

routes = web.RouteTableDef()

TAG = "changes"
_CURSOR = re.compile(r"[0-9a-f]{32}", re.ASCII)
_HALF = 16


@routes.get("/v1/changes")
@operation(
    "Read the change feed, in commit order",
    tag=TAG,
    scopes=READERS,
    query=ChangesQuery,
    description=(
        "Every change of a subscription that callers can see, exactly once, in the order the "
        "changes committed. Pass `next_cursor` back as `after` to continue exactly where a page "
        "ended; on an empty page it is the position to poll from. A cursor older than the "
        "feed's retention is a 410: start again without `after`."
    ),
    answers={200: Answer(ChangePage, "A page; `next_cursor` is always set")},
    errors=(400, 410),
)
async def read_changes(request: web.Request) -> web.Response:
    query: ChangesQuery = parse_query(ChangesQuery, request.query)
    after = decode_cursor(query.after) if query.after is not None else None
    async with feed.snapshot(request.app[ENGINE]) as conn:
        page = await read_page(conn, after, query.limit, change_filter(query))
    answer = ChangePage(
        items=[change_out(row) for row in page.changes], next_cursor=encode_cursor(page.next)
    )
    return json_answer(answer)


async def read_page(
    conn: AsyncConnection, after: Position | None, limit: int, where: ChangeFilter
) -> feed.FeedPage:
    """`feed.read`, with an expired cursor answered as the 410 it is."""
    with cursor_errors():
        return await feed.read(conn, after, limit, where)


@contextlib.contextmanager
def cursor_errors() -> Iterator[None]:
    """A cursor from another server answered as a 400, one retention passed as a 410."""
    try:
        yield
    except feed.CursorUnknown:
        raise BadRequest.invalid(
            "after: not a cursor this feed gave (after a restore into another server, read "
            "again without `after`)",
            "after",
        ) from None
    except feed.CursorExpired:
        raise Gone(
            ErrorDetail(
                "validation",
                "cursor_expired",
                "after: changes after this cursor were deleted by retention; read again "
                "without `after` (from the oldest change kept)",
                "after",
            )
        ) from None


def change_filter(query: ChangesQuery) -> ChangeFilter:
    return ChangeFilter(
        types=frozenset(query.type or ()),
        subscription_id=query.subscription_id,
        created_by=query.created_by,
    )


def change_out(row: RowMapping) -> ChangeOut:
    """A change as callers see it: what it kept, with what never changes of its subscription."""
    return ChangeOut.model_validate(
        {
            "id": f"chg_{row['id']}",
            "type": row["type"],
            "subscription_id": row["subscription_id"],
            "sequence": row["sequence"],
            "occurred_at": row["occurred_at"],
            "data": {
                "id": row["subscription_id"],
                "carrier_code": row["carrier_code"],
                "tracking_number": row["tracking_number"],
                "carrier_id": row["carrier_id"],
                "reference": row["reference"],
                "metadata": row["metadata"],
                "state": row["state"],
                "status_code": row["status_code"],
                "status_description": row["status_description"],
                "estimated_delivery_date": row["estimated_delivery_date"],
                "actual_delivery_date": row["actual_delivery_date"],
                "last_event_at": row["last_event_at"],
                "last_error": row["last_error"],
                "created_by": row["created_by"],
                "created_at": row["created_at"],
                "updated_at": row["occurred_at"],
                "previous_status_code": row["previous_status_code"],
                "newest_event": row["newest_event"],
            },
        }
    )


def encode_cursor(position: Position) -> str:
    return f"{position.txid:016x}{position.change_id:016x}"


def decode_cursor(cursor: str, name: str = "after") -> Position:
    if not _CURSOR.fullmatch(cursor):
        raise BadRequest.invalid(f"{name} is not a cursor this feed gave", name)
    position = Position(int(cursor[:_HALF], 16), int(cursor[_HALF:], 16))
    if max(position) >= 2**63:
        raise BadRequest.invalid(f"{name} is not a cursor this feed gave", name)
    return position
