"""Reading JSON request bodies, with a clear 4xx for every way they can be wrong."""

from __future__ import annotations

from aiohttp import web

from service import json_exact
from service.api.errors import ApiError, BadRequest, ErrorDetail


class UnsupportedMediaType(ApiError):
    status = 415


async def read_json(request: web.Request) -> object:
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            ErrorDetail(
                "validation",
                "unsupported_media_type",
                f"expected application/json, got {request.content_type or 'nothing'}",
            )
        )
    raw = await request.read()
    if not raw.strip():
        raise BadRequest(
            ErrorDetail("validation", "request_body_required", "the request needs a JSON body")
        )
    try:
        return json_exact.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # deep nesting too
        raise BadRequest.invalid(f"the body is not valid JSON: {error}") from None
