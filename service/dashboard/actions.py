"""The levers: retry a failed subscription, retry all failures of one error code, replay a
delivery. Each needs the `ops` scope and a POST with the session's CSRF token (checked by
`guard.require_session`), and answers with a redirect to a page that shows the result."""

from __future__ import annotations

import structlog
from aiohttp import web

from service.api.keys import ENGINE, SETTINGS
from service.dashboard.access import Viewer
from service.dashboard.forms import read_form
from service.dashboard.keys import VIEWER
from service.dashboard.pages import NO_ERROR_CODE, subscription_id_of
from service.dashboard.render import Refused, local_target, redirect
from service.db import deliveries, ops
from service.db.dashboard_sessions import set_flash
from service.db.subscriptions import retry_failed
from service.db.tables import BIGINT_MAX

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

ERROR_CODE_MAX_CHARS = 128


def acting_viewer(request: web.Request) -> Viewer:
    viewer = request[VIEWER]
    if not viewer.can_act:
        raise Refused(403, "Retry and replay need a token with the ops scope.")
    return viewer


@routes.post("/subscriptions/{id}/retry")
async def retry(request: web.Request) -> web.Response:
    viewer = acting_viewer(request)
    subscription_id = subscription_id_of(request)
    async with request.config_dict[ENGINE].begin() as conn:
        row = await retry_failed(conn, subscription_id)
        await set_flash(
            conn,
            viewer.session.session_id,
            f"Retried {row['tracking_number']}: pending, its start due now."
            if row is not None
            else "Nothing retried: that subscription is not failed (any more).",
        )
    log.info("dashboard.retry", subscription_id=str(subscription_id), client=viewer.holder.client)
    back = (await read_form(request)).get("back")
    return redirect(local_target(back, f"/dashboard/subscriptions/{subscription_id}"))


@routes.post("/failures/retry")
async def retry_error_code(request: web.Request) -> web.Response:
    """Every failed subscription with this error code is pending again."""
    viewer = acting_viewer(request)
    code = (await read_form(request)).get("error_code")
    if not isinstance(code, str) or not 0 < len(code) <= ERROR_CODE_MAX_CHARS:
        raise Refused(400, "Which error code? The form sent none.")
    if code == NO_ERROR_CODE:
        raise Refused(400, "Failures without an error code are retried one by one.")
    where = ops.FailedFilter(error_code=code)
    async with request.config_dict[ENGINE].begin() as conn:
        count = await ops.retry_failed_many(conn, where, dry_run=False)
        message = f"Retried {count} failed subscription(s) with error code {code}."
        await set_flash(conn, viewer.session.session_id, message)
    log.info("dashboard.retry_many", error_code=code, matched=count, client=viewer.holder.client)
    return redirect("/dashboard/failures")


@routes.post("/deliveries/{id}/replay")
async def replay(request: web.Request) -> web.Response:
    """File a stored delivery again (harmless: filing is idempotent)."""
    viewer = acting_viewer(request)
    delivery_id = _delivery_id(request)
    rearm = request.config_dict[SETTINGS].rearm_policy
    async with request.config_dict[ENGINE].begin() as conn:
        filed = await deliveries.replay_one(conn, delivery_id, rearm)
        await set_flash(
            conn,
            viewer.session.session_id,
            f"Delivery {delivery_id} not replayed: unknown, or refused (never trusted)."
            if filed is None
            else f"Delivery {delivery_id} re-filed: {filed.outcome}, {filed.new_events} new "
            f"event(s), status {'changed' if filed.status_changed else 'unchanged'}.",
        )
    log.info("dashboard.replay", delivery_id=delivery_id, client=viewer.holder.client)
    back = (await read_form(request)).get("back")
    return redirect(local_target(back, "/dashboard/deliveries"))


def _delivery_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= BIGINT_MAX:
        raise Refused(404, "There is no such delivery.")
    return int(raw)
