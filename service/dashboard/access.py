"""Who is looking: the API token behind a dashboard session, checked again on every request."""

from __future__ import annotations

import dataclasses

from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.dashboard.sessions import Session
from service.db.tokens import find_token
from service.domain.access import Scope, read_token


@dataclasses.dataclass(frozen=True)
class Holder:
    """A live token's client and scopes."""

    token_id: str
    client: str
    scopes: frozenset[Scope]


@dataclasses.dataclass(frozen=True)
class Viewer:
    """The holder of a live session; any scope may look, only `ops` may act."""

    session_id: str
    session: Session
    holder: Holder

    @property
    def can_act(self) -> bool:
        return Scope.OPS in self.holder.scopes


async def verify_pasted(conn: AsyncConnection, pasted: str) -> Holder | None:
    """The holder of a pasted token if it is live, matches and has a scope; else None."""
    presented = read_token(f"Bearer {pasted.strip()}")
    if presented is None:
        return None
    row = await find_token(conn, presented.token_id)
    if row is None or not presented.matches(bytes(row["secret_sha256"])):
        return None
    return _holder(row)


async def live_holder(conn: AsyncConnection, token_id: str) -> Holder | None:
    """The holder of a token a session was opened with; None once it is revoked."""
    row = await find_token(conn, token_id)
    return _holder(row) if row is not None else None


def _holder(row: RowMapping) -> Holder | None:
    known = {scope.value for scope in Scope}
    scopes = frozenset(Scope(scope) for scope in row["scopes"] if scope in known)
    return Holder(row["token_id"], row["client"], scopes) if scopes else None
