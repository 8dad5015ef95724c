"""Who may read /metrics: a bearer token with the `metrics` scope.

The API's port and a dispatcher's status port both serve /metrics (`health.routes`), and the
dispatcher's has none of the API's middleware, so the handler itself asks here, with the same
check (`auth.check_token`) and the scope its `@operation` declares. Prometheus scrapes every
15 to 60 s: each scrape looks its token up, so a revocation counts at once. The last token seen
good is remembered for one case only: while the database is away, a token that was good keeps
getting the counters, which are what tells of the outage; any other token then gets 503.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.auth import check_token
from service.api.errors import ApiError
from service.api.keys import ENGINE
from service.api.middleware import error_response, unavailable_response
from service.api.operations import scopes_of
from service.db.errors import is_unavailable
from service.db.tokens import LiveToken, find_token
from service.domain.access import PresentedToken, read_token

LOOKUP_TIMEOUT_S = 2.0
REMEMBERED_MAX = 100  # scrapers are few; a bound all the same


class DatabaseAway(Exception):
    """The token could not be looked up, and was not seen good before."""


class ScrapeAccess:
    """The tokens presented to /metrics, looked up once a scrape."""

    def __init__(self) -> None:
        self._good: dict[str, LiveToken] = {}  # by token id, as last seen live

    async def lookup(self, engine: AsyncEngine, presented: PresentedToken) -> LiveToken | None:
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                async with engine.connect() as conn:
                    found = await find_token(conn, presented.token_id)
        except Exception as error:
            if not (isinstance(error, TimeoutError) or is_unavailable(error)):
                raise
            remembered = self._good.get(presented.token_id)
            if remembered is None or not presented.matches(remembered.secret_sha256):
                raise DatabaseAway from error
            return remembered
        if found is None:
            self._good.pop(presented.token_id, None)
            return None
        if len(self._good) >= REMEMBERED_MAX:
            self._good.clear()
        self._good[presented.token_id] = found
        return found


SCRAPE_ACCESS = web.AppKey("scrape_access", ScrapeAccess)


async def refusal(request: web.Request) -> web.Response | None:
    """None when the caller may read the metrics; else the answer, in the API's error shape."""
    presented = read_token(request.headers.get("Authorization"))
    try:
        found = (
            await request.app[SCRAPE_ACCESS].lookup(request.app[ENGINE], presented)
            if presented
            else None
        )
        check_token(presented, found, scopes_of(request.match_info.handler))
    except DatabaseAway:
        return unavailable_response(request)
    except ApiError as error:
        return error_response(request, error.status, *error.details)
    return None
