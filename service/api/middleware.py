"""Request ids and the one place where every error becomes a JSON answer."""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from service.api.errors import ApiError, ErrorDetail, http_error_detail, retry_later
from service.api.keys import METRICS
from service.db.errors import is_unavailable

log = structlog.get_logger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_ID_HEADER = "X-Request-ID"


def request_id_of(request: web.Request) -> str:
    return str(request.get(REQUEST_ID, ""))


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take the caller's X-Request-ID (or make one) and log with it; `echo_request_id`
    answers with it."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else None
    request[REQUEST_ID] = request_id or str(uuid.uuid4())
    # Bound and reset by hand: structlog's context manager cost three times as much (2.7 µs
    # against 0.8, on every request).
    bound = structlog.contextvars.bind_contextvars(request_id=request[REQUEST_ID])
    try:
        return await handler(request)
    finally:
        structlog.contextvars.reset_contextvars(**bound)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """The request's id on its answer, set as the answer's headers are sent: a stream sends
    them before its handler returns."""
    if REQUEST_ID in request:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]


# Methods counted by name; any other is OTHER: HTTP takes any token as a method, and each
# would be a series of its own for the life of the process.
SERVED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@web.middleware
async def request_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every answer by its route's pattern (not its path: ids are unbounded)."""
    started = time.perf_counter()
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    method = request.method if request.method in SERVED_METHODS else "OTHER"
    answered, latency = request.app[METRICS].http_series(method, route, response.status)
    answered.inc()
    latency.observe(time.perf_counter() - started)
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure answered in ShipEngine's error shape; never an HTML page, never a trace."""
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(request, error.status, *error.details)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(request, error.status, http_error_detail(error.status, error.reason))
    except Exception as error:
        if is_unavailable(error):
            # The error's type only: its text quotes the statement, and may quote its values.
            log.warning("api.database_unavailable", path=request.path, error=type(error).__name__)
            return unavailable_response(request)
        log.exception("api.unhandled_error", path=request.path, method=request.method)
        detail = ErrorDetail("system", "unspecified", "internal error")
        return error_response(request, 500, detail)


def unavailable_response(request: web.Request) -> web.Response:
    """503 for a database that is down, saturated or silent: callers come back later."""
    detail = ErrorDetail("system", "database_unavailable", "the database is unavailable")
    return retry_later(error_response(request, 503, detail))


def error_response(request: web.Request, status: int, *details: ErrorDetail) -> web.Response:
    body: dict[str, Any] = {
        "request_id": request_id_of(request),
        "errors": [detail.as_json() for detail in details],
    }
    return web.json_response(body, status=status)
