"""What ops look at and act on: counts, timelines, what is stuck, what failed, bulk retries."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db import notify
from service.db.dispatch import backlog, current_pause
from service.db.subscriptions import PUBLIC_COLUMNS
from service.db.tables import (
    WATCHED,
    dispatch_attempts,
    status_changes,
    subscriptions,
    webhook_deliveries,
    webhook_refusal_counts,
)
from service.domain.deliveries import DeliveryOutcome
from service.domain.subscriptions import SubscriptionState

FAILED = subscriptions.c.state == SubscriptionState.FAILED.value
# The first error code ShipEngine gave for the failure, as text.
ERROR_CODE = subscriptions.c.last_error["errors"][0]["error_code"].astext


async def summary(conn: AsyncConnection) -> dict[str, Any]:
    """The whole picture in a handful of grouped counts."""
    due, oldest = await backlog(conn)
    pause = await current_pause(conn)
    by_state, by_status_code, by_carrier, failures_by_error_code = await _subscription_counts(conn)
    return {
        "by_state": by_state,
        "by_status_code": by_status_code,
        "by_carrier": by_carrier,
        "dispatch": {
            "backlog": due,
            "oldest_due_s": round(oldest, 3),
            "paused": pause is not None,
            "pause_kind": pause.kind if pause else None,
            "pause_reason": pause.reason if pause else None,
        },
        "failures_by_error_code": failures_by_error_code,
        "deliveries_last_hour": await _deliveries_last_hour(conn),
        "refusals_unstored_last_hour": await _refusals_unstored_last_hour(conn),
        "notifications": await notify.summary(conn),
    }


async def _subscription_counts(
    conn: AsyncConnection,
) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
    """Subscriptions by state, by status code, by carrier, and failed ones by error code: one
    pass over the table grouped by all four (a few hundred groups), summed up here. Four
    grouped counts took three scans and 1.7 times as long (1M subscriptions: 0.43 s, now 0.25 s)."""
    status_code = sa.func.coalesce(subscriptions.c.status_code, "")
    error_code = sa.case((FAILED, sa.func.coalesce(ERROR_CODE, "none")))
    rows = await conn.execute(
        sa.select(
            subscriptions.c.state,
            status_code,
            subscriptions.c.carrier_code,
            error_code,
            sa.func.count(),
        ).group_by(*(sa.literal_column(str(position)) for position in range(1, 5)))
    )
    counts: tuple[Counter[str], ...] = (Counter(), Counter(), Counter(), Counter())
    for state, status, carrier, error, n in rows:
        counts[0][state] += n
        counts[1][status] += n
        counts[2][carrier] += n
        if error is not None:
            counts[3][error] += n
    by_state, by_status_code, by_carrier, failures = (dict(c) for c in counts)
    return by_state, by_status_code, by_carrier, failures


async def _counts(
    conn: AsyncConnection, key: sa.ColumnElement[Any], *where: sa.ColumnElement[bool]
) -> dict[str, int]:
    rows = await conn.execute(
        sa.select(key.label("key"), sa.func.count()).where(*where).group_by(sa.literal_column("1"))
    )
    return {str(k): n for k, n in rows}


async def _deliveries_last_hour(conn: AsyncConnection) -> dict[str, int]:
    """By outcome; refusals by reason (`refused:bad_signature`)."""
    label = sa.case(
        (
            webhook_deliveries.c.outcome == DeliveryOutcome.REFUSED.value,
            sa.func.concat(f"{DeliveryOutcome.REFUSED}:", webhook_deliveries.c.refusal),
        ),
        else_=webhook_deliveries.c.outcome,
    )
    return await _counts(
        conn, label, webhook_deliveries.c.received_at > sa.func.now() - timedelta(hours=1)
    )


async def _refusals_unstored_last_hour(conn: AsyncConnection) -> dict[str, int]:
    """Refusals counted, not stored (no signature headers, or past the sample), by reason:
    with `deliveries_last_hour`'s `refused:<reason>` (the sample), every refusal. Counts are
    per minute, added every few seconds by each API process."""
    counts = webhook_refusal_counts
    rows = await conn.execute(
        sa.select(counts.c.reason, sa.func.sum(counts.c.unstored))
        .where(counts.c.minute > sa.func.now() - timedelta(hours=1))
        .group_by(counts.c.reason)
    )
    return {reason: int(total) for reason, total in rows}


async def timeline(conn: AsyncConnection, subscription_id: Any) -> list[dict[str, Any]]:
    """Everything that happened to one subscription, in order: why is this shipment stale?"""
    created = sa.select(
        subscriptions.c.created_at.label("at"),
        sa.literal("created").label("kind"),
        sa.func.json_build_object("created_by", subscriptions.c.created_by).label("detail"),
        sa.literal(0).label("rank"),  # at equal times: cause before effect
    ).where(subscriptions.c.id == subscription_id)
    attempts = sa.select(
        dispatch_attempts.c.started_at,
        sa.func.concat(dispatch_attempts.c.operation, "_attempt"),
        sa.func.json_build_object(
            "attempt", dispatch_attempts.c.attempt,
            "outcome", dispatch_attempts.c.outcome,
            "http_status", dispatch_attempts.c.http_status,
            "error_code", dispatch_attempts.c.error_code,
            "request_id", dispatch_attempts.c.request_id,
            "latency_ms", dispatch_attempts.c.latency_ms,
            "claim_lost", dispatch_attempts.c.claim_lost,
        ),
        sa.literal(1),
    ).where(dispatch_attempts.c.subscription_id == subscription_id)  # fmt: skip
    deliveries = sa.select(
        webhook_deliveries.c.received_at,
        sa.case((webhook_deliveries.c.source == "poll", "poll"), else_="webhook"),
        sa.func.json_build_object(
            "delivery_id", webhook_deliveries.c.id,
            "outcome", webhook_deliveries.c.outcome,
            "verification", webhook_deliveries.c.verification,
        ),
        sa.literal(2),
    ).where(webhook_deliveries.c.subscription_id == subscription_id)  # fmt: skip
    changes = sa.select(
        status_changes.c.learned_at,
        sa.literal("status_change"),
        sa.func.json_build_object(
            "from", status_changes.c.previous_status_code,
            "to", status_changes.c.status_code,
            "occurred_at", status_changes.c.occurred_at,
        ),
        sa.literal(3),
    ).where(status_changes.c.subscription_id == subscription_id)  # fmt: skip
    union = sa.union_all(created, attempts, deliveries, changes).subquery()
    rows = await conn.execute(sa.select(union).order_by(union.c.at, union.c.rank))
    return [{"at": row.at, "kind": row.kind, "detail": row.detail} for row in rows]


@dataclasses.dataclass(frozen=True)
class StuckLimits:
    pending_for: timedelta
    silent_for: timedelta
    limit: int


async def stuck(conn: AsyncConnection, limits: StuckLimits) -> dict[str, list[RowMapping]]:
    """Pending too long (not started), and active but silent too long (webhooks missing?)."""
    pending = await conn.execute(
        sa.select(*PUBLIC_COLUMNS)
        .where(
            subscriptions.c.state == SubscriptionState.PENDING.value,
            subscriptions.c.created_at < sa.func.now() - limits.pending_for,
        )
        .order_by(subscriptions.c.created_at)
        .limit(limits.limit)
    )
    heard = sa.func.coalesce(subscriptions.c.last_heard_at, subscriptions.c.created_at)
    silent = await conn.execute(
        sa.select(*PUBLIC_COLUMNS)
        .where(
            WATCHED,
            heard < sa.func.now() - limits.silent_for,
        )
        .order_by(heard)
        .limit(limits.limit)
    )
    return {"pending": list(pending.mappings()), "silent": list(silent.mappings())}


async def failures(conn: AsyncConnection, per_code: int) -> dict[str, dict[str, Any]]:
    """Failed subscriptions grouped by ShipEngine's error code, with a few of each."""
    counts = await _counts(conn, sa.func.coalesce(ERROR_CODE, "none"), FAILED)
    groups: dict[str, dict[str, Any]] = {}
    for code, count in sorted(counts.items(), key=lambda item: -item[1]):
        code_matches = ERROR_CODE.is_(None) if code == "none" else ERROR_CODE == code  # noqa: SIM300
        examples = await conn.execute(
            sa.select(*PUBLIC_COLUMNS)
            .where(FAILED, code_matches)
            .order_by(subscriptions.c.updated_at.desc())
            .limit(per_code)
        )
        groups[code] = {"count": count, "examples": list(examples.mappings())}
    return groups


@dataclasses.dataclass(frozen=True)
class FailedFilter:
    error_code: str | None = None
    carrier_code: str | None = None
    created_by: str | None = None


async def retry_failed_many(conn: AsyncConnection, where: FailedFilter, dry_run: bool) -> int:
    """Put every failed subscription matching `where` back to pending; or count them."""
    conditions = [FAILED]
    if where.error_code is not None:
        conditions.append(ERROR_CODE == where.error_code)  # noqa: SIM300
    if where.carrier_code is not None:
        conditions.append(subscriptions.c.carrier_code == where.carrier_code)
    if where.created_by is not None:
        conditions.append(subscriptions.c.created_by == where.created_by)
    if dry_run:
        query = sa.select(sa.func.count()).select_from(subscriptions).where(*conditions)
        return int((await conn.execute(query)).scalar_one())
    result = await conn.execute(
        sa.update(subscriptions)
        .where(*conditions)
        .values(
            state=SubscriptionState.PENDING.value,
            attempts=0,
            next_attempt_at=sa.func.now(),
            updated_at=sa.func.now(),
        )
    )
    return result.rowcount or 0
