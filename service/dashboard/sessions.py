"""Dashboard sessions as the dashboard sees them: the cookie, and the session it names.

The cookie holds only the session id, never the token; the sessions themselves are rows in
PostgreSQL (service/db/dashboard_sessions.py), so they outlive a restart and every API process
knows them. A session remembers which token opened it, and every request looks the two up
together: a revoked token ends its sessions at once.
"""

from __future__ import annotations

import dataclasses
import hmac
import re
from datetime import datetime

from aiohttp import web

from service.db.dashboard_sessions import SESSION_TTL

COOKIE_NAME = "dashboard_session"
COOKIE_PATH = "/dashboard"
# What `secrets.token_urlsafe(32)` makes. Any other cookie value names no session, and is not
# even looked up (nor hashed: a header's undecodable bytes could not be).
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}", re.ASCII)


@dataclasses.dataclass(repr=False)
class Session:
    session_id: str
    token_id: str
    csrf: str
    expires_at: datetime
    flash: str | None = None  # a message for the next page shown
    shown_flash: str | None = None  # the message this page showed: cleared from the row after

    def __repr__(self) -> str:
        # Whoever has the id is logged in; the CSRF token is half of every form: neither is
        # ever shown, in logs, tracebacks or debuggers.
        return (
            f"Session(session_id='***', token_id={self.token_id!r}, csrf='***', "
            f"expires_at={self.expires_at!r}, flash={self.flash!r})"
        )

    def csrf_matches(self, presented: object) -> bool:
        # As bytes: compare_digest refuses str with non-ASCII characters, which a form may hold.
        return isinstance(presented, str) and hmac.compare_digest(
            presented.encode("utf-8", "surrogatepass"), self.csrf.encode()
        )

    def take_flash(self) -> str | None:
        message, self.flash = self.flash, None
        if message is not None:
            self.shown_flash = message
        return message


def session_id_of(request: web.Request) -> str | None:
    """The session id in the request's cookie, if it has the shape of one."""
    value = request.cookies.get(COOKIE_NAME, "")
    return value if _SESSION_ID.fullmatch(value) else None


def set_session_cookie(response: web.StreamResponse, session_id: str, *, secure: bool) -> None:
    response.set_cookie(
        COOKIE_NAME,
        session_id,
        path=COOKIE_PATH,
        max_age=int(SESSION_TTL.total_seconds()),
        httponly=True,
        samesite="Strict",
        secure=secure,
    )


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE_NAME, path=COOKIE_PATH, httponly=True, samesite="Strict")


def is_https(request: web.Request) -> bool:
    """As far as this server can tell: TLS here, or a proxy that says it ended TLS."""
    forwarded = request.headers.get("X-Forwarded-Proto", "")
    return request.secure or forwarded.strip().lower() == "https"
