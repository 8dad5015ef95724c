"""Notification endpoint queries. Each takes a connection and never commits: callers own
transactions.

`owner` is whose endpoints a query may touch: a client's name (its own only), or None (any:
an `ops` token's view). Another client's endpoint is then as absent as one that never was.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db import notify
from service.db.changes import Position
from service.db.notify import WAKE_CHANNEL
from service.db.tables import notify_attempts, notify_cursors, notify_endpoints
from service.domain.endpoints import EndpointState, new_secret
from service.domain.notifications import secrets_in_force

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
    row = (await conn.execute(query)).mappings().one()
    await notify.start_at_edge(conn, row["id"])
    return row


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
    conn: AsyncConnection, endpoint_id: uuid.UUID, owner: str | None, now: datetime
) -> RowMapping | None:
    """Enabled again, if it was disabled: its queue resumes where it stopped, every message
    due now with its failures forgotten; the sender is woken (at commit)."""
    disabled = sa.and_(
        _mine(endpoint_id, owner), notify_endpoints.c.state == EndpointState.DISABLED.value
    )
    query = (
        sa.update(notify_endpoints)
        .where(disabled)
        .values(state=EndpointState.ENABLED.value, disabled_reason=None, updated_at=sa.func.now())
        .returning(notify_endpoints.c.id)
    )
    if (await conn.execute(query)).first() is not None:
        await notify.resume_lanes(conn, endpoint_id, now)
        await conn.execute(sa.select(sa.func.pg_notify(WAKE_CHANNEL, "")))
    return await get_endpoint(conn, endpoint_id, owner)


async def rewind(conn: AsyncConnection, endpoint_id: uuid.UUID, position: Position) -> None:
    """Send again every change after `position` that the endpoint wants: its cursor moved back
    there (never forward: what it has not taken yet is sent anyway), the senders woken at
    commit. The caller checked whose endpoint it is."""
    cursor = notify_cursors.c
    # A fan-out in progress would write its cursor over this one: wait for it to commit.
    await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(notify.FAN_OUT_LOCK)))
    await conn.execute(
        sa.update(notify_cursors)
        .where(
            cursor.endpoint_id == endpoint_id,
            sa.tuple_(cursor.txid, cursor.change_id) > sa.tuple_(*position),
        )
        .values(txid=position.txid, change_id=position.change_id)
    )
    await conn.execute(sa.select(sa.func.pg_notify(WAKE_CHANNEL, "")))


async def list_attempts(
    conn: AsyncConnection, endpoint_id: uuid.UUID, *, before: int | None, limit: int
) -> list[RowMapping]:
    """The endpoint's attempts, newest first, older than the attempt `before` when given."""
    query = (
        sa.select(notify_attempts)
        .where(notify_attempts.c.endpoint_id == endpoint_id)
        .order_by(notify_attempts.c.id.desc())
        .limit(limit)
    )
    if before is not None:
        query = query.where(notify_attempts.c.id < before)
    return list((await conn.execute(query)).mappings())


async def target_of(
    conn: AsyncConnection, endpoint_id: uuid.UUID, owner: str | None
) -> notify.Target | None:
    """The endpoint as a send needs it: its URL and the secrets in force now."""
    e = notify_endpoints.c
    row = (
        await conn.execute(
            sa.select(
                e.id,
                e.url,
                e.secret,
                e.previous_secret,
                e.previous_secret_expires_at,
                sa.func.now(),
            ).where(_mine(endpoint_id, owner))
        )
    ).first()
    if row is None:
        return None
    secrets = secrets_in_force(
        row.secret, row.previous_secret, row.previous_secret_expires_at, row.now
    )
    return notify.Target(row.id, row.url, tuple(secrets))


async def local_endpoint_secret(conn: AsyncConnection, url: str, created_by: str) -> str:
    """The secret of the `all_clients` endpoint of `created_by` at `url`, made if there is
    none (`make run`'s local consumer, the same on every run)."""
    found = await conn.scalar(
        sa.select(notify_endpoints.c.secret).where(
            notify_endpoints.c.url == url,
            notify_endpoints.c.created_by == created_by,
            notify_endpoints.c.all_clients,
        )
    )
    if found is not None:
        return str(found)
    new = NewEndpoint(
        url=url,
        types=None,
        description="make run's local consumer: prints what it is sent",
        rate_limit_per_s=None,
        all_clients=True,
        created_by=created_by,
        secret=new_secret(),
    )
    made = await create_endpoint(conn, new)
    return str(made["secret"])
