"""Liveness and readiness, for orchestrators and load balancers."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from service.api.errors import retry_later
from service.api.keys import ENGINE, METRICS
from service.api.metrics_access import refusal
from service.api.operations import Answer, json_answer, operation
from service.db.dispatch import current_pause
from service.domain.access import Scope
from service.metrics import CONTENT_TYPE

READINESS_TIMEOUT_S = 2.0

routes = web.RouteTableDef()
TAG = "health"


class Health(BaseModel):
    status: Literal["ok"]


class DispatchState(BaseModel):
    paused: bool
    kind: str | None = Field(default=None, description="`account`, `rate_limit` or `manual`")
    until: datetime | None = None
    reason: dict[str, Any] | None = None


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    dispatch: DispatchState | None = Field(default=None, description="only when ready")


@routes.get("/healthz")
@operation("Liveness: the process serves", tag=TAG, answers={200: Answer(Health, "Serving")})
async def healthz(_: web.Request) -> web.Response:
    """The process is up and serving; says nothing of its dependencies."""
    return json_answer(Health(status="ok"))


@routes.get("/readyz")
@operation(
    "Readiness: PostgreSQL answers; shows a dispatch pause",
    tag=TAG,
    answers={
        200: Answer(Readiness, "Ready"),
        503: Answer(Readiness, "The database is unreachable"),
    },
)
async def readyz(request: web.Request) -> web.Response:
    """Ready when PostgreSQL answers; 503 otherwise, so traffic goes elsewhere.

    A dispatch pause is shown but does not make the API unready: it still takes subscriptions
    and webhooks, which is exactly what must go on while ShipEngine refuses our calls.
    """
    # Answered as dicts, not as a Readiness: that would write the fields left out here as
    # null, and `until` with `Z` where these answers always had `+00:00`.
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_S):
            async with request.app[ENGINE].connect() as conn:
                pause = await current_pause(conn)
    except Exception as error:  # any failure to reach the database means not ready
        body = {"status": "unavailable", "checks": {"database": f"{type(error).__name__}"}}
        return retry_later(web.json_response(body, status=503))
    dispatch: dict[str, object] = {"paused": pause is not None}
    if pause is not None:
        dispatch |= {"kind": pause.kind, "until": pause.until.isoformat(), "reason": pause.reason}
    return web.json_response(
        {"status": "ready", "checks": {"database": "ok"}, "dispatch": dispatch}
    )


@routes.get("/metrics")
@operation(
    "Prometheus metrics",
    tag=TAG,
    # Checked below, not by `authenticate`: a dispatcher serves it too.
    scopes=(Scope.METRICS,),
    answers={200: Answer(None, "Prometheus' text format", CONTENT_TYPE.split(";")[0])},
)
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format, to a token with the `metrics` scope; shared gauges are read
    fresh from the database."""
    refused = await refusal(request)
    if refused is not None:
        return refused
    registry = request.app[METRICS]
    with contextlib.suppress(Exception):  # counters still serve while the database is away
        async with asyncio.timeout(READINESS_TIMEOUT_S):
            async with request.app[ENGINE].connect() as conn:
                await registry.refresh_shared(conn)
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE})
