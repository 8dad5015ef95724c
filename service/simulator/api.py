"""ShipEngine's side of the wire: the /v1 tracking and webhook endpoints, and /jwks."""

from __future__ import annotations

import asyncio
import dataclasses

from aiohttp import web

from service.simulator import errors, parsing
from service.simulator.appkeys import SIMULATOR
from service.simulator.records import Operation


@dataclasses.dataclass(frozen=True)
class _TrackingQuery:
    carrier_code: str
    tracking_number: str
    carrier_id: str | None


def _tracking_query(request: web.Request) -> _TrackingQuery:
    query = request.query
    for name in ("carrier_code", "tracking_number"):
        if not query.get(name, "").strip():
            raise errors.field_required(name)
    return _TrackingQuery(
        carrier_code=query["carrier_code"].strip(),
        tracking_number=query["tracking_number"].strip(),
        carrier_id=query.get("carrier_id") or None,
    )


async def _play_script(request: web.Request, query: _TrackingQuery, operation: Operation) -> None:
    """Apply a scripted answer, if one matches: wait its delay, then fail unless it is 2xx."""
    script = request.app[SIMULATOR].take_script(query.tracking_number, operation)
    if script is None:
        return
    if script.delay_s > 0:
        await asyncio.sleep(script.delay_s)
    if not script.succeeds:
        raise script.error(query.carrier_code, query.carrier_id)


async def start_tracking(request: web.Request) -> web.Response:
    query = _tracking_query(request)
    await _play_script(request, query, "start")
    request.app[SIMULATOR].start_tracking(
        query.carrier_code, query.tracking_number, query.carrier_id
    )
    return web.Response(status=204)


async def stop_tracking(request: web.Request) -> web.Response:
    query = _tracking_query(request)
    await _play_script(request, query, "stop")
    await request.app[SIMULATOR].stop_tracking(query.carrier_code, query.tracking_number)
    return web.Response(status=204)


async def get_tracking(request: web.Request) -> web.Response:
    query = _tracking_query(request)
    await _play_script(request, query, "get")
    simulator = request.app[SIMULATOR]
    return web.json_response(
        simulator.tracking_information(query.carrier_code, query.tracking_number)
    )


async def list_webhooks(request: web.Request) -> web.Response:
    webhooks = request.app[SIMULATOR].webhooks
    return web.json_response([webhook.to_json() for webhook in webhooks])


async def create_webhook(request: web.Request) -> web.Response:
    data = await parsing.json_object(request)
    event = parsing.required_str(data, "event")
    url = parsing.http_url(data, "url")
    if url is None:
        raise errors.field_required("url")
    webhook = request.app[SIMULATOR].create_webhook(
        event, url, parsing.headers(data) or (), parsing.optional_str(data, "name")
    )
    # ShipEngine's OpenAPI document answers a creation with 200, not 201.
    return web.json_response(webhook.to_json(), status=200)


async def get_webhook(request: web.Request) -> web.Response:
    webhook = request.app[SIMULATOR].get_webhook(request.match_info["webhook_id"])
    return web.json_response(webhook.to_json())


async def update_webhook(request: web.Request) -> web.Response:
    data = await parsing.json_object(request)
    request.app[SIMULATOR].update_webhook(
        request.match_info["webhook_id"],
        url=parsing.http_url(data, "url"),
        headers=parsing.headers(data),
    )
    return web.Response(status=204)


async def delete_webhook(request: web.Request) -> web.Response:
    request.app[SIMULATOR].delete_webhook(request.match_info["webhook_id"])
    return web.Response(status=204)


async def jwks(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIMULATOR].keys.jwks())


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/v1/tracking/start", start_tracking)
    router.add_post("/v1/tracking/stop", stop_tracking)
    router.add_get("/v1/tracking", get_tracking)
    router.add_get("/v1/environment/webhooks", list_webhooks)
    router.add_post("/v1/environment/webhooks", create_webhook)
    router.add_get("/v1/environment/webhooks/{webhook_id}", get_webhook)
    router.add_put("/v1/environment/webhooks/{webhook_id}", update_webhook)
    router.add_delete("/v1/environment/webhooks/{webhook_id}", delete_webhook)
    router.add_get("/jwks", jwks)
