"""The simulator's aiohttp app: routes, the /v1 middlewares and the delivery client session."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from service.simulator import admin, api, errors
from service.simulator.appkeys import RATE_LIMITED, SIMULATOR
from service.simulator.calllog import CallArrival
from service.simulator.config import SimulatorConfig
from service.simulator.errors import ApiError
from service.simulator.records import CANCELLED_STATUS
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


def _status_of_failure(error: BaseException) -> int:
    """The status of a call whose handler raised instead of answering."""
    if isinstance(error, asyncio.CancelledError):
        return CANCELLED_STATUS
    if isinstance(error, web.HTTPException):
        return error.status
    return 500


@web.middleware
async def _record_calls(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: the call is in flight from arrival to answer, then logged as answered."""
    if not _is_api(request):
        return await handler(request)
    arrival = request.app[SIMULATOR].call_arrived(request.method, request.path, dict(request.query))
    try:
        response = await handler(request)
    except BaseException as error:
        # Most often a cancellation: the client went away mid-call (a killed dispatcher)
        # and the server cancels handlers on disconnect, or the simulator is shutting down.
        # The call must still leave the in-flight count and reach the log.
        _log_answer(request, arrival, _status_of_failure(error))
        raise
    _log_answer(request, arrival, response.status)
    return response


def _log_answer(request: web.Request, arrival: CallArrival, http_status: int) -> None:
    rate_limited = request.get(RATE_LIMITED, False)
    request.app[SIMULATOR].call_answered(arrival, http_status, rate_limited=rate_limited)


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
        expected = request.app[SIMULATOR].config.api_key.get_secret_value().encode()
        given = request.headers.get("API-Key", "").encode()
        if not hmac.compare_digest(given, expected):
            raise errors.unauthorized()
    return await handler(request)


@web.middleware
async def _enforce_rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Inside the key check: only authenticated calls count, as on ShipEngine's accounts."""
    if _is_api(request):
        retry_after_s = request.app[SIMULATOR].admit_call()
        if retry_after_s is not None:
            request[RATE_LIMITED] = True
            raise errors.rate_limited(retry_after_s)
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
        middlewares=[
            _record_calls,
            _add_latency,
            _render_errors,
            _check_api_key,
            _enforce_rate_limit,
        ],
    )
    app[SIMULATOR] = Simulator(config)
    api.add_routes(app)
    admin.add_routes(app)
    app.cleanup_ctx.append(_delivery_session)
    return app
