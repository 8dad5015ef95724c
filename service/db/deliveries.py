"""Webhook deliveries: stored raw, then filed against their subscription, in one transaction."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.subscriptions import LIVE
from service.db.tables import subscriptions, tracking_events, webhook_deliveries
from service.domain.tracking import TrackingUpdate


@dataclasses.dataclass(frozen=True)
class FiledDelivery:
    delivery_id: int
    outcome: str  # "filed" or "orphan"
    subscription_id: uuid.UUID | None
    new_events: int


async def store_and_file(
    conn: AsyncConnection, *, headers: dict[str, str], body: bytes, update: TrackingUpdate
) -> FiledDelivery:
    """Keep the raw delivery and file its news against the live subscription of its package.

    A delivery that matches no live subscription is kept as an orphan, never dropped.
    """
    subscription = await _lock_subscription(conn, update)
    subscription_id = subscription.id if subscription is not None else None
    delivery_id = (
        await conn.execute(
            sa.insert(webhook_deliveries)
            .values(
                headers=headers,
                body=body,
                body_sha256=hashlib.sha256(body).digest(),
                resource_type=update.resource_type,
                carrier_code=update.carrier_code,
                tracking_number=update.tracking_number,
                subscription_id=subscription_id,
                outcome="filed" if subscription is not None else "orphan",
            )
            .returning(webhook_deliveries.c.id)
        )
    ).scalar_one()
    if subscription is None:
        return FiledDelivery(delivery_id, "orphan", None, 0)
    new_events = await _add_events(conn, subscription.id, delivery_id, update)
    await _update_status(conn, subscription.id, update)
    return FiledDelivery(delivery_id, "filed", subscription.id, new_events)


async def _lock_subscription(conn: AsyncConnection, update: TrackingUpdate) -> sa.Row[Any] | None:
    """The live subscription for the package, locked so concurrent deliveries file in turn.

    The carrier code can be missing from a delivery; the tracking number alone then decides.
    """
    if update.tracking_number is None:
        return None
    query = sa.select(subscriptions.c.id).where(
        subscriptions.c.tracking_number == update.tracking_number, LIVE
    )
    if update.carrier_code is not None:
        query = query.where(subscriptions.c.carrier_code == update.carrier_code)
    query = query.order_by(subscriptions.c.created_at.desc()).limit(1).with_for_update()
    return (await conn.execute(query)).first()


async def _add_events(
    conn: AsyncConnection, subscription_id: uuid.UUID, delivery_id: int, update: TrackingUpdate
) -> int:
    """Insert the events the subscription does not have yet; returns how many were new."""
    if not update.events:
        return 0
    rows = [
        {**event.as_row(), "subscription_id": subscription_id, "delivery_id": delivery_id}
        for event in update.events
    ]
    insert = (
        pg_insert(tracking_events)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["subscription_id", "event_key"])
        .returning(tracking_events.c.id)
    )
    return len((await conn.execute(insert)).all())


async def _update_status(
    conn: AsyncConnection, subscription_id: uuid.UUID, update: TrackingUpdate
) -> None:
    """Take the delivery's status unless it is older than what the subscription shows."""
    newest = update.newest_event_at
    values: dict[str, Any] = {"updated_at": sa.func.now()}
    not_older: sa.ColumnElement[bool] = sa.true()
    if newest is not None:
        values["last_event_at"] = sa.func.greatest(subscriptions.c.last_event_at, newest)
        not_older = sa.or_(
            subscriptions.c.last_event_at.is_(None), subscriptions.c.last_event_at <= newest
        )
    status = {
        "status_code": update.status_code,
        "status_description": update.status_description,
        "estimated_delivery_date": update.estimated_delivery_date,
        "actual_delivery_date": update.actual_delivery_date,
    }
    for name, value in status.items():
        # A field the delivery leaves out keeps what we know; it is no news.
        if value is not None:
            values[name] = sa.case((not_older, value), else_=subscriptions.c[name])
    await conn.execute(
        sa.update(subscriptions).where(subscriptions.c.id == subscription_id).values(values)
    )
