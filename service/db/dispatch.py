"""The dispatch queue: every statement that claims or fences subscriptions lives here.

A subscription has work when `next_attempt_at` is set; it is due when that time has passed.
Claiming pushes `next_attempt_at` forward by a lease and stamps a fresh `claim_token`, so a
dispatcher that dies mid-call loses nothing: once the lease runs out the row is due again and
another dispatcher claims it, and the dead one's token no longer matches if it comes back.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.tables import subscriptions
from service.domain.subscriptions import (
    CallOutcome,
    Operation,
    SubscriptionState,
    Transition,
    transition,
)

DISPATCH_CHANNEL = "dispatch_due"


@dataclasses.dataclass(frozen=True)
class Claim:
    subscription_id: uuid.UUID
    claim_token: uuid.UUID
    operation: Operation
    carrier_code: str
    tracking_number: str
    carrier_id: str | None
    attempt: int


async def claim_due(
    conn: AsyncConnection, *, limit: int, lease_s: float, due_by: datetime | None = None
) -> list[Claim]:
    """Claim up to `limit` subscriptions due by `due_by` (default: now), oldest due first.

    Safe with any number of dispatchers: SKIP LOCKED makes concurrent claimers pass over rows
    another transaction is claiming, and the claim moves `next_attempt_at` past now, so a
    committed claim is not due for anyone else until its lease expires. Expired leases are
    simply due rows, taken back by the same statement.
    """
    due = (
        sa.select(subscriptions.c.id)
        .where(subscriptions.c.next_attempt_at <= (due_by or sa.func.now()))
        .order_by(subscriptions.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    claim = (
        sa.update(subscriptions)
        .where(subscriptions.c.id.in_(sa.select(due.c.id)))
        .values(
            claim_token=sa.func.gen_random_uuid(),
            next_attempt_at=sa.func.now() + timedelta(seconds=lease_s),
            attempts=subscriptions.c.attempts + 1,
        )
        .returning(
            subscriptions.c.id,
            subscriptions.c.claim_token,
            subscriptions.c.state,
            subscriptions.c.carrier_code,
            subscriptions.c.tracking_number,
            subscriptions.c.carrier_id,
            subscriptions.c.attempts,
        )
    )
    rows = (await conn.execute(claim)).all()
    return [
        Claim(
            subscription_id=row.id,
            claim_token=row.claim_token,
            operation=Operation.for_state(SubscriptionState(row.state)),
            carrier_code=row.carrier_code,
            tracking_number=row.tracking_number,
            carrier_id=row.carrier_id,
            attempt=row.attempts,
        )
        for row in rows
    ]


async def record_outcome(
    conn: AsyncConnection, claim: Claim, outcome: CallOutcome, retry_in_s: float
) -> Transition | None:
    """Apply a call's outcome if the claim still holds; None if it was lost (lease expired).

    The row is locked while its current state is read, so a cancel committed during the call
    is seen and the transition honours it.
    """
    current = (
        await conn.execute(
            sa.select(subscriptions.c.state)
            .where(
                subscriptions.c.id == claim.subscription_id,
                subscriptions.c.claim_token == claim.claim_token,
            )
            .with_for_update()
        )
    ).scalar_one_or_none()
    if current is None:
        return None
    moved = transition(SubscriptionState(current), claim.operation, outcome, retry_in_s)
    due_at = (
        None if moved.retry_in_s is None else sa.func.now() + timedelta(seconds=moved.retry_in_s)
    )
    await conn.execute(
        sa.update(subscriptions)
        .where(subscriptions.c.id == claim.subscription_id)
        .values(
            state=moved.state.value,
            claim_token=None,
            next_attempt_at=due_at,
            # Retries of the same call count up for backoff; a new call starts from zero.
            attempts=subscriptions.c.attempts if moved.state.value == current else 0,
            last_error=moved.last_error,
            updated_at=sa.func.now(),
        )
    )
    return moved


async def release(conn: AsyncConnection, claims: list[Claim]) -> None:
    """Give back claims whose call was abandoned (shutdown): due again at once, attempt unspent."""
    for claim in claims:
        await conn.execute(
            sa.update(subscriptions)
            .where(
                subscriptions.c.id == claim.subscription_id,
                subscriptions.c.claim_token == claim.claim_token,
            )
            .values(
                claim_token=None,
                next_attempt_at=sa.func.now(),
                attempts=sa.func.greatest(subscriptions.c.attempts - 1, 0),
            )
        )


async def database_now(conn: AsyncConnection) -> datetime:
    now: datetime = (await conn.execute(sa.select(sa.func.now()))).scalar_one()
    return now


async def next_due_in_s(conn: AsyncConnection) -> float | None:
    """Seconds until the earliest work is due (0 if due now); None when there is none."""
    query = sa.select(
        sa.func.extract(
            "epoch", sa.func.min(subscriptions.c.next_attempt_at) - sa.func.clock_timestamp()
        )
    ).where(subscriptions.c.next_attempt_at.is_not(None))
    seconds = (await conn.execute(query)).scalar_one_or_none()
    return None if seconds is None else max(float(seconds), 0.0)
