"""/v1/ops: the summary, what is stuck or failing, one subscription's timeline, and the levers."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.api.auth import CLIENT
from service.api.body import read_json
from service.api.errors import NotFound
from service.api.keys import ENGINE, READ_ENGINE
from service.api.operations import JSON_BODY_ERRORS, Answer, json_answer, operation
from service.api.schemas import QueryInt, SubscriptionOut, parse_body, parse_query
from service.api.subscriptions import READERS, SUBSCRIPTION_ID, subscription_id_of
from service.db import dispatch, ops
from service.db.subscriptions import get_subscription
from service.domain.access import Scope

routes = web.RouteTableDef()

# The summary is a handful of grouped counts over every subscription; dashboards poll it, so
# each process recounts it at most this often, and never while a caller waits but the first
# ("as_of" says when it was counted).
SUMMARY_TTL_S = 5.0
SUMMARY = web.AppKey("ops_summary", dict)

TAG = "ops"

Text = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class StuckQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # At most 100 years back: further is past what PostgreSQL's timestamps hold.
    pending_minutes: float = Field(default=15, gt=0, le=100 * 365 * 24 * 60)
    silent_hours: float = Field(default=24, gt=0, le=100 * 365 * 24)
    limit: QueryInt = Field(default=50, ge=1, le=500)


class FailuresQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_code: QueryInt = Field(default=5, ge=0, le=100)


class BulkRetry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_code: Text | None = None
    carrier_code: Text | None = None
    created_by: Text | None = None
    dry_run: bool = False


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]


class DispatchSummary(BaseModel):
    backlog: int
    oldest_due_s: float
    paused: bool
    pause_kind: str | None
    pause_reason: dict[str, Any] | None


class DisabledEndpoint(BaseModel):
    id: uuid.UUID
    created_by: str
    disabled_reason: str | None
    since: datetime


class NotificationsSummary(BaseModel):
    endpoints: dict[str, int] = Field(description="by state: enabled, disabled")
    queued: int = Field(description="notifications waiting to be sent, to any endpoint")
    disabled: list[DisabledEndpoint] = Field(
        description="endpoints the sender disabled (a 410, or a message's last retry failed), "
        "newest first, at most 20; `POST /v1/endpoints/{id}/enable` resumes one"
    )


class OpsSummary(BaseModel):
    by_state: dict[str, int]
    by_status_code: dict[str, int]
    by_carrier: dict[str, int]
    dispatch: DispatchSummary
    failures_by_error_code: dict[str, int]
    deliveries_last_hour: dict[str, int] = Field(
        description="by outcome; refusals as `refused:<reason>`"
    )
    refusals_unstored_last_hour: dict[str, int] = Field(
        description="refused webhooks counted but not stored (past the sample), by reason"
    )
    notifications: NotificationsSummary
    as_of: datetime


class TimelineEntry(BaseModel):
    at: datetime
    kind: Literal["created", "start_attempt", "stop_attempt", "webhook", "poll", "status_change"]
    detail: dict[str, Any]


class Timeline(BaseModel):
    items: list[TimelineEntry]


class Stuck(BaseModel):
    pending: list[SubscriptionOut]
    silent: list[SubscriptionOut]


class FailureGroup(BaseModel):
    count: int
    examples: list[SubscriptionOut]


class Failures(BaseModel):
    by_error_code: dict[str, FailureGroup]


class BulkRetryResult(BaseModel):
    dry_run: bool
    matched: int


class PauseReason(BaseModel):
    message: str
    by: str = Field(description="the client whose token paused it")


class Paused(BaseModel):
    paused: Literal[True]
    kind: Literal["manual"]
    reason: PauseReason


class Resumed(BaseModel):
    paused: Literal[False]


@routes.get("/v1/subscriptions/{id}/timeline")
@operation(
    "Everything that happened to it, in order",
    tag=TAG,
    scopes=READERS,
    path_params=SUBSCRIPTION_ID,
    answers={200: Answer(Timeline, "The timeline")},
    errors=(404,),
)
async def timeline(request: web.Request) -> web.Response:
    subscription_id = subscription_id_of(request)
    async with request.app[ENGINE].connect() as conn:
        if await get_subscription(conn, subscription_id) is None:
            raise NotFound.resource("subscription")
        entries = await ops.timeline(conn, subscription_id)
    # A dict, not a Timeline: `at` as `isoformat` writes it (`+00:00`), where pydantic writes
    # `Z`; its answers always had the former.
    items = [{**entry, "at": entry["at"].isoformat()} for entry in entries]
    return web.json_response({"items": items})


@routes.get("/v1/ops/summary")
@operation(
    "Counts by state, status and carrier; the dispatch backlog and pause",
    tag=TAG,
    scopes=READERS,
    answers={200: Answer(OpsSummary, "The summary, computed at most every 5 s (`as_of`)")},
)
async def summary(request: web.Request) -> web.Response:
    """Served from memory: only the first request of a process waits for the counts; later
    ones get the last copy at once while a stale one is recounted in the background."""
    cached: dict[str, Any] = request.app[SUMMARY]
    if "document" not in cached:
        await _recount(request.app)
    elif cached["expires"] < time.monotonic() and not cached.get("recounting"):
        cached["recounting"] = asyncio.create_task(_recount(request.app))
    # The counts as service/db/ops.py made them, not an OpsSummary: the model would write
    # `as_of` otherwise (`Z` for `+00:00`).
    return web.json_response(cached["document"])


async def stop_recounting(app: web.Application) -> None:
    """on_cleanup: a recount still running is abandoned with the process."""
    task = app[SUMMARY].get("recounting")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _recount(app: web.Application) -> None:
    cached: dict[str, Any] = app[SUMMARY]
    try:
        async with app[READ_ENGINE].connect() as conn:
            document = await ops.summary(conn)
            document["as_of"] = (await dispatch.database_now(conn)).isoformat()
        cached.update(document=document, expires=time.monotonic() + SUMMARY_TTL_S)
    finally:
        cached.pop("recounting", None)


@routes.get("/v1/ops/stuck")
@operation(
    "Subscriptions pending too long, and active ones silent too long",
    tag=TAG,
    scopes=READERS,
    query=StuckQuery,
    answers={200: Answer(Stuck, "The stuck subscriptions")},
    errors=(400,),
)
async def stuck(request: web.Request) -> web.Response:
    query: StuckQuery = parse_query(StuckQuery, request.query)
    limits = ops.StuckLimits(
        pending_for=timedelta(minutes=query.pending_minutes),
        silent_for=timedelta(hours=query.silent_hours),
        limit=query.limit,
    )
    async with request.app[READ_ENGINE].connect() as conn:
        found = await ops.stuck(conn, limits)
    answer = {name: [dict(row) for row in rows] for name, rows in found.items()}
    return json_answer(Stuck.model_validate(answer))


@routes.get("/v1/ops/failures")
@operation(
    "Failed subscriptions grouped by error code, with examples",
    tag=TAG,
    scopes=READERS,
    query=FailuresQuery,
    answers={200: Answer(Failures, "The groups")},
    errors=(400,),
)
async def failures(request: web.Request) -> web.Response:
    query: FailuresQuery = parse_query(FailuresQuery, request.query)
    async with request.app[READ_ENGINE].connect() as conn:
        groups = await ops.failures(conn, query.per_code)
    by_error_code = {
        code: {"count": group["count"], "examples": [dict(row) for row in group["examples"]]}
        for code, group in groups.items()
    }
    return json_answer(Failures.model_validate({"by_error_code": by_error_code}))


@routes.post("/v1/ops/retry")
@operation(
    "Retry every failed subscription matching a filter",
    tag=TAG,
    scopes=(Scope.OPS,),
    body=BulkRetry,
    answers={200: Answer(BulkRetryResult, "How many matched (and were retried unless `dry_run`)")},
    errors=JSON_BODY_ERRORS,
)
async def retry_many(request: web.Request) -> web.Response:
    """Retry every failed subscription matching the filter; `dry_run` only counts them."""
    wanted: BulkRetry = parse_body(BulkRetry, await read_json(request))
    where = ops.FailedFilter(wanted.error_code, wanted.carrier_code, wanted.created_by)
    async with request.app[ENGINE].begin() as conn:
        count = await ops.retry_failed_many(conn, where, wanted.dry_run)
    return json_answer(BulkRetryResult(dry_run=wanted.dry_run, matched=count))


@routes.post("/v1/ops/dispatch/pause")
@operation(
    "Pause all dispatching, every instance",
    tag=TAG,
    scopes=(Scope.OPS,),
    body=PauseRequest,
    answers={200: Answer(Paused, "Paused by hand")},
    errors=JSON_BODY_ERRORS,
)
async def pause(request: web.Request) -> web.Response:
    """Stop all dispatching, every instance, until resumed (subscriptions are still taken)."""
    wanted: PauseRequest = parse_body(PauseRequest, await read_json(request))
    reason = PauseReason(message=wanted.reason, by=request[CLIENT])
    async with request.app[ENGINE].begin() as conn:
        await dispatch.pause_by_hand(conn, reason.model_dump())
    return json_answer(Paused(paused=True, kind="manual", reason=reason))


@routes.post("/v1/ops/dispatch/resume")
@operation(
    "Resume dispatching", tag=TAG, scopes=(Scope.OPS,), answers={200: Answer(Resumed, "Resumed")}
)
async def resume(request: web.Request) -> web.Response:
    async with request.app[ENGINE].begin() as conn:
        await dispatch.resume(conn)
    return json_answer(Resumed(paused=False))
