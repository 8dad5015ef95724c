"""Subscription queries. Each takes a connection and never commits: callers own transactions."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.deliveries import adopt_orphans, lock_packages
from service.db.driver import Statement, driver_connection, json_rows
from service.db.tables import (
    LIVE_SQL,
    dispatch_attempts,
    status_changes,
    subscriptions,
    tracking_events,
)
from service.domain.subscriptions import SubscriptionState
from service.domain.tracking import RearmPolicy

# The columns a caller sees; the dispatch bookkeeping stays inside.
PUBLIC_COLUMNS = tuple(
    column
    for column in subscriptions.c
    if column.name
    not in (
        "attempts",
        "next_attempt_at",
        "claim_token",
        "rearms",
        "last_polled_at",
        "done_at",
        "change_sequence",
        "stale_noted_at",
    )
)


@dataclasses.dataclass(frozen=True)
class NewSubscription:
    carrier_code: str
    tracking_number: str
    carrier_id: str | None = None
    reference: str | None = None
    metadata: dict[str, Any] | None = None
    created_by: str | None = None


@dataclasses.dataclass(frozen=True)
class SubscriptionFilter:
    state: str | None = None
    status_code: str | None = None
    carrier_code: str | None = None
    tracking_number: str | None = None
    created_by: str | None = None


@dataclasses.dataclass(frozen=True)
class Cursor:
    """A position in the newest-first listing: the last row of the previous page."""

    created_at: datetime
    id: uuid.UUID


async def create_subscription(conn: AsyncConnection, new: NewSubscription) -> Subscribed:
    """Insert the subscription with its start due now, or return the live one for its package.

    Returns (row, created).
    """
    ((row, created),) = await create_subscriptions(await driver_connection(conn), [new])
    return row, created


# A subscription's public columns as the driver returns them, and whether this call created it.
Subscribed = tuple[asyncpg.Record, bool]


async def subscribe(
    db: asyncpg.Connection, news: Sequence[NewSubscription], rearm: RearmPolicy
) -> list[Subscribed]:
    """`create_subscriptions`, and the deliveries that came before them filed now, in the same
    transaction (`db` is in one): a subscription is never seen without the history already
    known."""
    made = await create_subscriptions(db, news)
    fresh = [(row["carrier_code"], row["tracking_number"]) for row, new in made if new]
    if not fresh:
        return made
    # Orphans still being committed are waited for, and deliveries that wait for these
    # packages will see the new subscriptions (`share_packages` says why).
    await lock_packages(db, [number for _, number in fresh])
    adopted = await adopt_orphans(db, fresh, rearm)
    if not adopted:
        return made
    # Read again: filing the orphans changed what they show.
    filed = {
        (row["carrier_code"], row["tracking_number"]): row
        for row in await _find_live_many(db, [(number, carrier) for carrier, number in adopted])
    }
    return [
        (filed.get((row["carrier_code"], row["tracking_number"]), row), new) for row, new in made
    ]


async def create_subscriptions(
    db: asyncpg.Connection, news: Sequence[NewSubscription]
) -> list[Subscribed]:
    """Many at once, in one INSERT: for each, its new row, or the live one of its package.

    The partial unique index on live packages makes this safe under concurrent requests: the
    loser of a race inserts nothing and reads the winner's row. The same package twice in one
    batch is created once.
    """
    first_of: dict[tuple[str, str], NewSubscription] = {}
    for new in news:
        first_of.setdefault((new.tracking_number, new.carrier_code), new)
    found: dict[tuple[str, str], Subscribed] = {}
    # A live row that blocked the insert can be stopped before we read it; then insert again.
    for _ in range(3):
        wanted = [new for key, new in first_of.items() if key not in found]
        if not wanted:
            break
        for row in await _insert_new(db, wanted):
            found[(row["tracking_number"], row["carrier_code"])] = (row, True)
        missing = [key for key in first_of if key not in found]
        for row in await _find_live_many(db, missing):
            found[(row["tracking_number"], row["carrier_code"])] = (row, False)
    if len(found) < len(first_of):
        raise RuntimeError("subscriptions kept changing under concurrent stops")
    results, seen = [], set()
    for new in news:
        key = (new.tracking_number, new.carrier_code)
        row, created = found[key]
        results.append((row, created and key not in seen))
        seen.add(key)
    return results


# One statement text whatever the number of rows: the rows go as one JSON parameter
# (`db/driver.py` says why), one parameter, not six per row. SQLAlchemy's "insertmanyvalues"
# form bound and processed each row's values one by one: a quarter of the API's CPU in a batch
# of 1,000 (py-spy of the former subscribe suite's bulk load). The conflict target names the
# live-package index by its predicate, as ON CONFLICT requires.
_INSERT_NEW = Statement.of(
    f"""
    INSERT INTO subscriptions
        (carrier_code, tracking_number, carrier_id, reference, metadata, created_by, state,
         next_attempt_at)
    SELECT v.carrier_code, v.tracking_number, v.carrier_id, v.reference, v.metadata,
           v.created_by, '{SubscriptionState.PENDING.value}', now()
    FROM ROWS FROM (
        json_to_recordset(CAST(:rows AS json)) AS (
            carrier_code text, tracking_number text, carrier_id text, reference text,
            metadata jsonb, created_by text)
    ) WITH ORDINALITY AS v(carrier_code, tracking_number, carrier_id, reference, metadata,
                           created_by, ord)
    ORDER BY v.ord
    ON CONFLICT (tracking_number, carrier_code) WHERE {LIVE_SQL} DO NOTHING
    RETURNING {", ".join(column.name for column in PUBLIC_COLUMNS)}
    """
)


async def _insert_new(
    db: asyncpg.Connection, news: Sequence[NewSubscription]
) -> list[asyncpg.Record]:
    rows = [
        {
            "carrier_code": new.carrier_code,
            "tracking_number": new.tracking_number,
            "carrier_id": new.carrier_id,
            "reference": new.reference,
            "metadata": new.metadata,
            "created_by": new.created_by,
        }
        for new in news
    ]
    return await _INSERT_NEW.fetch(db, rows=json_rows(rows))


_FIND_LIVE_MANY = Statement.of(
    f"""
    SELECT {", ".join(column.name for column in PUBLIC_COLUMNS)}
    FROM subscriptions
    WHERE (tracking_number, carrier_code) IN (
        SELECT * FROM unnest(CAST(:numbers AS text[]), CAST(:carriers AS text[])))
      AND {LIVE_SQL}
    """
)


async def _find_live_many(
    db: asyncpg.Connection, keys: Sequence[tuple[str, str]]
) -> list[asyncpg.Record]:
    """The live subscriptions of these (tracking number, carrier code) packages."""
    if not keys:
        return []
    numbers, carriers = zip(*keys, strict=True)
    return await _FIND_LIVE_MANY.fetch(db, numbers=list(numbers), carriers=list(carriers))


async def get_subscription(conn: AsyncConnection, subscription_id: uuid.UUID) -> RowMapping | None:
    query = sa.select(*PUBLIC_COLUMNS).where(subscriptions.c.id == subscription_id)
    return (await conn.execute(query)).mappings().first()


async def list_subscriptions(
    conn: AsyncConnection, where: SubscriptionFilter, limit: int, after: Cursor | None
) -> list[RowMapping]:
    """Newest first, by keyset: cost does not grow with how deep the page is."""
    query = sa.select(*PUBLIC_COLUMNS)
    for name, value in dataclasses.asdict(where).items():
        if value is not None:
            query = query.where(subscriptions.c[name] == value)
    if after is not None:
        query = query.where(
            sa.tuple_(subscriptions.c.created_at, subscriptions.c.id)
            < sa.tuple_(sa.literal(after.created_at), sa.literal(after.id))
        )
    query = query.order_by(subscriptions.c.created_at.desc(), subscriptions.c.id.desc())
    return list((await conn.execute(query.limit(limit))).mappings())


async def request_stop(conn: AsyncConnection, subscription_id: uuid.UUID) -> RowMapping | None:
    """Mark a live subscription `stopping` with its stop call due; None if it does not exist.

    A row whose start is in flight (claimed) keeps its claim: the dispatcher sees `stopping`
    when it records the start's outcome and makes the stop due then, so calls for one
    subscription never overlap. A stopped or stopping row is returned unchanged.
    """
    update = (
        sa.update(subscriptions)
        .where(
            subscriptions.c.id == subscription_id,
            subscriptions.c.state.not_in(
                [SubscriptionState.STOPPING.value, SubscriptionState.STOPPED.value]
            ),
        )
        .values(
            state=SubscriptionState.STOPPING.value,
            attempts=0,
            next_attempt_at=sa.case(
                (subscriptions.c.claim_token.is_(None), sa.func.now()),
                else_=subscriptions.c.next_attempt_at,
            ),
            updated_at=sa.func.now(),
        )
        .returning(*PUBLIC_COLUMNS)
    )
    stopped = (await conn.execute(update)).mappings().first()
    return stopped if stopped is not None else await get_subscription(conn, subscription_id)


async def list_events(conn: AsyncConnection, subscription_id: uuid.UUID) -> list[RowMapping]:
    query = (
        sa.select(tracking_events)
        .where(tracking_events.c.subscription_id == subscription_id)
        .order_by(tracking_events.c.occurred_at.desc().nulls_last(), tracking_events.c.id.desc())
    )
    return list((await conn.execute(query)).mappings())


async def list_attempts(conn: AsyncConnection, subscription_id: uuid.UUID) -> list[RowMapping]:
    query = (
        sa.select(dispatch_attempts)
        .where(dispatch_attempts.c.subscription_id == subscription_id)
        .order_by(dispatch_attempts.c.id.desc())
    )
    return list((await conn.execute(query)).mappings())


async def retry_failed(conn: AsyncConnection, subscription_id: uuid.UUID) -> RowMapping | None:
    """Put a failed subscription back to `pending` with its start due now and a fresh count.

    Returns None when there is no failed subscription with that id; `last_error` stays until
    the next call's outcome replaces it.
    """
    update = (
        sa.update(subscriptions)
        .where(
            subscriptions.c.id == subscription_id,
            subscriptions.c.state == SubscriptionState.FAILED.value,
        )
        .values(
            state=SubscriptionState.PENDING.value,
            attempts=0,
            next_attempt_at=sa.func.now(),
            updated_at=sa.func.now(),
        )
        .returning(*PUBLIC_COLUMNS)
    )
    return (await conn.execute(update)).mappings().first()


async def list_status_changes(
    conn: AsyncConnection, subscription_id: uuid.UUID
) -> list[RowMapping]:
    query = (
        sa.select(status_changes)
        .where(status_changes.c.subscription_id == subscription_id)
        .order_by(status_changes.c.id.desc())
    )
    return list((await conn.execute(query)).mappings())
