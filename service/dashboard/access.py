"""Who is looking: the API token behind a dashboard session, checked again on every request."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncConnection

from service.dashboard.sessions import Session
from service.db.tokens import find_token
from service.domain.access import Scope, read_token

# The scopes that may look at the dashboard; `metrics` is for Prometheus only.
VIEWING_SCOPES = frozenset({Scope.READ, Scope.WRITE, Scope.OPS})


@dataclasses.dataclass(frozen=True)
class Holder:
    """A live token's client and the scopes it holds that concern the dashboard."""

    token_id: str
    client: str
    scopes: frozenset[Scope]


@dataclasses.dataclass(frozen=True)
class Viewer:
    """The holder of a live session; any viewing scope may look, only `ops` may act."""

    session: Session
    holder: Holder

    @property
    def can_act(self) -> bool:
        return Scope.OPS in self.holder.scopes


async def verify_pasted(conn: AsyncConnection, pasted: str) -> Holder | None:
    """The holder of a pasted token if it is live, matches and has a viewing scope; else None."""
    presented = read_token(f"Bearer {pasted.strip()}")
    if presented is None:
        return None
    found = await find_token(conn, presented.token_id)
    if found is None or not presented.matches(found.secret_sha256):
        return None
    return holder_of(found.token_id, found.client, found.scopes)


def holder_of(token_id: str, client: str, scopes: Iterable[str]) -> Holder | None:
    """None when the token has no viewing scope."""
    viewing = frozenset(Scope(scope) for scope in scopes if scope in VIEWING_SCOPES)
    return Holder(token_id, client, viewing) if viewing else None
