"""The pages ops read: summary, subscriptions, one subscription, failures, stuck, deliveries."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from yarl import URL

from service.api.errors import BadRequest
from service.api.keys import ENGINE, READ_ENGINE
from service.api.ops import SUMMARY_TTL_S, StuckQuery
from service.api.schemas import ListQuery, decode_cursor, encode_cursor, parse_query
from service.dashboard.charts import STATE_COLORS, BarChart, bar_chart
from service.dashboard.keys import SUMMARY
from service.dashboard.render import HOME, Refused, page, redirect
from service.db import dispatch, ops
from service.db.dashboard import DeliveryFilter, recent_deliveries
from service.db.subscriptions import (
    SubscriptionFilter,
    get_subscription,
    list_events,
    list_subscriptions,
)
from service.db.tables import BIGINT_MAX
from service.domain.deliveries import DeliveryOutcome
from service.domain.subscriptions import SubscriptionState

routes = web.RouteTableDef()

STATES = [state.value for state in SubscriptionState]
FAILURE_EXAMPLES = 10
NO_ERROR_CODE = "none"  # how ops.failures names failures without an error code
SUBSCRIPTIONS = "/dashboard/subscriptions"


class DeliveriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: DeliveryOutcome | None = None
    tracking_number: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    limit: int = Field(default=50, ge=1, le=500)
    before: int | None = Field(default=None, ge=1, le=BIGINT_MAX)


@routes.get("")
async def summary(request: web.Request) -> web.Response:
    document = await _summary(request)
    context = {"summary": document, "charts": summary_charts(document), "section": "summary"}
    return page(request, "summary.html", context, refresh=True)


@routes.get("/")
async def slash(request: web.Request) -> web.Response:
    return redirect(HOME)


@routes.get("/subscriptions")
async def subscriptions(request: web.Request) -> web.Response:
    filters = _filled(request)
    context: dict[str, Any] = {"filters": filters, "states": STATES, "section": "subscriptions"}
    try:
        query: ListQuery = parse_query(ListQuery, filters)
        after = decode_cursor(query.cursor) if query.cursor else None
    except BadRequest as error:
        errors = [detail.message for detail in error.details]
        return page(request, "subscriptions.html", context | {"errors": errors}, status=400)
    async with request.config_dict[READ_ENGINE].connect() as conn:
        rows = await list_subscriptions(conn, _where(query), query.limit + 1, after)
    shown = rows[: query.limit]
    more = len(rows) > query.limit
    next_url = str(request.rel_url.update_query(cursor=encode_cursor(shown[-1]))) if more else None
    context |= {"rows": shown, "next_url": next_url, "errors": []}
    return page(request, "subscriptions.html", context, refresh=True)


@routes.get("/subscriptions/{id}")
async def subscription(request: web.Request) -> web.Response:
    subscription_id = subscription_id_of(request)
    async with request.config_dict[ENGINE].connect() as conn:
        row = await get_subscription(conn, subscription_id)
        if row is None:
            raise Refused(404, "There is no such subscription.")
        timeline = await ops.timeline(conn, subscription_id)
        events = await list_events(conn, subscription_id)
    context = {"s": row, "timeline": timeline, "events": events, "section": "subscriptions"}
    return page(request, "subscription.html", context, refresh=True)


@routes.get("/failures")
async def failures(request: web.Request) -> web.Response:
    async with request.config_dict[READ_ENGINE].connect() as conn:
        groups = await ops.failures(conn, FAILURE_EXAMPLES)
    context = {"groups": groups, "no_error_code": NO_ERROR_CODE, "section": "failures"}
    return page(request, "failures.html", context, refresh=True)


@routes.get("/stuck")
async def stuck(request: web.Request) -> web.Response:
    filters = _filled(request)
    context: dict[str, Any] = {"filters": filters, "section": "stuck"}
    try:
        query: StuckQuery = parse_query(StuckQuery, filters)
    except BadRequest as error:
        errors = [detail.message for detail in error.details]
        return page(request, "stuck.html", context | {"errors": errors}, status=400)
    limits = ops.StuckLimits(
        pending_for=timedelta(minutes=query.pending_minutes),
        silent_for=timedelta(hours=query.silent_hours),
        limit=query.limit,
    )
    async with request.config_dict[READ_ENGINE].connect() as conn:
        found = await ops.stuck(conn, limits)
    context |= {"query": query, "found": found, "errors": []}
    return page(request, "stuck.html", context, refresh=True)


@routes.get("/deliveries")
async def deliveries(request: web.Request) -> web.Response:
    filters = _filled(request)
    context: dict[str, Any] = {
        "filters": filters,
        "section": "deliveries",
        "Outcome": DeliveryOutcome,
    }
    try:
        query: DeliveriesQuery = parse_query(DeliveriesQuery, filters)
    except BadRequest as error:
        errors = [detail.message for detail in error.details]
        return page(request, "deliveries.html", context | {"errors": errors}, status=400)
    where = DeliveryFilter(query.outcome, query.tracking_number)
    async with request.config_dict[READ_ENGINE].connect() as conn:
        rows = await recent_deliveries(conn, where, query.limit + 1, query.before)
    shown = rows[: query.limit]
    more = len(rows) > query.limit
    older_url = str(request.rel_url.update_query(before=shown[-1]["id"])) if more else None
    context |= {"rows": shown, "older_url": older_url, "errors": []}
    return page(request, "deliveries.html", context, refresh=True)


def subscription_id_of(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise Refused(404, "There is no such subscription.") from None


def summary_charts(document: dict[str, Any]) -> list[BarChart]:
    """The summary's counts as bars, each linking to the page that lists what it counts."""
    return [
        bar_chart(
            "Subscriptions by state",
            document["by_state"],
            order=STATES,
            colors=STATE_COLORS,
            link=lambda state: _list_url(state=state),
        ),
        bar_chart(
            "Failed, by error code",
            document["failures_by_error_code"],
            link=lambda code: str(URL("/dashboard/failures").with_fragment(f"code-{code}")),
        ),
        bar_chart(
            "By status code",
            document["by_status_code"],
            link=lambda code: _list_url(status_code=code) if 0 < len(code) <= 8 else None,
        ),
        bar_chart(
            "By carrier",
            document["by_carrier"],
            link=lambda carrier: _list_url(carrier_code=carrier),
        ),
        bar_chart(
            "Webhook deliveries, last hour",
            document["deliveries_last_hour"],
            link=lambda outcome: _deliveries_url(outcome.partition(":")[0]),
        ),
    ]


async def _summary(request: web.Request) -> dict[str, Any]:
    """Computed at most every SUMMARY_TTL_S per process, like /v1/ops/summary."""
    cache = request.config_dict[SUMMARY]
    if cache.document is None or cache.expires < time.monotonic():
        async with request.config_dict[READ_ENGINE].connect() as conn:
            document = await ops.summary(conn)
            document["as_of"] = await dispatch.database_now(conn)
        cache.document, cache.expires = document, time.monotonic() + SUMMARY_TTL_S
    return cache.document


def _filled(request: web.Request) -> dict[str, str]:
    """The query's fields that have a value: an empty search field filters nothing."""
    return {key: value.strip() for key, value in request.query.items() if value.strip()}


def _where(query: ListQuery) -> SubscriptionFilter:
    return SubscriptionFilter(
        state=query.state.value if query.state else None,
        status_code=query.status_code,
        carrier_code=query.carrier_code,
        tracking_number=query.tracking_number,
        created_by=query.created_by,
    )


def _list_url(**filters: str) -> str:
    return str(URL(SUBSCRIPTIONS).with_query(filters))


def _deliveries_url(outcome: str) -> str:
    return str(URL("/dashboard/deliveries").with_query(outcome=outcome))
