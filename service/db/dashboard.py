"""The one query the dashboard needs that the service had not: the latest webhook deliveries."""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.tables import webhook_deliveries
from service.domain.deliveries import DeliveryOutcome

DELIVERY_COLUMNS = (
    webhook_deliveries.c.id,
    webhook_deliveries.c.received_at,
    webhook_deliveries.c.outcome,
    webhook_deliveries.c.refusal,
    webhook_deliveries.c.tracking_number,
    webhook_deliveries.c.carrier_code,
    webhook_deliveries.c.source,
    webhook_deliveries.c.subscription_id,
)


@dataclasses.dataclass(frozen=True)
class DeliveryFilter:
    outcome: DeliveryOutcome | None = None
    tracking_number: str | None = None


async def recent_deliveries(
    conn: AsyncConnection, where: DeliveryFilter, limit: int, before_id: int | None = None
) -> list[RowMapping]:
    """Newest first by id (ids grow with arrival), keyset-paged by `before_id`."""
    query = sa.select(*DELIVERY_COLUMNS)
    if where.outcome is not None:
        query = query.where(webhook_deliveries.c.outcome == where.outcome.value)
    if where.tracking_number is not None:
        query = query.where(webhook_deliveries.c.tracking_number == where.tracking_number)
    if before_id is not None:
        query = query.where(webhook_deliveries.c.id < before_id)
    query = query.order_by(webhook_deliveries.c.id.desc()).limit(limit)
    return list((await conn.execute(query)).mappings())
