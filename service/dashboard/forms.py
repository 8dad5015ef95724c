"""Reading what a dashboard form posted, and whether a login post comes from this site."""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import FileField
from multidict import MultiDictProxy

from service.dashboard.render import Refused

log = structlog.get_logger(__name__)

UNREADABLE = "The form could not be read (its encoding, charset or multipart body is broken)."
# How aiohttp's form reader says a body cannot be decoded: bad bytes for the charset
# (UnicodeDecodeError, a ValueError), an unknown charset (LookupError), a broken or truncated
# multipart body (ValueError, or HttpProcessingError for a part's headers), a part's unknown
# transfer encoding or `_charset_` (RuntimeError).
_UNDECODABLE = (ValueError, LookupError, RuntimeError, HttpProcessingError)


async def read_form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | FileField]:
    """The posted form; a body that cannot be decoded is the sender's error (400), not ours."""
    try:
        form = await request.post()
    except _UNDECODABLE as error:
        log.info("dashboard.form_unreadable", path=request.path, error=type(error).__name__)
        raise Refused(400, UNREADABLE) from None
    if not all(_storable(value) for value in form.values()):
        # aiohttp decodes with whatever codec the charset names: `unicode_escape` turns `\ud800`
        # into a lone surrogate, `%00` is a NUL. Neither can be rendered nor stored.
        log.info("dashboard.form_unreadable", path=request.path, error="unstorable_text")
        raise Refused(400, UNREADABLE)
    return form


def _storable(value: object) -> bool:
    """Text PostgreSQL and a page can hold: UTF-8 without NUL (files are not read as text)."""
    if not isinstance(value, str):
        return True
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cross_site(request: web.Request, allowed_origin: str | None) -> str | None:
    """Why a post is not from this site, or None when it may be (login CSRF).

    Browsers say where a post comes from: `Sec-Fetch-Site`, and `Origin` (the page's scheme,
    host and port). Origin is compared with the Host header, the scheme left out: behind a
    proxy that ends TLS the page is https and this server sees http. A proxy that also rewrites
    Host needs its public origin configured (DASHBOARD_ORIGIN). Clients that send neither
    header (old browsers, scripts) are let through: SameSite and the token still hold.
    """
    if request.headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site":
        return "Sec-Fetch-Site says cross-site"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    origin = origin.strip().lower()
    if allowed_origin is not None and origin == allowed_origin:
        return None
    scheme, separator, authority = origin.partition("://")
    host = request.headers.get("Host", "")
    if separator and scheme in ("http", "https") and _same_host(authority, host):
        return None
    return "its Origin is another site"


def _same_host(authority: str, host: str) -> bool:
    """`host[:port]` against the Host header; a default port (80, 443) may be left out."""
    return bool(authority) and _without_default_port(authority) == _without_default_port(host)


def _without_default_port(authority: str) -> str:
    authority = authority.strip().lower()
    for default in (":80", ":443"):
        if authority.endswith(default):
            return authority.removesuffix(default)
    return authority
