"""/v1/subscriptions: subscribe, look up, list, read events, cancel."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Required

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from typing_extensions import TypedDict  # pydantic needs it rather than typing's before 3.12

from service.api.auth import CLIENT, requires
from service.api.body import read_json
from service.api.errors import ApiError, Conflict, ErrorDetail, NotFound
from service.api.keys import ENGINE, READ_ENGINE, SETTINGS, SUBSCRIBE_COMMITS
from service.api.schemas import (
    AttemptList,
    BatchIn,
    EventList,
    ListQuery,
    StatusChangeList,
    SubscriptionIn,
    SubscriptionOut,
    decode_cursor,
    encode_cursor,
    parse_body,
    parse_query,
    subscription_json,
)
from service.db import subscriptions as queries
from service.db.subscriptions import NewSubscription, Subscribed
from service.domain.access import Scope

routes = web.RouteTableDef()

# Whoever may call the API may read subscriptions.
READERS = (Scope.READ, Scope.WRITE, Scope.OPS)


@routes.post("/v1/subscriptions")
@requires(Scope.WRITE)
async def subscribe(request: web.Request) -> web.Response:
    """202 with a new subscription; 200 with the live one when the package is tracked already."""
    new = parse_body(SubscriptionIn, await read_json(request)).to_domain(request[CLIENT])
    row, created = await request.app[SUBSCRIBE_COMMITS].submit(new)
    return web.json_response(subscription_json(row), status=202 if created else 200)


@routes.post("/v1/subscriptions/batch")
@requires(Scope.WRITE)
async def subscribe_many(request: web.Request) -> web.Response:
    """Up to 1,000 at once, each validated and answered on its own, like the single form:
    `{"results": [{"index", "status": 202|200|422, "subscription"|"errors"}]}`."""
    batch: BatchIn = parse_body(BatchIn, await read_json(request))
    results: list[dict[str, Any]] = [{} for _ in batch.subscriptions]
    valid: list[tuple[int, NewSubscription]] = []
    for index, item in enumerate(batch.subscriptions):
        try:
            new = parse_body(SubscriptionIn, item).to_domain(request[CLIENT])
        except ApiError as invalid:
            results[index] = {
                "index": index,
                "status": invalid.status,
                "errors": [detail.as_json() for detail in invalid.details],
            }
            continue
        valid.append((index, new))
    created = await _create(request, [new for _, new in valid]) if valid else []
    for (index, _), (row, is_new) in zip(valid, created, strict=True):
        status = 202 if is_new else 200
        results[index] = {"index": index, "status": status, "subscription": dict(row)}
    # Serialised as subscription_json does, but a thousand at once in pydantic's core: one
    # model_validate and model_dump per row cost a third of the API's time in a batch.
    body = _BATCH_ANSWER.dump_json(_BATCH_ANSWER.validate_python({"results": results}))
    return web.Response(body=body, content_type="application/json")


class _BatchItem(TypedDict, total=False):
    index: Required[int]
    status: Required[int]
    subscription: SubscriptionOut  # 200 and 202
    errors: list[dict[str, Any]]  # 422


_BATCH_ANSWER = TypeAdapter(dict[str, list[_BatchItem]])


async def _create(request: web.Request, news: list[NewSubscription]) -> list[Subscribed]:
    async with request.app[ENGINE].begin() as conn:
        return await queries.subscribe(conn, news, request.app[SETTINGS].rearm_policy)


@routes.get("/v1/subscriptions")
@requires(*READERS)
async def list_subscriptions(request: web.Request) -> web.Response:
    query: ListQuery = parse_query(ListQuery, dict(request.query))
    after = decode_cursor(query.cursor) if query.cursor else None
    where = queries.SubscriptionFilter(
        state=query.state.value if query.state else None,
        status_code=query.status_code,
        carrier_code=query.carrier_code,
        tracking_number=query.tracking_number,
        created_by=query.created_by,
    )
    async with request.app[READ_ENGINE].connect() as conn:
        rows = await queries.list_subscriptions(conn, where, query.limit + 1, after)
    page, more = rows[: query.limit], len(rows) > query.limit
    return web.json_response(
        {
            "items": [subscription_json(row) for row in page],
            "next_cursor": encode_cursor(page[-1]) if more else None,
        }
    )


@routes.get("/v1/subscriptions/{id}")
@requires(*READERS)
async def get_subscription(request: web.Request) -> web.Response:
    subscription_id = subscription_id_of(request)
    async with request.app[ENGINE].connect() as conn:
        row = await queries.get_subscription(conn, subscription_id)
    if row is None:
        raise NotFound.resource("subscription")
    return web.json_response(subscription_json(row))


@routes.get("/v1/subscriptions/{id}/events")
@requires(*READERS)
async def list_events(request: web.Request) -> web.Response:
    """The tracking events filed against it, newest first."""
    return await _items_of_subscription(request, queries.list_events, EventList)


@routes.get("/v1/subscriptions/{id}/statuses")
@requires(*READERS)
async def list_statuses(request: web.Request) -> web.Response:
    """Every change of its status, newest first: when at the carrier, when we learned it."""
    return await _items_of_subscription(request, queries.list_status_changes, StatusChangeList)


@routes.get("/v1/subscriptions/{id}/attempts")
@requires(*READERS)
async def list_attempts(request: web.Request) -> web.Response:
    """Every ShipEngine call made for it, newest first: what happened when we tried."""
    return await _items_of_subscription(request, queries.list_attempts, AttemptList)


async def _items_of_subscription(
    request: web.Request,
    fetch: Callable[[AsyncConnection, uuid.UUID], Awaitable[list[RowMapping]]],
    model: type[BaseModel],
) -> web.Response:
    subscription_id = subscription_id_of(request)
    async with request.app[ENGINE].connect() as conn:
        if await queries.get_subscription(conn, subscription_id) is None:
            raise NotFound.resource("subscription")
        rows = await fetch(conn, subscription_id)
    document = model.model_validate({"items": [dict(row) for row in rows]})
    return web.json_response(document.model_dump(mode="json"))


@routes.post("/v1/subscriptions/{id}/retry")
@requires(Scope.OPS)
async def retry_subscription(request: web.Request) -> web.Response:
    """202: a failed subscription is pending again, its start due at once."""
    subscription_id = subscription_id_of(request)
    async with request.app[ENGINE].begin() as conn:
        row = await queries.retry_failed(conn, subscription_id)
        if row is None:
            current = await queries.get_subscription(conn, subscription_id)
    if row is not None:
        return web.json_response(subscription_json(row), status=202)
    if current is None:
        raise NotFound.resource("subscription")
    raise Conflict(
        ErrorDetail(
            "business_rules",
            "invalid_status",
            f"only a failed subscription can be retried; this one is {current['state']}",
        )
    )


@routes.delete("/v1/subscriptions/{id}")
@requires(Scope.WRITE)
async def cancel_subscription(request: web.Request) -> web.Response:
    """202: the stop is recorded; the dispatcher tells ShipEngine and then marks it stopped."""
    subscription_id = subscription_id_of(request)
    async with request.app[ENGINE].begin() as conn:
        row = await queries.request_stop(conn, subscription_id)
    if row is None:
        raise NotFound.resource("subscription")
    return web.json_response(subscription_json(row), status=202)


def subscription_id_of(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        # Not an id this service could have issued, so there is no such subscription.
        raise NotFound.resource("subscription") from None
