"""/v1/subscriptions: subscribe, look up, list, read events, cancel."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.api.auth import CLIENT
from service.api.body import read_json
from service.api.errors import ApiError, Conflict, ErrorDetail, NotFound
from service.api.keys import ENGINE, READ_ENGINE, SETTINGS, SUBSCRIBE_COMMITS
from service.api.operations import JSON_BODY_ERRORS, Answer, Param, json_answer, operation
from service.api.schemas import (
    AttemptList,
    BatchIn,
    BatchResult,
    EventList,
    ListQuery,
    StatusChangeList,
    SubscriptionIn,
    SubscriptionOut,
    SubscriptionPage,
    decode_cursor,
    encode_cursor,
    parse_body,
    parse_query,
    path_id,
    subscription_out,
)
from service.db import subscriptions as queries
from service.db.driver import driver_connection
from service.db.subscriptions import NewSubscription, Subscribed
from service.domain.access import Scope

routes = web.RouteTableDef()

# Whoever may call the API may read subscriptions.
READERS = (Scope.READ, Scope.WRITE, Scope.OPS)
TAG = "subscriptions"
SUBSCRIPTION_ID = {"id": Param({"type": "string", "format": "uuid"}, "the subscription's id")}


@routes.post("/v1/subscriptions")
@operation(
    "Subscribe to a package's tracking",
    tag=TAG,
    scopes=(Scope.WRITE,),
    body=SubscriptionIn,
    answers={
        202: Answer(SubscriptionOut, "The new subscription, `pending` its start"),
        200: Answer(SubscriptionOut, "The live subscription of the same package"),
    },
    errors=JSON_BODY_ERRORS,
)
async def subscribe(request: web.Request) -> web.Response:
    """202 with a new subscription; 200 with the live one when the package is tracked already."""
    new = parse_body(SubscriptionIn, await read_json(request)).to_domain(request[CLIENT])
    row, created = await request.app[SUBSCRIBE_COMMITS].submit(new)
    return json_answer(subscription_out(row), status=202 if created else 200)


@routes.post("/v1/subscriptions/batch")
@operation(
    "Subscribe to many packages at once",
    tag=TAG,
    scopes=(Scope.WRITE,),
    description="Items are validated one by one: an invalid one is a 422 in `results`.",
    body=BatchIn,
    answers={200: Answer(BatchResult, "Each item answered on its own, as the single form")},
    errors=JSON_BODY_ERRORS,
)
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
    # All the rows validated in one call into pydantic's core (a model_validate and
    # model_dump per row cost a third of the API's time in a batch).
    return json_answer(BatchResult.model_validate({"results": results}))


async def _create(request: web.Request, news: list[NewSubscription]) -> list[Subscribed]:
    async with request.app[ENGINE].begin() as conn:
        db = await driver_connection(conn)
        return await queries.subscribe(db, news, request.app[SETTINGS].rearm_policy)


@routes.get("/v1/subscriptions")
@operation(
    "List subscriptions, newest first",
    tag=TAG,
    scopes=READERS,
    query=ListQuery,
    answers={200: Answer(SubscriptionPage, "A page; pass `next_cursor` back as `cursor`")},
    errors=(400,),
)
async def list_subscriptions(request: web.Request) -> web.Response:
    query: ListQuery = parse_query(ListQuery, request.query)
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
    answer = {
        "items": [dict(row) for row in page],
        "next_cursor": encode_cursor(page[-1]) if more else None,
    }
    return json_answer(SubscriptionPage.model_validate(answer))


@routes.get("/v1/subscriptions/{id}")
@operation(
    "One subscription",
    tag=TAG,
    scopes=READERS,
    path_params=SUBSCRIPTION_ID,
    answers={200: Answer(SubscriptionOut, "The subscription")},
    errors=(404,),
)
async def get_subscription(request: web.Request) -> web.Response:
    subscription_id = subscription_id_of(request)
    async with request.app[ENGINE].connect() as conn:
        row = await queries.get_subscription(conn, subscription_id)
    if row is None:
        raise NotFound.resource("subscription")
    return json_answer(subscription_out(row))


@routes.get("/v1/subscriptions/{id}/events")
@operation(
    "Its tracking events, newest first",
    tag=TAG,
    scopes=READERS,
    path_params=SUBSCRIPTION_ID,
    answers={200: Answer(EventList, "The events")},
    errors=(404,),
)
async def list_events(request: web.Request) -> web.Response:
    """The tracking events filed against it, newest first."""
    return await _items_of_subscription(request, queries.list_events, EventList)


@routes.get("/v1/subscriptions/{id}/statuses")
@operation(
    "Every change of its status, newest first",
    tag=TAG,
    scopes=READERS,
    path_params=SUBSCRIPTION_ID,
    answers={200: Answer(StatusChangeList, "The status changes")},
    errors=(404,),
)
async def list_statuses(request: web.Request) -> web.Response:
    """Every change of its status, newest first: when at the carrier, when we learned it."""
    return await _items_of_subscription(request, queries.list_status_changes, StatusChangeList)


@routes.get("/v1/subscriptions/{id}/attempts")
@operation(
    "Every ShipEngine call made for it, newest first",
    tag=TAG,
    scopes=READERS,
    path_params=SUBSCRIPTION_ID,
    answers={200: Answer(AttemptList, "The calls")},
    errors=(404,),
)
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
    return json_answer(model.model_validate({"items": [dict(row) for row in rows]}))


@routes.post("/v1/subscriptions/{id}/retry")
@operation(
    "Retry a failed subscription",
    tag=TAG,
    scopes=(Scope.OPS,),
    path_params=SUBSCRIPTION_ID,
    answers={202: Answer(SubscriptionOut, "`pending` again, its start due at once")},
    errors=(404, 409),
)
async def retry_subscription(request: web.Request) -> web.Response:
    """202: a failed subscription is pending again, its start due at once."""
    subscription_id = subscription_id_of(request)
    async with request.app[ENGINE].begin() as conn:
        row = await queries.retry_failed(conn, subscription_id)
        if row is None:
            current = await queries.get_subscription(conn, subscription_id)
    if row is not None:
        return json_answer(subscription_out(row), status=202)
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
@operation(
    "Cancel a subscription",
    tag=TAG,
    scopes=(Scope.WRITE,),
    path_params=SUBSCRIPTION_ID,
    answers={202: Answer(SubscriptionOut, "Cancelled: `stopping` until ShipEngine is told")},
    errors=(404,),
)
async def cancel_subscription(request: web.Request) -> web.Response:
    """202: the stop is recorded; the dispatcher tells ShipEngine and then marks it stopped."""
    subscription_id = subscription_id_of(request)
    async with request.app[ENGINE].begin() as conn:
        row = await queries.request_stop(conn, subscription_id)
    if row is None:
        raise NotFound.resource("subscription")
    return json_answer(subscription_out(row), status=202)


def subscription_id_of(request: web.Request) -> uuid.UUID:
    return path_id(request, "subscription")
