"""Bearer tokens and scopes for /v1: who is calling, and may they do this?

Every /v1 endpoint but ShipEngine's webhook needs `Authorization: Bearer <token>`; a handler
names the scopes it needs in its `@operation(scopes=...)`, any one of which will do. Missing or
unknown token: 401; a token without the scope: 403. Verified tokens are cached for
TOKEN_CACHE_S, so a revocation takes effect within that time and a busy API does not look up its
callers on every request.
"""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler

from service.api.errors import ApiError, ErrorDetail
from service.api.keys import ENGINE
from service.api.operations import scopes_of
from service.db.tokens import LiveToken, find_token
from service.domain.access import PresentedToken, Scope, read_token

TOKEN_CACHE_S = 30.0
PUBLIC_PATHS = frozenset({"/v1/webhooks/shipengine"})
CLIENT = web.RequestKey("client", str)
# The scopes of the caller's token: for handlers whose answer depends on them, beyond the
# scopes their `@operation` needs (`has_scope`).
SCOPES = web.RequestKey("scopes", frozenset)
TOKENS = web.AppKey("token_cache", dict)


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/") or request.path in PUBLIC_PATHS:
        return await handler(request)
    presented = read_token(request.headers.get("Authorization"))
    found = await _cached_token(request.app, presented.token_id) if presented else None
    token = check_token(presented, found, scopes_of(_route_handler(request)))
    request[CLIENT] = token.client
    request[SCOPES] = token.scopes
    return await handler(request)


def has_scope(request: web.Request, scope: Scope) -> bool:
    """Whether the caller's token holds `scope` (False where no token was asked for)."""
    return scope in request.get(SCOPES, frozenset())


def check_token(
    presented: PresentedToken | None, found: LiveToken | None, needed: frozenset[Scope]
) -> LiveToken:
    """The token, if it is the one presented and holds one of the `needed` scopes (none needed:
    any token); else the 401 or 403 to answer. Shared by /v1 and /metrics."""
    if presented is None:
        raise _unauthorized("an Authorization: Bearer token is required")
    if found is None or not presented.matches(found.secret_sha256):
        raise _unauthorized("the token is unknown or revoked")
    if needed and not needed & found.scopes:
        wanted = " or ".join(sorted(scope.value for scope in needed))
        raise Forbidden(ErrorDetail("security", "forbidden", f"this needs the scope {wanted}"))
    return found


async def _cached_token(app: web.Application, token_id: str) -> LiveToken | None:
    cache: dict[str, tuple[float, LiveToken | None]] = app[TOKENS]
    cached = cache.get(token_id)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    async with app[ENGINE].connect() as conn:
        found = await find_token(conn, token_id)
    if len(cache) > 10_000:  # bounded: unknown ids sent at random must not grow it forever
        cache.clear()
    cache[token_id] = (time.monotonic() + TOKEN_CACHE_S, found)
    return found


def _route_handler(request: web.Request) -> object:
    return request.match_info.handler


def _unauthorized(message: str) -> Unauthorized:
    return Unauthorized(ErrorDetail("security", "unauthorized", message))
