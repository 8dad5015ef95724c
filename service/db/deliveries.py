"""Webhook deliveries: stored raw with their verification, then filed, in one transaction.

Filing is one code path for everything that tells us about a package: a webhook, a replay of a
stored delivery, an orphan adopted by a new subscription, a reconciler's poll. It is idempotent:
events are stored once, a status never moves back in time, so filing anything again is harmless.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.subscriptions import LIVE
from service.db.tables import status_changes, subscriptions, tracking_events, webhook_deliveries
from service.domain.subscriptions import SubscriptionState
from service.domain.tracking import (
    EXCEPTION_STATUS,
    RearmPolicy,
    TrackingUpdate,
    decide_status,
    parse_track_payload,
)

# The partial unique index that keeps one original per content, as ON CONFLICT must name it.
ORIGINALS = sa.text("outcome IN ('filed', 'orphan')")


@dataclasses.dataclass(frozen=True)
class Incoming:
    """A delivery as received (or polled), verified and parsed, not yet stored."""

    headers: dict[str, str]
    body: bytes
    update: TrackingUpdate
    content_sha256: bytes
    verification: str
    source: str = "webhook"


@dataclasses.dataclass(frozen=True)
class FiledDelivery:
    delivery_id: int
    outcome: str  # filed, orphan or duplicate
    subscription_id: uuid.UUID | None
    new_events: int = 0
    status_changed: bool = False
    regression: bool = False
    rearmed: bool = False


async def store_and_file(
    conn: AsyncConnection, incoming: Incoming, rearm: RearmPolicy
) -> FiledDelivery:
    """Keep the delivery and file what it says; a copy of stored content is kept as a duplicate.

    The unique index on content recognises a copy before any subscription row is locked, so a
    burst of retries of one delivery does not queue up on its subscription.
    """
    update = incoming.update
    original = (
        await conn.execute(
            pg_insert(webhook_deliveries)
            .values(**_delivery_values(incoming), outcome="orphan")
            .on_conflict_do_nothing(index_elements=["content_sha256"], index_where=ORIGINALS)
            .returning(webhook_deliveries.c.id)
        )
    ).scalar_one_or_none()
    if original is not None:
        return await file_delivery(conn, original, update, rearm)
    first = (
        sa.select(webhook_deliveries.c.subscription_id)
        .where(webhook_deliveries.c.content_sha256 == incoming.content_sha256, ORIGINALS)
        .scalar_subquery()
    )
    copy = await conn.execute(
        sa.insert(webhook_deliveries)
        .values(**_delivery_values(incoming), outcome="duplicate", subscription_id=first)
        .returning(webhook_deliveries.c.id, webhook_deliveries.c.subscription_id)
    )
    delivery_id, subscription_id = copy.one()
    return FiledDelivery(delivery_id, "duplicate", subscription_id)


async def record_refusal(
    conn: AsyncConnection,
    *,
    headers: dict[str, str],
    body: bytes,
    refusal: str,
    verification: str,
) -> int:
    """Keep a refused delivery and why: it was not acknowledged, but ops can see it."""
    delivery_id: int = (
        await conn.execute(
            sa.insert(webhook_deliveries)
            .values(
                headers=headers,
                body=body,
                body_sha256=hashlib.sha256(body).digest(),
                outcome="refused",
                refusal=refusal,
                verification=verification,
            )
            .returning(webhook_deliveries.c.id)
        )
    ).scalar_one()
    return delivery_id


def _delivery_values(incoming: Incoming) -> dict[str, Any]:
    return {
        "headers": incoming.headers,
        "body": incoming.body,
        "body_sha256": hashlib.sha256(incoming.body).digest(),
        "content_sha256": incoming.content_sha256,
        "resource_type": incoming.update.resource_type,
        "carrier_code": incoming.update.carrier_code,
        "tracking_number": incoming.update.tracking_number,
        "source": incoming.source,
        "verification": incoming.verification,
    }


async def file_delivery(
    conn: AsyncConnection,
    delivery_id: int,
    update: TrackingUpdate,
    rearm: RearmPolicy,
    *,
    mark_delivery: bool = True,
) -> FiledDelivery:
    """File a stored delivery against the live subscription of its package (or keep it orphan).

    `mark_delivery=False` files a duplicate's content without touching its row (replays).
    """
    subscription = await _lock_subscription(conn, update)
    if subscription is None:
        if mark_delivery:
            await _mark(conn, delivery_id, "orphan", None)
        return FiledDelivery(delivery_id, "orphan", None)
    new_events = await _add_events(conn, subscription.id, delivery_id, update)
    filed = await _update_status(conn, subscription, delivery_id, update, rearm)
    if mark_delivery:
        await _mark(conn, delivery_id, "filed", subscription.id)
    return dataclasses.replace(filed, new_events=new_events)


async def _mark(
    conn: AsyncConnection, delivery_id: int, outcome: str, subscription_id: uuid.UUID | None
) -> None:
    await conn.execute(
        sa.update(webhook_deliveries)
        .where(webhook_deliveries.c.id == delivery_id)
        .values(outcome=outcome, subscription_id=subscription_id)
    )


async def _lock_subscription(conn: AsyncConnection, update: TrackingUpdate) -> Row[Any] | None:
    """The live subscription for the package, locked so concurrent deliveries file in turn.

    The carrier code can be missing from a delivery; the tracking number alone then decides.
    """
    if update.tracking_number is None:
        return None
    query = sa.select(
        subscriptions.c.id,
        subscriptions.c.state,
        subscriptions.c.status_code,
        subscriptions.c.last_event_at,
        subscriptions.c.rearms,
        subscriptions.c.next_attempt_at,
        subscriptions.c.done_at,
    ).where(subscriptions.c.tracking_number == update.tracking_number, LIVE)
    if update.carrier_code is not None:
        query = query.where(subscriptions.c.carrier_code == update.carrier_code)
    query = query.order_by(subscriptions.c.created_at.desc()).limit(1).with_for_update()
    row: Row[Any] | None = (await conn.execute(query)).first()  # type: ignore[assignment]
    return row


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
    # One statement whatever the number of events: executed for many rows, SQLAlchemy sends
    # them as a multi-row INSERT but compiles it once (a `.values(rows)` would be compiled
    # anew for each count of events, which profiling showed on every delivery).
    return len((await conn.execute(_INSERT_EVENTS, rows)).all())


_INSERT_EVENTS = (
    pg_insert(tracking_events)
    .on_conflict_do_nothing(index_elements=["subscription_id", "event_key"])
    .returning(tracking_events.c.id)
)


async def _update_status(
    conn: AsyncConnection,
    subscription: Row[Any],
    delivery_id: int,
    update: TrackingUpdate,
    rearm: RearmPolicy,
) -> FiledDelivery:
    """Take the delivery's status unless it is older than what the subscription shows."""
    decision = decide_status(subscription.status_code, subscription.last_event_at, update)
    newest = update.newest_event_at
    values: dict[str, Any] = {"updated_at": sa.func.now(), "last_heard_at": sa.func.now()}
    if newest is not None:
        values["last_event_at"] = sa.func.greatest(subscriptions.c.last_event_at, newest)
    changed = decision.take and update.status_code != subscription.status_code
    if decision.take:
        values |= _status_values(update)
    rearmed = changed and _should_rearm(subscription, update, rearm)
    if rearmed:
        values["next_attempt_at"] = sa.func.now() + timedelta(seconds=rearm.delay_s)
        values["rearms"] = subscriptions.c.rearms + 1
    await conn.execute(
        sa.update(subscriptions).where(subscriptions.c.id == subscription.id).values(values)
    )
    if changed:
        await conn.execute(
            sa.insert(status_changes).values(
                subscription_id=subscription.id,
                previous_status_code=subscription.status_code,
                status_code=update.status_code,
                occurred_at=newest,
                delivery_id=delivery_id,
            )
        )
    return FiledDelivery(
        delivery_id,
        "filed",
        subscription.id,
        status_changed=changed,
        regression=decision.regression,
        rearmed=rearmed,
    )


