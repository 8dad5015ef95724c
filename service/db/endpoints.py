"""Notification endpoint queries. Each takes a connection and never commits: callers own
transactions.

`owner` is whose endpoints a query may touch: a client's name (its own only), or None (any:
an `ops` token's view). Another client's endpoint is then as absent as one that never was.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.tables import notify_endpoints
from service.domain.endpoints import EndpointState

# What a caller is shown: never a secret.
PUBLIC_COLUMNS = tuple(
    column for column in notify_endpoints.c if column.name not in ("secret", "previous_secret")
)
# What the fields a caller may change are called, here as in the API.
CHANGEABLE = frozenset({"url", "types", "description", "rate_limit_per_s"})


@dataclasses.dataclass(frozen=True)
class NewEndpoint:
    url: str
    types: list[str] | None  # None: every type
    description: str | None
    rate_limit_per_s: float | None
    all_clients: bool
    created_by: str
    secret: str = dataclasses.field(repr=False)


def _mine(endpoint_id: uuid.UUID, owner: str | None) -> sa.ColumnElement[bool]:
    found = notify_endpoints.c.id == endpoint_id
    return found if owner is None else sa.and_(found, notify_endpoints.c.created_by == owner)


async def create_endpoint(conn: AsyncConnection, new: NewEndpoint) -> RowMapping:
    """The new endpoint, with its secret (the one time it is read back)."""
    query = (
        sa.insert(notify_endpoints)
        .values(**dataclasses.asdict(new))
        .returning(*PUBLIC_COLUMNS, notify_endpoints.c.secret)
    )
    return (await conn.execute(query)).mappings().one()


async def list_endpoints(conn: AsyncConnection, owner: str | None) -> list[RowMapping]:
    """Newest first."""
    query = sa.select(*PUBLIC_COLUMNS).order_by(
        notify_endpoints.c.created_at.desc(), notify_endpoints.c.id.desc()
    )
    if owner is not None:
        query = query.where(notify_endpoints.c.created_by == owner)
    return list((await conn.execute(query)).mappings())


async def get_endpoint(
    conn: AsyncConnection, endpoint_id: uuid.UUID, owner: str | None
) -> RowMapping | None:
    query = sa.select(*PUBLIC_COLUMNS).where(_mine(endpoint_id, owner))
    return (await conn.execute(query)).mappings().first()


async def update_endpoint(
    conn: AsyncConnection, endpoint_id: uuid.UUID, owner: str | None, changes: dict[str, Any]
) -> RowMapping | None:
    """The endpoint with `changes` (of `CHANGEABLE` fields) made; None if there is none."""
    unknown = set(changes) - CHANGEABLE
    if unknown:
        raise ValueError(f"not changeable: {sorted(unknown)}")
    query = (
        sa.update(notify_endpoints)
        .where(_mine(endpoint_id, owner))
        .values(**changes, updated_at=sa.func.now())
        .returning(*PUBLIC_COLUMNS)
    )
    return (await conn.execute(query)).mappings().first()


async def delete_endpoint(conn: AsyncConnection, endpoint_id: uuid.UUID, owner: str | None) -> bool:
    result = await conn.execute(sa.delete(notify_endpoints).where(_mine(endpoint_id, owner)))
    return bool(result.rowcount)


async def rotate_secret(
    conn: AsyncConnection,
    endpoint_id: uuid.UUID,
    owner: str | None,
    new_secret: str,
    previous_lifetime: timedelta,
) -> RowMapping | None:
    """`new_secret` in force; the one it replaces kept as the previous for `previous_lifetime`
    (a previous one still in force from an earlier rotation is dropped: two at most)."""
    query = (
        sa.update(notify_endpoints)
        .where(_mine(endpoint_id, owner))
        .values(
            previous_secret=notify_endpoints.c.secret,
            previous_secret_expires_at=sa.func.now() + previous_lifetime,
            secret=new_secret,
            updated_at=sa.func.now(),
        )
        .returning(*PUBLIC_COLUMNS, notify_endpoints.c.secret)
    )
    return (await conn.execute(query)).mappings().first()


async def enable_endpoint(
    conn: AsyncConnection, endpoint_id: uuid.UUID, owner: str | None
) -> RowMapping | None:
    query = (
        sa.update(notify_endpoints)
        .where(_mine(endpoint_id, owner))
        .values(state=EndpointState.ENABLED.value, disabled_reason=None, updated_at=sa.func.now())
        .returning(*PUBLIC_COLUMNS)
    )
    return (await conn.execute(query)).mappings().first()
