"""The dashboard's middlewares: security headers, flashes, error pages, sessions and CSRF."""

from __future__ import annotations

import secrets

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from service.api.errors import retry_later
from service.api.keys import ENGINE
from service.dashboard.access import Viewer, holder_of
from service.dashboard.forms import read_form
from service.dashboard.keys import NONCE, VIEWER
from service.dashboard.render import HOME, LOGIN, Refused, page, redirect
from service.dashboard.sessions import COOKIE_NAME, Session, clear_session_cookie, session_id_of
from service.db.dashboard_sessions import clear_flash, find_session
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
            "connect-src 'self'",  # the changes page's EventSource
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
        return retry_later(
            _error_page(request, 503, "The database is unavailable; try again shortly.")
        )


def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    return page(request, "error.html", {"status": status, "message": message}, status=status)


@web.middleware
async def require_session(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A live session for every page but the login; a matching CSRF token on every POST."""
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    session_id = session_id_of(request)
    viewer = await _viewer(request, session_id) if session_id else None
    if viewer is None:
        return _to_login(request, ended=bool(request.cookies.get(COOKIE_NAME)))
    request[VIEWER] = viewer
    if request.method not in SAFE_METHODS:
        form = await read_form(request)
        if not viewer.session.csrf_matches(form.get("csrf")):
            raise Refused(403, "This form is stale or not from this dashboard; reload and retry.")
    return await handler(request)


@web.middleware
async def forget_shown_flash(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A flash message is shown once: once a page (an error page too) has shown it, it goes.

    Outside `error_pages`, which renders pages too. Best effort: should the database be away
    just then, the message is shown once more.
    """
    response = await handler(request)
    viewer = request.get(VIEWER)
    shown = viewer.session.shown_flash if viewer is not None else None
    if viewer is not None and shown is not None:
        try:
            async with request.config_dict[ENGINE].begin() as conn:
                await clear_flash(conn, viewer.session.session_id, shown)
        except Exception as error:
            if not is_unavailable(error):
                raise
            log.warning("dashboard.flash_not_cleared", error=type(error).__name__)
    return response


async def _viewer(request: web.Request, session_id: str) -> Viewer | None:
    """The session's viewer, looked up with its token: a revoked token ends the session."""
    async with request.config_dict[ENGINE].connect() as conn:
        row = await find_session(conn, session_id)
    if row is None:
        return None
    holder = holder_of(row["token_id"], row["client"], row["scopes"])
    if holder is None:
        return None
    session = Session(
        session_id, row["token_id"], row["csrf_token"], row["expires_at"], row["flash"]
    )
    return Viewer(session, holder)


def _to_login(request: web.Request, *, ended: bool) -> web.Response:
    """To the login page, coming back here after it (a GET) or to the summary (a form)."""
    query = {"next": request.path_qs if request.method in SAFE_METHODS else HOME}
    if ended:
        query["ended"] = "1"
    response = redirect(str(URL(LOGIN).with_query(query)))
    if ended:
        clear_session_cookie(response)
    return response
