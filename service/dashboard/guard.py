"""The dashboard's middlewares: security headers, error pages, sessions and CSRF."""

from __future__ import annotations

import secrets

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from service.api.errors import RETRY_AFTER_S
from service.api.keys import ENGINE
from service.dashboard.access import Viewer, live_holder
from service.dashboard.keys import NONCE, SESSIONS, VIEWER
from service.dashboard.render import HOME, LOGIN, Refused, page, redirect
from service.dashboard.sessions import COOKIE_NAME, clear_session_cookie
from service.db.errors import is_unavailable

log = structlog.get_logger(__name__)

PUBLIC_PATHS = frozenset({LOGIN})
SAFE_METHODS = frozenset({"GET", "HEAD"})


def _content_security_policy(nonce: str) -> str:
    return "; ".join(
        (
            "default-src 'none'",
            f"style-src 'nonce-{nonce}'",
            f"script-src 'nonce-{nonce}'",
            "img-src data:",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        )
    )


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only our own inline style and script run; never framed; pages are not cached."""
    request[NONCE] = secrets.token_urlsafe(16)
    response = await handler(request)
    response.headers["Content-Security-Policy"] = _content_security_policy(request[NONCE])
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


@web.middleware
async def error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as HTML pages rather than the API's JSON; unknown errors go on to the API's."""
    try:
        return await handler(request)
    except Refused as error:
        return _error_page(request, error.status, error.message)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error_page(request, error.status, error.reason)
    except Exception as error:
        if not is_unavailable(error):
            raise
        log.warning("dashboard.database_unavailable", path=request.path, error=type(error).__name__)
        response = _error_page(request, 503, "The database is unavailable; try again shortly.")
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response


def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    return page(request, "error.html", {"status": status, "message": message}, status=status)


@web.middleware
async def require_session(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A live session for every page but the login; a matching CSRF token on every POST."""
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    session_id = request.cookies.get(COOKIE_NAME, "")
    viewer = await _viewer(request, session_id) if session_id else None
    if viewer is None:
        return _to_login(request, ended=bool(session_id))
    request[VIEWER] = viewer
    if request.method not in SAFE_METHODS:
        form = await request.post()
        if not viewer.session.csrf_matches(form.get("csrf")):
            raise Refused(403, "This form is stale or not from this dashboard; reload and retry.")
    return await handler(request)


async def _viewer(request: web.Request, session_id: str) -> Viewer | None:
    """The session's viewer, its token looked up again: a revoked token ends the session."""
    store = request.config_dict[SESSIONS]
    session = store.find(session_id)
    if session is None:
        return None
    async with request.config_dict[ENGINE].connect() as conn:
        holder = await live_holder(conn, session.token_id)
    if holder is None:
        store.close(session_id)
        return None
    return Viewer(session_id, session, holder)


def _to_login(request: web.Request, *, ended: bool) -> web.Response:
    """To the login page, coming back here after it (a GET) or to the summary (a form)."""
    query = {"next": request.path_qs if request.method in SAFE_METHODS else HOME}
    if ended:
        query["ended"] = "1"
    response = redirect(str(URL(LOGIN).with_query(query)))
    if ended:
        clear_session_cookie(response)
    return response
