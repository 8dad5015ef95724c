"""The simulator's aiohttp app: routes, the /v1 middlewares and the delivery client session."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from service.simulator import admin, api, errors
from service.simulator.appkeys import SIMULATOR
from service.simulator.config import SimulatorConfig
from service.simulator.errors import ApiError
from service.simulator.records import CallRecord
from service.simulator.simulator import Simulator

__all__ = ["SIMULATOR", "create_simulator_app"]

log = structlog.stdlib.get_logger(__name__)


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/v1/") or request.path == "/v1"


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def _from_http_exception(error: web.HTTPException) -> ApiError:
    if error.status == 404:
        return errors.not_found("The requested resource was not found.")
    return ApiError(
        error.status,
        error_source="shipengine",
        error_type="validation",
        error_code="invalid_field_value" if error.status < 500 else "unspecified",
        message=error.reason,
    )


@web.middleware
async def _record_calls(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: the call log holds the status the client really got."""
    if not _is_api(request):
        return await handler(request)
    at = time.time()
    response = await handler(request)
    call = CallRecord(at, request.method, request.path, dict(request.query), response.status)
    request.app[SIMULATOR].calls.append(call)
    return response


@web.middleware
async def _add_latency(request: web.Request, handler: Handler) -> web.StreamResponse:
    latency_s = request.app[SIMULATOR].config.latency_s
    if _is_api(request) and latency_s > 0:
        await asyncio.sleep(latency_s)
    return await handler(request)


@web.middleware
async def _render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error, ours or aiohttp's, leaves in ShipEngine's JSON error shape."""
    try:
        return await handler(request)
    except ApiError as error:
        return _error_response(error)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error_response(_from_http_exception(error))
    except Exception:
        log.exception("simulator_handler_failed", method=request.method, path=request.path)
        return _error_response(errors.unspecified())


@web.middleware
async def _check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _is_api(request):
        expected = request.app[SIMULATOR].config.api_key.encode()
        given = request.headers.get("API-Key", "").encode()
        if not hmac.compare_digest(given, expected):
            raise errors.unauthorized()
    return await handler(request)


async def _delivery_session(app: web.Application) -> AsyncIterator[None]:
    """Owns the client session of deliveries; on shutdown, ends every background task first."""
    simulator = app[SIMULATOR]
    async with aiohttp.ClientSession() as session:
        simulator.bind_session(session)
        try:
            yield
        finally:
            await simulator.shutdown()
            simulator.bind_session(None)


def create_simulator_app(config: SimulatorConfig) -> web.Application:
    # Outermost first: the call log sees latency and errors as the client does.
    app = web.Application(
        middlewares=[_record_calls, _add_latency, _render_errors, _check_api_key],
    )
    app[SIMULATOR] = Simulator(config)
    api.add_routes(app)
    admin.add_routes(app)
    app.cleanup_ctx.append(_delivery_session)
    return app
