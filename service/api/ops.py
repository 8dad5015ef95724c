"""/v1/ops: the summary, what is stuck or failing, one subscription's timeline, and the levers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.api.auth import CLIENT, requires
from service.api.body import read_json
from service.api.errors import NotFound
from service.api.keys import ENGINE, READ_ENGINE
from service.api.schemas import parse_body, parse_query, subscription_json
from service.api.subscriptions import READERS, subscription_id_of
from service.db import dispatch, ops
from service.db.subscriptions import get_subscription
from service.domain.access import Scope

routes = web.RouteTableDef()

# The summary is a handful of grouped counts over every subscription; dashboards poll it, so
# each process recounts it at most this often, and never while a caller waits but the first
# ("as_of" says when it was counted).
SUMMARY_TTL_S = 5.0
SUMMARY = web.AppKey("ops_summary", dict)

Text = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class StuckQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # At most 100 years back: further is past what PostgreSQL's timestamps hold.
    pending_minutes: float = Field(default=15, gt=0, le=100 * 365 * 24 * 60)
    silent_hours: float = Field(default=24, gt=0, le=100 * 365 * 24)
    limit: int = Field(default=50, ge=1, le=500)


class FailuresQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_code: int = Field(default=5, ge=0, le=100)


class BulkRetry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_code: Text | None = None
    carrier_code: Text | None = None
    created_by: Text | None = None
    dry_run: bool = False


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]


@routes.get("/v1/ops/summary")
@requires(*READERS)
async def summary(request: web.Request) -> web.Response:
    """Served from memory: only the first request of a process waits for the counts; later
    ones get the last copy at once while a stale one is recounted in the background."""
    cached: dict[str, Any] = request.app[SUMMARY]
    if "document" not in cached:
        await _recount(request.app)
    elif cached["expires"] < time.monotonic() and not cached.get("recounting"):
        cached["recounting"] = asyncio.create_task(_recount(request.app))
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


@routes.get("/v1/subscriptions/{id}/timeline")
@requires(*READERS)
async def timeline(request: web.Request) -> web.Response:
    subscription_id = subscription_id_of(request)
    async with request.app[ENGINE].connect() as conn:
        if await get_subscription(conn, subscription_id) is None:
            raise NotFound.resource("subscription")
        entries = await ops.timeline(conn, subscription_id)
    items = [{**entry, "at": entry["at"].isoformat()} for entry in entries]
    return web.json_response({"items": items})


@routes.get("/v1/ops/stuck")
@requires(*READERS)
async def stuck(request: web.Request) -> web.Response:
    query: StuckQuery = parse_query(StuckQuery, dict(request.query))
    limits = ops.StuckLimits(
        pending_for=timedelta(minutes=query.pending_minutes),
        silent_for=timedelta(hours=query.silent_hours),
        limit=query.limit,
    )
    async with request.app[READ_ENGINE].connect() as conn:
        found = await ops.stuck(conn, limits)
    return web.json_response(
        {name: [subscription_json(row) for row in rows] for name, rows in found.items()}
    )


@routes.get("/v1/ops/failures")
@requires(*READERS)
async def failures(request: web.Request) -> web.Response:
    query: FailuresQuery = parse_query(FailuresQuery, dict(request.query))
    async with request.app[READ_ENGINE].connect() as conn:
        groups = await ops.failures(conn, query.per_code)
    return web.json_response(
        {
            "by_error_code": {
                code: {
                    "count": group["count"],
                    "examples": [subscription_json(row) for row in group["examples"]],
                }
                for code, group in groups.items()
            }
        }
    )


@routes.post("/v1/ops/retry")
@requires(Scope.OPS)
async def retry_many(request: web.Request) -> web.Response:
    """Retry every failed subscription matching the filter; `dry_run` only counts them."""
    wanted: BulkRetry = parse_body(BulkRetry, await read_json(request))
    where = ops.FailedFilter(wanted.error_code, wanted.carrier_code, wanted.created_by)
    async with request.app[ENGINE].begin() as conn:
        count = await ops.retry_failed_many(conn, where, wanted.dry_run)
    return web.json_response({"dry_run": wanted.dry_run, "matched": count})


@routes.post("/v1/ops/dispatch/pause")
@requires(Scope.OPS)
async def pause(request: web.Request) -> web.Response:
    """Stop all dispatching, every instance, until resumed (subscriptions are still taken)."""
    wanted: PauseRequest = parse_body(PauseRequest, await read_json(request))
    reason = {"message": wanted.reason, "by": request[CLIENT]}
    async with request.app[ENGINE].begin() as conn:
        await dispatch.pause_by_hand(conn, reason)
    return web.json_response({"paused": True, "kind": "manual", "reason": reason})


@routes.post("/v1/ops/dispatch/resume")
@requires(Scope.OPS)
async def resume(request: web.Request) -> web.Response:
    async with request.app[ENGINE].begin() as conn:
        await dispatch.resume(conn)
    return web.json_response({"paused": False})
