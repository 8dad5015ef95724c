"""The reconciler's queries: which silent packages to ask ShipEngine about, and which are done."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.dispatch import admit, spend_tokens, work_is_due
from service.db.tables import WATCHED, subscriptions
from service.domain.subscriptions import Budget
from service.domain.tracking import TERMINAL_STATUSES


@dataclasses.dataclass(frozen=True)
class Watched:
    subscription_id: uuid.UUID
    carrier_code: str
    tracking_number: str


async def mark_done(conn: AsyncConnection, after_s: float) -> int:
    """Delivered packages heard of longer ago than `after_s` cost nothing more from now on."""
    result = await conn.execute(
        sa.update(subscriptions)
        .where(
            WATCHED,
            subscriptions.c.status_code.in_(sorted(TERMINAL_STATUSES)),
            subscriptions.c.last_heard_at < sa.func.now() - timedelta(seconds=after_s),
        )
        .values(done_at=sa.func.now(), updated_at=sa.func.now())
    )
    return result.rowcount or 0


async def claim_silent(
    conn: AsyncConnection,
    *,
    limit: int,
    silence_s: Mapping[str | None, float],
    budget: Budget,
) -> list[Watched]:
    """Claim packages silent past their status's threshold, oldest silence first.

    Polls use the dispatchers' rate budget, and only what starts and stops leave: while any
    of them is due, nothing is polled. Claiming stamps `last_polled_at`, so concurrent
    reconcilers (SKIP LOCKED) and the next round pass over it.
    """
    if await work_is_due(conn):
        return []
    admission = await admit(conn, limit, budget)
    if admission.allowed == 0:
        return []
    # Silent since we last heard or asked, or, never having done either, since it was created.
    heard = sa.func.coalesce(
        sa.func.greatest(subscriptions.c.last_heard_at, subscriptions.c.last_polled_at),
        subscriptions.c.created_at,
    )
    default_s = silence_s.get(None, max(silence_s.values()))
    threshold_s = sa.case(
        *[
            (subscriptions.c.status_code == status, seconds)
            for status, seconds in silence_s.items()
            if status is not None
        ],
        else_=default_s,
    )
    silent = (
        sa.select(subscriptions.c.id)
        .where(
            WATCHED,
            subscriptions.c.next_attempt_at.is_(None),
            sa.or_(
                subscriptions.c.status_code.is_(None),
                subscriptions.c.status_code.not_in(sorted(TERMINAL_STATUSES)),
            ),
            heard < sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, threshold_s),
        )
        .order_by(heard)
        .limit(admission.allowed)
        .with_for_update(skip_locked=True)
        .cte("silent")
    )
    rows = await conn.execute(
        sa.update(subscriptions)
        .where(subscriptions.c.id.in_(sa.select(silent.c.id)))
        .values(last_polled_at=sa.func.now())
        .returning(
            subscriptions.c.id, subscriptions.c.carrier_code, subscriptions.c.tracking_number
        )
    )
    claimed = [Watched(row.id, row.carrier_code, row.tracking_number) for row in rows]
    if claimed:
        await spend_tokens(conn, admission, len(claimed))
    return claimed
