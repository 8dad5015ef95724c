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
    values = _delivery_values(incoming)
    original = (
        await conn.execute(_INSERT_ORIGINAL, {**values, "outcome": "orphan"})
    ).scalar_one_or_none()
    if original is not None:
        return await file_delivery(conn, original, update, rearm)
    copy = await conn.execute(
        _INSERT_COPY, {**values, "outcome": "duplicate", "b_content": incoming.content_sha256}
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
    params = {"b_id": delivery_id, "outcome": outcome, "subscription_id": subscription_id}
    await conn.execute(_MARK, params)


async def _lock_subscription(conn: AsyncConnection, update: TrackingUpdate) -> Row[Any] | None:
    """The live subscription for the package, locked so concurrent deliveries file in turn.

    The carrier code can be missing from a delivery; the tracking number alone then decides.
    """
    if update.tracking_number is None:
        return None
    params = {"b_number": update.tracking_number, "b_carrier": update.carrier_code}
    query = _LOCK_BY_NUMBER if update.carrier_code is None else _LOCK_BY_PACKAGE
    row: Row[Any] | None = (await conn.execute(query, params)).first()
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
    changed = decision.take and update.status_code != subscription.status_code
    rearmed = changed and _should_rearm(subscription, update, rearm)
    await conn.execute(
        _UPDATE_STATUS,
        {
            "b_id": subscription.id,
            "b_newest": newest,
            "b_take": decision.take,
            "b_status_code": update.status_code,
            "b_status_description": update.status_description,
            "b_estimated": update.estimated_delivery_date,
            "b_actual": update.actual_delivery_date,
            "b_rearm_in": timedelta(seconds=rearm.delay_s) if rearmed else None,
        },
    )
    if changed:
        await conn.execute(
            _INSERT_STATUS_CHANGE,
            {
                "subscription_id": subscription.id,
                "previous_status_code": subscription.status_code,
                "status_code": update.status_code,
                "occurred_at": newest,
                "delivery_id": delivery_id,
            },
        )
    return FiledDelivery(
        delivery_id,
        "filed",
        subscription.id,
        status_changed=changed,
        regression=decision.regression,
        rearmed=rearmed,
    )


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


# The statements of the webhook path, built once: per delivery only parameters change, so
# SQLAlchemy neither rebuilds nor recompiles them (profiling showed both on every delivery).
_INSERT_ORIGINAL = (
    pg_insert(webhook_deliveries)
    .on_conflict_do_nothing(index_elements=["content_sha256"], index_where=ORIGINALS)
    .returning(webhook_deliveries.c.id)
)

# A copy is filed against whatever its original was filed against.
_INSERT_COPY = (
    sa.insert(webhook_deliveries)
    .values(
        subscription_id=sa.select(webhook_deliveries.c.subscription_id)
        .where(webhook_deliveries.c.content_sha256 == sa.bindparam("b_content"), ORIGINALS)
        .scalar_subquery()
    )
    .returning(webhook_deliveries.c.id, webhook_deliveries.c.subscription_id)
)

_MARK = (
    sa.update(webhook_deliveries)
    .where(webhook_deliveries.c.id == sa.bindparam("b_id"))
    .values(outcome=sa.bindparam("outcome"), subscription_id=sa.bindparam("subscription_id"))
)


def _lock(*where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    return (
        sa.select(
            subscriptions.c.id,
            subscriptions.c.state,
            subscriptions.c.status_code,
            subscriptions.c.last_event_at,
            subscriptions.c.rearms,
            subscriptions.c.next_attempt_at,
            subscriptions.c.done_at,
        )
        .where(subscriptions.c.tracking_number == sa.bindparam("b_number"), LIVE, *where)
        .order_by(subscriptions.c.created_at.desc())
        .limit(1)
        .with_for_update()
    )


_LOCK_BY_NUMBER = _lock()
_LOCK_BY_PACKAGE = _lock(subscriptions.c.carrier_code == sa.bindparam("b_carrier"))


_TAKE = sa.bindparam("b_take", type_=sa.Boolean())


def _taken(
    column: str, param: str, type_: sa.types.TypeEngine[Any], *, keep_if_missing: bool
) -> Any:
    """The delivery's value when its status is taken, else the current one. A field the
    delivery leaves out (None) keeps what we know when `keep_if_missing`: it is no news."""
    value = sa.bindparam(f"b_{param}", type_=type_)
    current = subscriptions.c[column]
    new = sa.func.coalesce(value, current) if keep_if_missing else value
    return sa.case((_TAKE, new), else_=current)


_REARM_IN = sa.bindparam("b_rearm_in", type_=sa.Interval())
_UPDATE_STATUS = (
    sa.update(subscriptions)
    .where(subscriptions.c.id == sa.bindparam("b_id"))
    .values(
        updated_at=sa.func.now(),
        last_heard_at=sa.func.now(),
        last_event_at=sa.func.coalesce(
            sa.func.greatest(
                subscriptions.c.last_event_at,
                sa.bindparam("b_newest", type_=sa.DateTime(timezone=True)),
            ),
            subscriptions.c.last_event_at,
        ),
        status_code=_taken("status_code", "status_code", sa.Text(), keep_if_missing=False),
        status_description=_taken(
            "status_description", "status_description", sa.Text(), keep_if_missing=True
        ),
        estimated_delivery_date=_taken(
            "estimated_delivery_date", "estimated", sa.DateTime(timezone=True), keep_if_missing=True
        ),
        actual_delivery_date=_taken(
            "actual_delivery_date", "actual", sa.DateTime(timezone=True), keep_if_missing=True
        ),
        # A restart of tracking after an EX: due later, counted.
        next_attempt_at=sa.func.coalesce(
            sa.func.now() + _REARM_IN, subscriptions.c.next_attempt_at
        ),
        rearms=subscriptions.c.rearms + sa.case((_REARM_IN.is_not(None), 1), else_=0),
    )
)

_INSERT_STATUS_CHANGE = sa.insert(status_changes)
