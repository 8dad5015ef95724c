"""API tokens: issued, looked up by id, listed, revoked."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.tables import api_tokens
from service.domain.access import IssuedToken, Scope, issue_token, known_scopes

LISTED = (
    api_tokens.c.token_id,
    api_tokens.c.client,
    api_tokens.c.scopes,
    api_tokens.c.created_at,
    api_tokens.c.revoked_at,
)


async def create_token(conn: AsyncConnection, client: str, scopes: Sequence[Scope]) -> IssuedToken:
    issued = issue_token()
    await conn.execute(
        sa.insert(api_tokens).values(
            token_id=issued.token_id,
            client=client,
            scopes=sorted(scope.value for scope in scopes),
            secret_sha256=issued.secret_sha256,
        )
    )
    return issued


@dataclasses.dataclass(frozen=True)
class LiveToken:
    """An unrevoked token: its client, the scopes this service knows, its secret's hash."""

    token_id: str
    client: str
    scopes: frozenset[Scope]
    secret_sha256: bytes = dataclasses.field(repr=False)


async def find_token(conn: AsyncConnection, token_id: str) -> LiveToken | None:
    """A live (unrevoked) token by id; whether a presented secret matches is the caller's."""
    query = sa.select(api_tokens).where(
        api_tokens.c.token_id == token_id, api_tokens.c.revoked_at.is_(None)
    )
    row = (await conn.execute(query)).mappings().first()
    if row is None:
        return None
    scopes = known_scopes(row["scopes"])
    return LiveToken(row["token_id"], row["client"], scopes, bytes(row["secret_sha256"]))


async def list_tokens(conn: AsyncConnection) -> list[RowMapping]:
    query = sa.select(*LISTED).order_by(api_tokens.c.created_at)
    return list((await conn.execute(query)).mappings())


async def revoke_token(conn: AsyncConnection, token_id: str) -> bool:
    result = await conn.execute(
        sa.update(api_tokens)
        .where(api_tokens.c.token_id == token_id, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=sa.func.now())
    )
    return bool(result.rowcount)