def _status_values(update: TrackingUpdate) -> dict[str, Any]:
    values: dict[str, Any] = {"status_code": update.status_code}
    fields = {
        "status_description": update.status_description,
        "estimated_delivery_date": update.estimated_delivery_date,
        "actual_delivery_date": update.actual_delivery_date,
    }
    # A field the delivery leaves out keeps what we know; it is no news.
    values |= {name: value for name, value in fields.items() if value is not None}
    return values


def _should_rearm(subscription: Row[Any], update: TrackingUpdate, rearm: RearmPolicy) -> bool:
    return (
        update.status_code == EXCEPTION_STATUS
        and subscription.state == SubscriptionState.ACTIVE.value
        and subscription.next_attempt_at is None
        and subscription.done_at is None
        and subscription.rearms < rearm.max_rearms
    )


async def adopt_orphans(
    conn: AsyncConnection, packages: Sequence[tuple[str, str]], rearm: RearmPolicy
) -> set[tuple[str, str]]:
    """File the deliveries that came before their subscriptions; returns the packages that
    had some, as (carrier_code, tracking_number). One indexed query when none had any."""
    wanted = set(packages)
    orphans = (
        await conn.execute(
            sa.select(
                webhook_deliveries.c.id,
                webhook_deliveries.c.body,
                webhook_deliveries.c.carrier_code,
                webhook_deliveries.c.tracking_number,
            )
            .where(
                webhook_deliveries.c.tracking_number.in_({number for _, number in wanted}),
                webhook_deliveries.c.outcome == "orphan",
            )
            .order_by(webhook_deliveries.c.id)
        )
    ).all()
    adopted = set()
    for orphan in orphans:
        # A delivery without a carrier code belongs to whichever carrier has its number.
        matches = [(c, n) for c, n in wanted if n == orphan.tracking_number]
        match = next((p for p in matches if p[0] == orphan.carrier_code), None)
        if match is None and orphan.carrier_code is None and matches:
            match = matches[0]
        if match is not None:
            await file_delivery(conn, orphan.id, _reparse(orphan.body), rearm)
            adopted.add(match)
    return adopted


def _reparse(body: bytes) -> TrackingUpdate:
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    return parse_track_payload(payload)


async def deliveries_to_replay(
    conn: AsyncConnection, received_from: datetime, received_to: datetime
) -> list[int]:
    """Originals received in [from, to): their copies say the same and need no replay."""
    rows = await conn.execute(
        sa.select(webhook_deliveries.c.id)
        .where(
            webhook_deliveries.c.received_at >= received_from,
            webhook_deliveries.c.received_at < received_to,
            webhook_deliveries.c.outcome.in_(["filed", "orphan"]),
        )
        .order_by(webhook_deliveries.c.id)
    )
    return [row.id for row in rows]


async def replay(
    conn: AsyncConnection, delivery_id: int, rearm: RearmPolicy
) -> FiledDelivery | None:
    """File a stored delivery again; None if there is none, or it was refused (never trusted)."""
    row = (
        await conn.execute(
            sa.select(webhook_deliveries.c.body, webhook_deliveries.c.outcome).where(
                webhook_deliveries.c.id == delivery_id
            )
        )
    ).first()
    if row is None or row.outcome == "refused":
        return None
    return await file_delivery(
        conn, delivery_id, _reparse(row.body), rearm, mark_delivery=row.outcome != "duplicate"
    )
