"""Logging in with a pasted API token, and out."""

from __future__ import annotations

import structlog
from aiohttp import web

from service.api.keys import ENGINE
from service.dashboard.access import verify_pasted
from service.dashboard.keys import OPTIONS, SESSIONS, VIEWER
from service.dashboard.render import LOGIN, local_target, page, redirect
from service.dashboard.sessions import (
    COOKIE_NAME,
    clear_session_cookie,
    cookie_is_secure,
    set_session_cookie,
)

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

TOKEN_MAX_CHARS = 256


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return _login_page(request, next_path=local_target(request.query.get("next")))


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    """A live token opens a new session (never an old one: no fixation); the cookie names it."""
    form = await request.post()
    next_path = local_target(form.get("next"))
    pasted = form.get("token")
    holder = None
    if isinstance(pasted, str) and 0 < len(pasted) <= TOKEN_MAX_CHARS:
        async with request.config_dict[ENGINE].connect() as conn:
            holder = await verify_pasted(conn, pasted)
    if holder is None:
        error = "That token is unknown, revoked, or has no scope."
        return _login_page(request, next_path=next_path, error=error, status=401)
    store = request.config_dict[SESSIONS]
    store.close(request.cookies.get(COOKIE_NAME, ""))
    session_id, _ = store.open(holder.token_id)
    log.info("dashboard.login", client=holder.client, token_id=holder.token_id)
    response = redirect(next_path)
    set_session_cookie(response, request, session_id, request.config_dict[OPTIONS].secure_cookie)
    return response


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    viewer = request[VIEWER]
    request.config_dict[SESSIONS].close(viewer.session_id)
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
    """Plain HTTP, yet the cookie will be Secure: the browser would drop it; say so."""
    secure = cookie_is_secure(request, request.config_dict[OPTIONS].secure_cookie)
    https = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
    return secure and not https
