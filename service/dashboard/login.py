"""Logging in with a pasted API token, and out."""

from __future__ import annotations

import structlog
from aiohttp import web

from service.api.keys import ENGINE
from service.dashboard.access import verify_pasted
from service.dashboard.forms import cross_site, read_form
from service.dashboard.keys import OPTIONS, VIEWER
from service.dashboard.render import HOME, LOGIN, local_target, page, redirect
from service.dashboard.sessions import (
    clear_session_cookie,
    is_https,
    session_id_of,
    set_session_cookie,
)
from service.db.dashboard_sessions import close_session, open_session

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

TOKEN_MAX_CHARS = 256


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return _login_page(request, next_path=local_target(request.query.get("next")))


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    """A live token opens a new session (never an old one: no fixation); the cookie names it."""
    options = request.config_dict[OPTIONS]
    elsewhere = cross_site(request, options.allowed_origin)
    if elsewhere is not None:
        # Login CSRF: another site would log this browser in as the attacker's token.
        log.warning("dashboard.login_cross_site", reason=elsewhere)
        error = f"This login did not come from this dashboard's page ({elsewhere})."
        return _login_page(request, next_path=HOME, error=error, status=403)
    form = await read_form(request)
    next_path = local_target(form.get("next"))
    pasted = form.get("token")
    engine = request.config_dict[ENGINE]
    holder = None
    if isinstance(pasted, str) and 0 < len(pasted) <= TOKEN_MAX_CHARS:
        async with engine.connect() as conn:
            holder = await verify_pasted(conn, pasted)
    if holder is None:
        error = "That token is unknown, revoked, or has no scope to view the dashboard with."
        return _login_page(request, next_path=next_path, error=error, status=401)
    async with engine.begin() as conn:
        previous = session_id_of(request)
        if previous is not None:
            await close_session(conn, previous)
        opened = await open_session(conn, holder.token_id)
    log.info("dashboard.login", client=holder.client, token_id=holder.token_id)
    response = redirect(next_path)
    set_session_cookie(response, opened.session_id, secure=options.secure_cookie)
    return response


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    viewer = request[VIEWER]
    async with request.config_dict[ENGINE].begin() as conn:
        await close_session(conn, viewer.session.session_id)
    log.info("dashboard.logout", client=viewer.holder.client)
    response = redirect(LOGIN)
    clear_session_cookie(response)
    return response


def _login_page(
    request: web.Request, *, next_path: str, error: str | None = None, status: int = 200
) -> web.Response:
    context = {
        "next_path": next_path,
        "error": error,
        "ended": request.query.get("ended") == "1",
        "cookie_needs_https": _cookie_needs_https(request),
    }
    return page(request, "login.html", context, status=status)


def _cookie_needs_https(request: web.Request) -> bool:
    """The cookie will be Secure, yet this looks like plain HTTP: the browser may drop it."""
    return request.config_dict[OPTIONS].secure_cookie and not is_https(request)
