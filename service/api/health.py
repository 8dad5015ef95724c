"""Liveness and readiness, for orchestrators and load balancers."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from aiohttp import web

from service.api.keys import ENGINE

READINESS_TIMEOUT_S = 2.0

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(_: web.Request) -> web.Response:
    """The process is up and serving; says nothing of its dependencies."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready when PostgreSQL answers; 503 otherwise, so traffic goes elsewhere."""
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_S):
            async with request.app[ENGINE].connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
    except Exception as error:  # any failure to reach the database means not ready
        body = {"status": "unavailable", "checks": {"database": f"{type(error).__name__}"}}
        return web.json_response(body, status=503)
    return web.json_response({"status": "ready", "checks": {"database": "ok"}})
