"""API tokens: issued, looked up by id, listed, revoked."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.tables import api_tokens
from service.domain.access import IssuedToken, Scope, issue_token

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


async def find_token(conn: AsyncConnection, token_id: str) -> RowMapping | None:
    """A live (unrevoked) token by id, with its secret's hash."""
    query = sa.select(api_tokens).where(
        api_tokens.c.token_id == token_id, api_tokens.c.revoked_at.is_(None)
    )
    return (await conn.execute(query)).mappings().first()


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
