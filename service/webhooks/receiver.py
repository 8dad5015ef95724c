"""POST /v1/webhooks/shipengine: ShipEngine's `track` deliveries.

A delivery is answered 2xx only after its raw bytes and headers are committed together with
what it filed; if anything fails first, ShipEngine gets an error and delivers it again.
"""

from __future__ import annotations

import structlog
from aiohttp import web

from service.api.body import read_json
from service.api.errors import BadRequest
from service.api.keys import ENGINE, METRICS
from service.db.deliveries import store_and_file
from service.domain.tracking import parse_track_payload

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()


@routes.post("/v1/webhooks/shipengine")
async def receive_track(request: web.Request) -> web.Response:
    payload = await read_json(request)
    if not isinstance(payload, dict):
        raise BadRequest.invalid("a track webhook body is a JSON object")
    update = parse_track_payload(payload)
    body = await request.read()  # cached by aiohttp: the exact bytes that were parsed
    async with request.app[ENGINE].begin() as conn:
        filed = await store_and_file(conn, headers=_headers(request), body=body, update=update)
    request.app[METRICS].webhook_deliveries.labels(filed.outcome).inc()
    log.info(
        "webhook.delivery",
        delivery_id=filed.delivery_id,
        outcome=filed.outcome,
        subscription_id=str(filed.subscription_id) if filed.subscription_id else None,
        tracking_number=update.tracking_number,
        status_code=update.status_code,
        new_events=filed.new_events,
    )
    return web.json_response(
        {
            "delivery_id": filed.delivery_id,
            "outcome": filed.outcome,
            "subscription_id": str(filed.subscription_id) if filed.subscription_id else None,
        }
    )


def _headers(request: web.Request) -> dict[str, str]:
    """All headers as received (names lower-cased, repeats joined), for later verification."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers
