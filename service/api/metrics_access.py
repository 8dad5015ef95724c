"""Who may read /metrics: a bearer token with the `metrics` scope.

The API's port and a dispatcher's status port both serve /metrics (`health.routes`), and the
dispatcher's has none of the API's middleware, so the handler itself asks here. Prometheus
scrapes every 15 to 60 s: each scrape looks its token up, so a revocation counts at once. The
last good verdict per token is remembered for one case only: while the database is away, a
token that was good keeps getting the counters, which are what tells of the outage; any other
token then gets 503.
"""

from __future__ import annotations

import asyncio
import enum

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.errors import RETRY_AFTER_S, ErrorDetail
from service.api.keys import ENGINE
from service.api.middleware import error_response
from service.db.errors import is_unavailable
from service.db.tokens import find_token
from service.domain.access import Scope, read_token

LOOKUP_TIMEOUT_S = 2.0
REMEMBERED_MAX = 100  # scrapers are few; a bound all the same


class Verdict(enum.Enum):
    GRANTED = enum.auto()
    NO_TOKEN = enum.auto()
    UNKNOWN = enum.auto()
    NO_SCOPE = enum.auto()
    UNAVAILABLE = enum.auto()


class ScrapeAccess:
    """Verdicts on the tokens presented to /metrics, one per scrape."""

    def __init__(self) -> None:
        self._good: dict[str, bytes] = {}  # token id -> its secret's hash, last seen good

    async def verdict(self, engine: AsyncEngine, authorization: str | None) -> Verdict:
        presented = read_token(authorization)
        if presented is None:
            return Verdict.NO_TOKEN
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                async with engine.connect() as conn:
                    row = await find_token(conn, presented.token_id)
        except Exception as error:
            if not (isinstance(error, TimeoutError) or is_unavailable(error)):
                raise
            remembered = self._good.get(presented.token_id)
            if remembered is not None and presented.matches(remembered):
                return Verdict.GRANTED
            return Verdict.UNAVAILABLE
        if row is None or not presented.matches(bytes(row["secret_sha256"])):
            self._good.pop(presented.token_id, None)
            return Verdict.UNKNOWN
        if Scope.METRICS not in row["scopes"]:
            self._good.pop(presented.token_id, None)
            return Verdict.NO_SCOPE
        if len(self._good) >= REMEMBERED_MAX:
            self._good.clear()
        self._good[presented.token_id] = bytes(row["secret_sha256"])
        return Verdict.GRANTED


SCRAPE_ACCESS = web.AppKey("scrape_access", ScrapeAccess)

_REFUSALS = {
    Verdict.NO_TOKEN: (401, "unauthorized", "an Authorization: Bearer token is required"),
    Verdict.UNKNOWN: (401, "unauthorized", "the token is unknown or revoked"),
    Verdict.NO_SCOPE: (403, "forbidden", "this needs the scope metrics"),
    Verdict.UNAVAILABLE: (503, "database_unavailable", "the database is unavailable"),
}


async def refusal(request: web.Request) -> web.Response | None:
    """None when the caller may read the metrics; else the answer, in the API's error shape."""
    authorization = request.headers.get("Authorization")
    verdict = await request.app[SCRAPE_ACCESS].verdict(request.app[ENGINE], authorization)
    if verdict is Verdict.GRANTED:
        return None
    status, code, message = _REFUSALS[verdict]
    error_type = "system" if status == 503 else "security"
    response = error_response(request, status, ErrorDetail(error_type, code, message))
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response
