"""The dispatch queue: every statement that claims, fences or pauses dispatching lives here.

A subscription has work when `next_attempt_at` is set; it is due when that time has passed.
Claiming pushes `next_attempt_at` forward by a lease and stamps a fresh `claim_token`, so a
dispatcher that dies mid-call loses nothing: once the lease runs out the row is due again and
another dispatcher claims it, and the dead one's token no longer matches if it comes back.

What all dispatchers of all instances share, the account's rate budget and pauses, lives in
the single `dispatch_control` row.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db import changes
from service.db.tables import dispatch_attempts, dispatch_control, subscriptions
from service.domain.changes import ChangeType, lifecycle_change
from service.domain.subscriptions import (
    Budget,
    CallOutcome,
    Operation,
    OutcomeKind,
    RetryPolicy,
    SubscriptionState,
    Transition,
    transition,
)

DISPATCH_CHANNEL = "dispatch_due"
# The bucket holds at most this many seconds of budget (and at least one call): enough to ride
# out a short stall without losing budget, small enough that an idle spell allows little burst.
BURST_S = 0.25
# Kept unspent: a call reaches ShipEngine some milliseconds after its token is taken, so a
# minute by arrival time can hold a little more than the same minute by sending time.
HEADROOM = 0.02
# A 429 without Retry-After still pauses everyone, for this long.
DEFAULT_RETRY_AFTER_S = 10.0
# While paused for the account, how often the other dispatchers look whether it is over.
PAUSE_RECHECK_S = 5.0


@dataclasses.dataclass(frozen=True)
class Claim:
    subscription_id: uuid.UUID
    claim_token: uuid.UUID
    operation: Operation
    carrier_code: str
    tracking_number: str
    carrier_id: str | None
    attempt: int


@dataclasses.dataclass(frozen=True)
class ClaimRound:
    claims: list[Claim]
    held_for_s: float | None = None  # set when a pause or the budget held claiming back


@dataclasses.dataclass(frozen=True)
class CallResult:
    """A finished call, waiting to be recorded."""

    claim: Claim
    outcome: CallOutcome
    started_at: datetime
    latency_ms: float
    retry_in_s: float  # the backoff drawn for it, used if it is to be retried


@dataclasses.dataclass(frozen=True)
class Pause:
    until: datetime
    kind: str
    reason: dict[str, Any] | None


async def claim_due(
    conn: AsyncConnection,
    *,
    limit: int,
    lease_s: float,
    budget: Budget,
    due_by: datetime | None = None,
) -> ClaimRound:
    """Claim up to `limit` subscriptions due by `due_by` (default: now), oldest due first.

    Safe with any number of dispatchers: SKIP LOCKED makes concurrent claimers pass over rows
    another transaction is claiming, and the claim moves `next_attempt_at` past now, so a
    committed claim is not due for anyone else until its lease expires. Expired leases are
    simply due rows, taken back by the same statement.
    """
    admission = await admit(conn, limit, budget)
    if admission.allowed == 0:
        return ClaimRound([], admission.held_for_s)
    due = (
        sa.select(subscriptions.c.id)
        .where(subscriptions.c.next_attempt_at <= (due_by or sa.func.now()))
        .order_by(subscriptions.c.next_attempt_at)
        .limit(admission.allowed)
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
    if rows:
        await spend_tokens(conn, admission, len(rows))
    return ClaimRound(
        [
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
    )


@dataclasses.dataclass(frozen=True)
class Admission:
    """How many calls a claim may make, or how long to hold off; and the refilled bucket."""

    allowed: int
    held_for_s: float | None = None
    tokens: float | None = None  # what the bucket held after refilling (None: no budget)
    refilled_at: datetime | None = None


async def admit(conn: AsyncConnection, limit: int, budget: Budget) -> Admission:
    """How many calls this claim may make now, or how long to hold off.

    Holding off writes nothing: a dispatcher kept waiting by the budget or a pause costs the
    database a read, not a commit.
    """
    control = (
        await conn.execute(
            sa.select(
                dispatch_control.c.pause_kind,
                sa.func.extract(
                    "epoch", dispatch_control.c.paused_until - sa.func.clock_timestamp()
                ),
            )
        )
    ).one()
    kind, paused_for_s = control[0], None if control[1] is None else float(control[1])
    if paused_for_s is not None and paused_for_s > 0:
        return Admission(0, paused_for_s)
    if kind == "account":
        # The account was refused: after each probe interval one claimer, and one call, finds
        # out whether it is fixed. The UPDATE's row lock picks exactly one prober.
        probe = await conn.execute(
            sa.update(dispatch_control)
            .where(
                dispatch_control.c.pause_kind == "account",
                dispatch_control.c.paused_until <= sa.func.clock_timestamp(),
            )
            .values(
                paused_until=sa.func.clock_timestamp() + timedelta(seconds=budget.account_probe_s)
            )
            .returning(dispatch_control.c.id)
        )
        if probe.first() is None:
            return Admission(0, PAUSE_RECHECK_S)
        limit = 1
    if not budget.rate_per_minute:
        return Admission(limit)
    return await _take_tokens(conn, limit, budget.rate_per_minute)


async def spend_tokens(conn: AsyncConnection, admission: Admission, spent: int) -> None:
    """Store the refilled bucket less what the claim spent (the row is locked since `admit`)."""
    if admission.tokens is None:
        return
    await conn.execute(
        sa.update(dispatch_control).values(
            tokens=admission.tokens - spent, refilled_at=admission.refilled_at
        )
    )


def bucket_shape(rate_per_minute: int) -> tuple[float, float]:
    """(capacity, refill per second) so that no 60-second window holds more than the rate.

    A bucket lets through at most capacity + refill * window calls in any window; refilling
    at (usable - capacity) / 60 keeps a whole minute under the account's limit, with headroom.
    """
    usable = rate_per_minute * (1 - HEADROOM)
    capacity = max(1.0, usable / 60.0 * BURST_S)
    return capacity, max(usable - capacity, 1.0) / 60.0


async def _take_tokens(conn: AsyncConnection, limit: int, rate_per_minute: int) -> Admission:
    """Refill the shared bucket for the time passed and see how many whole calls it holds.

    The row stays locked (FOR UPDATE) until the claim commits, so concurrent claimers, in this
    process or any other, take their tokens one after another and never spend the same ones.
    """
    capacity, rate_s = bucket_shape(rate_per_minute)
    now = sa.func.clock_timestamp()
    elapsed_s = sa.func.greatest(0, sa.func.extract("epoch", now - dispatch_control.c.refilled_at))
    available = sa.func.least(capacity, dispatch_control.c.tokens + elapsed_s * rate_s)
    tokens, at = (await conn.execute(sa.select(available, now).with_for_update())).one()
    whole = min(limit, math.floor(tokens))
    if whole <= 0:
        return Admission(0, (1.0 - tokens) / rate_s)
    return Admission(whole, None, float(tokens), at)


async def record_outcomes(
    conn: AsyncConnection,
    results: Sequence[CallResult],
    *,
    policy: RetryPolicy,
    budget: Budget,
) -> list[Transition | None]:
    """Apply finished calls whose claims still hold; None for those whose lease was lost.

    The rows are locked (in id order, so concurrent batches cannot deadlock) while their
    current state is read, so a cancel committed during a call is seen and honoured. Every
    call is kept in `dispatch_attempts`, applied or not. A state entered that callers are told
    of (`lifecycle_change`) is a change in the feed, made in this same transaction.
    """
    ids = sorted({result.claim.subscription_id for result in results})
    locked = (
        await conn.execute(
            sa.select(subscriptions.c.id, subscriptions.c.claim_token, subscriptions.c.state)
            .where(subscriptions.c.id.in_(ids))
            .order_by(subscriptions.c.id)
            .with_for_update()
        )
    ).all()
    current = {(row.id, row.claim_token): SubscriptionState(row.state) for row in locked}
    moves: list[Transition | None] = []
    updates: list[dict[str, Any]] = []
    notes: list[tuple[uuid.UUID, ChangeType]] = []
    for result in results:
        claim = result.claim
        state_now = current.get((claim.subscription_id, claim.claim_token))
        if state_now is None:
            moves.append(None)
            continue
        moved = transition(
            state_now,
            claim.operation,
            result.outcome,
            attempt=claim.attempt,
            retry_in_s=result.retry_in_s,
            paused_for_s=_pause_s(result.outcome, budget),
            policy=policy,
        )
        moves.append(moved)
        updates.append(_row_update(claim, moved))
        if (change := lifecycle_change(state_now, moved.state)) is not None:
            notes.append((claim.subscription_id, change))
    if updates:
        await conn.execute(_APPLY, updates)
    await changes.note(conn, notes)
    await conn.execute(
        sa.insert(dispatch_attempts),
        [_attempt_row(result, move is None) for result, move in zip(results, moves, strict=True)],
    )
    await _update_pause(conn, results, budget)
    return moves


_APPLY = (
    sa.update(subscriptions)
    .where(subscriptions.c.id == sa.bindparam("b_id"))
    .values(
        state=sa.bindparam("b_state"),
        claim_token=None,
        # now() + NULL is NULL: no call due.
        next_attempt_at=sa.func.now() + sa.bindparam("b_due_in", type_=sa.Interval()),
        attempts=sa.bindparam("b_attempts"),
        last_error=sa.bindparam("b_last_error", type_=subscriptions.c.last_error.type),
        updated_at=sa.func.now(),
    )
)


def _row_update(claim: Claim, moved: Transition) -> dict[str, Any]:
    still_due = moved.retry_in_s is not None
    same_call = still_due and Operation.for_state(moved.state) is claim.operation
    # Retries of the same call count up for backoff and giving up; a new call starts at zero.
    attempts = (claim.attempt if moved.attempt_spent else claim.attempt - 1) if same_call else 0
    return {
        "b_id": claim.subscription_id,
        "b_state": moved.state.value,
        "b_due_in": timedelta(seconds=moved.retry_in_s) if moved.retry_in_s is not None else None,
        "b_attempts": attempts,
        "b_last_error": moved.last_error,
    }


def _attempt_row(result: CallResult, claim_lost: bool) -> dict[str, Any]:
    outcome = result.outcome
    return {
        "subscription_id": result.claim.subscription_id,
        "operation": result.claim.operation.value,
        "attempt": result.claim.attempt,
        "started_at": result.started_at,
        "latency_ms": result.latency_ms,
        "outcome": outcome.kind.value,
        "http_status": outcome.http_status,
        "request_id": outcome.request_id,
        "error_code": outcome.error_code,
        "errors": outcome.errors or None,
        "message": outcome.message,
        "claim_lost": claim_lost,
    }


def _pause_s(outcome: CallOutcome, budget: Budget) -> float:
    if outcome.kind is OutcomeKind.RATE_LIMITED:
        return outcome.retry_after_s if outcome.retry_after_s is not None else DEFAULT_RETRY_AFTER_S
    return budget.account_probe_s


async def _update_pause(
    conn: AsyncConnection, results: Sequence[CallResult], budget: Budget
) -> None:
    """A 429 pauses everyone for its Retry-After; an account refusal until a probe passes."""
    kinds = {result.outcome.kind for result in results}
    refused = [r for r in results if r.outcome.kind is OutcomeKind.ACCOUNT]
    if refused:
        outcome = refused[-1].outcome
        await pause(
            conn, "account", budget.account_probe_s, outcome.as_error(refused[-1].claim.operation)
        )
    elif kinds & {OutcomeKind.ACCEPTED, OutcomeKind.REJECTED}:
        # ShipEngine judged a package: the account works again.
        await conn.execute(
            sa.update(dispatch_control)
            .where(dispatch_control.c.pause_kind == "account")
            .values(paused_until=None, pause_kind=None, pause_reason=None)
        )
    limited = [r for r in results if r.outcome.kind is OutcomeKind.RATE_LIMITED]
    if limited:
        longest = max(limited, key=lambda r: _pause_s(r.outcome, budget))
        reason = longest.outcome.as_error(longest.claim.operation)
        await pause(conn, "rate_limit", _pause_s(longest.outcome, budget), reason)


# Which pause wins when two meet: ops' deliberate one, then the account's, then a 429's.
_PAUSE_PRECEDENCE = ("rate_limit", "account", "manual")


async def pause(conn: AsyncConnection, kind: str, seconds: float, reason: dict[str, Any]) -> None:
    """Pause all dispatching; a stronger pause in force keeps its kind and reason."""
    until = sa.func.clock_timestamp() + timedelta(seconds=seconds)
    stronger = _PAUSE_PRECEDENCE[_PAUSE_PRECEDENCE.index(kind) + 1 :]
    keeps = dispatch_control.c.pause_kind.in_(stronger) if stronger else sa.false()
    await conn.execute(
        sa.update(dispatch_control).values(
            # Only ever lengthened: several dispatchers hit by the same 429 pause once.
            paused_until=sa.func.greatest(dispatch_control.c.paused_until, until),
            pause_kind=sa.case((keeps, dispatch_control.c.pause_kind), else_=kind),
            pause_reason=sa.case(
                (keeps, dispatch_control.c.pause_reason),
                else_=sa.cast(reason, dispatch_control.c.pause_reason.type),
            ),
        )
    )


async def pause_by_hand(conn: AsyncConnection, reason: dict[str, Any]) -> None:
    """Ops stop all dispatching until they resume it (`resume`)."""
    await conn.execute(
        sa.update(dispatch_control).values(
            # Far enough to mean "until resumed"; not 'infinity', which PostgreSQL before 17
            # cannot subtract from a time.
            paused_until=sa.text("'9999-12-31 00:00:00+00'::timestamptz"),
            pause_kind="manual",
            pause_reason=sa.cast(reason, dispatch_control.c.pause_reason.type),
        )
    )


async def resume(conn: AsyncConnection) -> None:
    """End any pause now; an account that is still refused pauses again on the next call."""
    await conn.execute(
        sa.update(dispatch_control).values(paused_until=None, pause_kind=None, pause_reason=None)
    )


async def current_pause(conn: AsyncConnection) -> Pause | None:
    """The pause in force, if any (an account pause stays in force between its probes, a manual
    one until ops resume)."""
    row = (
        await conn.execute(
            sa.select(
                dispatch_control.c.paused_until,
                dispatch_control.c.pause_kind,
                dispatch_control.c.pause_reason,
                sa.func.clock_timestamp(),
            )
        )
    ).one()
    until, kind, reason, now = row
    if kind is None or until is None or (kind == "rate_limit" and until <= now):
        return None
    return Pause(until=until, kind=kind, reason=reason)


async def release(conn: AsyncConnection, claims: Sequence[Claim]) -> None:
    """Give back claims whose call was abandoned (shutdown): due again at once, attempt unspent."""
    if not claims:
        return
    await conn.execute(
        sa.update(subscriptions)
        .where(
            subscriptions.c.id == sa.bindparam("b_id"),
            subscriptions.c.claim_token == sa.bindparam("b_token"),
        )
        .values(
            claim_token=None,
            next_attempt_at=sa.func.now(),
            attempts=sa.func.greatest(subscriptions.c.attempts - 1, 0),
        ),
        [{"b_id": claim.subscription_id, "b_token": claim.claim_token} for claim in claims],
    )


async def database_now(conn: AsyncConnection) -> datetime:
    now: datetime = (await conn.execute(sa.select(sa.func.now()))).scalar_one()
    return now


async def work_is_due(conn: AsyncConnection) -> bool:
    """Whether any start or stop waits now (the reconciler yields the budget to them)."""
    due = sa.select(subscriptions.c.id).where(subscriptions.c.next_attempt_at <= sa.func.now())
    return bool((await conn.execute(sa.select(sa.exists(due)))).scalar_one())


async def backlog(conn: AsyncConnection) -> tuple[int, float]:
    """How many calls are due now, and how long the longest-waiting one has been due (s)."""
    due_at = subscriptions.c.next_attempt_at
    waited_s = sa.func.extract("epoch", sa.func.now() - sa.func.min(due_at))
    count, oldest = (
        await conn.execute(sa.select(sa.func.count(), waited_s).where(due_at <= sa.func.now()))
    ).one()
    return int(count), float(oldest or 0)


async def next_due_in_s(conn: AsyncConnection) -> float | None:
    """Seconds until the earliest work is due (0 if due now); None when there is none."""
    query = sa.select(
        sa.func.extract(
            "epoch", sa.func.min(subscriptions.c.next_attempt_at) - sa.func.clock_timestamp()
        )
    ).where(subscriptions.c.next_attempt_at.is_not(None))
    seconds = (await conn.execute(query)).scalar_one_or_none()
    return None if seconds is None else max(float(seconds), 0.0)
