"""Dashboard sessions: kept in this process's memory, named by a random id in a cookie.

The cookie holds only the session id, never the token. A session remembers which token opened
it; every request looks that token up again, so a revoked token ends its sessions at once.
Sessions are lost when the process restarts (everyone logs in again), and one process does not
know another's: behind several API instances, route the dashboard to one, or stickily.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import secrets
import time

from aiohttp import web

COOKIE_NAME = "dashboard_session"
COOKIE_PATH = "/dashboard"
SESSION_TTL_S = 8 * 3600.0
MAX_SESSIONS = 10_000


@dataclasses.dataclass
class Session:
    token_id: str
    csrf: str
    expires_at: float  # time.monotonic()
    flash: str | None = None  # a message for the next page shown

    def csrf_matches(self, presented: object) -> bool:
        return isinstance(presented, str) and hmac.compare_digest(presented, self.csrf)

    def take_flash(self) -> str | None:
        message, self.flash = self.flash, None
        return message


class SessionStore:
    """Sessions by id; bounded, so logins cannot grow it without end."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._sessions: dict[str, Session] = {}

    def open(self, token_id: str) -> tuple[str, Session]:
        self._make_room()
        session_id = secrets.token_urlsafe(32)
        session = Session(token_id, secrets.token_urlsafe(32), time.monotonic() + self._ttl_s)
        self._sessions[session_id] = session
        return session_id, session

    def find(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None and session.expires_at <= time.monotonic():
            del self._sessions[session_id]
            return None
        return session

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    def __len__(self) -> int:
        return len(self._sessions)

    def _make_room(self) -> None:
        if len(self._sessions) < self._max:
            return
        now = time.monotonic()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires_at > now}
        while len(self._sessions) >= self._max:  # still full: the oldest go first
            del self._sessions[next(iter(self._sessions))]


def set_session_cookie(
    response: web.StreamResponse, request: web.Request, session_id: str, policy: bool | None
) -> None:
    response.set_cookie(
        COOKIE_NAME,
        session_id,
        path=COOKIE_PATH,
        max_age=int(SESSION_TTL_S),
        httponly=True,
        samesite="Strict",
        secure=cookie_is_secure(request, policy),
    )


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE_NAME, path=COOKIE_PATH, httponly=True, samesite="Strict")


def cookie_is_secure(request: web.Request, policy: bool | None) -> bool:
    """`policy` decides when set; otherwise Secure unless this is plain HTTP to a loopback host.

    A browser keeps a Secure cookie only over HTTPS (or on localhost, for some browsers), so
    `make run`'s http://127.0.0.1:8080 needs it off; anywhere else the session must not travel
    in clear, including behind a proxy that ends TLS without saying so (X-Forwarded-Proto).
    """
    if policy is not None:
        return policy
    if request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https":
        return True
    return not is_loopback_host(request.host)


def is_loopback_host(host: str) -> bool:
    name = _hostname(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hostname(host: str) -> str:
    """`example.com:8080` -> `example.com`; `[::1]:8080` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host
