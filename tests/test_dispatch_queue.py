"""The claim queries on a real PostgreSQL: disjoint claims, leases, fencing, cancels."""

from __future__ import annotations

import asyncio
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import dispatch
from service.db.subscriptions import NewSubscription, create_subscription, request_stop
from service.domain.subscriptions import CallOutcome, Operation, OutcomeKind

ACCEPTED = CallOutcome(OutcomeKind.ACCEPTED, http_status=204)
TRANSIENT = CallOutcome(OutcomeKind.TRANSIENT, http_status=503)


async def add(engine: AsyncEngine, count: int) -> list[uuid.UUID]:
    ids = []
    async with engine.begin() as conn:
        for n in range(count):
            row, _ = await create_subscription(conn, NewSubscription("ups", f"1Z{n:06}"))
            ids.append(row["id"])
    return ids


async def claim(engine: AsyncEngine, limit: int = 100, lease_s: float = 60) -> list[dispatch.Claim]:
    async with engine.begin() as conn:
        return await dispatch.claim_due(conn, limit=limit, lease_s=lease_s)


async def record(engine: AsyncEngine, claimed: dispatch.Claim, outcome: CallOutcome) -> object:
    async with engine.begin() as conn:
        return await dispatch.record_outcome(conn, claimed, outcome, retry_in_s=30)


async def state_of(engine: AsyncEngine, subscription_id: uuid.UUID) -> tuple[str, bool]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text("SELECT state, next_attempt_at <= now() FROM subscriptions WHERE id = :id"),
                {"id": subscription_id},
            )
        ).one()
    return row[0], bool(row[1])


async def expire_leases(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE subscriptions SET next_attempt_at = now() - interval '1 second' "
                "WHERE claim_token IS NOT NULL"
            )
        )


async def test_a_claim_takes_due_work_once(engine: AsyncEngine) -> None:
    ids = await add(engine, 3)
    first = await claim(engine)
    assert sorted(c.subscription_id for c in first) == sorted(ids)
    assert {c.operation for c in first} == {Operation.START}
    assert {c.attempt for c in first} == {1}
    assert await claim(engine) == []


async def test_concurrent_claimers_get_disjoint_work(engine: AsyncEngine) -> None:
    ids = await add(engine, 200)
    batches = await asyncio.gather(*(claim(engine, limit=25) for _ in range(10)))
    claimed = [c.subscription_id for batch in batches for c in batch]
    assert len(claimed) == len(set(claimed))
    assert len(claimed) <= 200
    rest = await claim(engine, limit=500)
    assert sorted(claimed + [c.subscription_id for c in rest]) == sorted(ids)


async def test_an_expired_lease_is_taken_back_and_the_old_claim_is_fenced(
    engine: AsyncEngine,
) -> None:
    (subscription_id,) = await add(engine, 1)
    (dead,) = await claim(engine)
    await expire_leases(engine)
    (again,) = await claim(engine)
    assert again.subscription_id == subscription_id
    assert again.claim_token != dead.claim_token
    assert again.attempt == 2

    assert await record(engine, dead, ACCEPTED) is None
    assert await state_of(engine, subscription_id) == ("pending", False)
    assert await record(engine, again, ACCEPTED) is not None
    assert (await state_of(engine, subscription_id))[0] == "active"


async def test_a_transient_failure_schedules_a_retry(engine: AsyncEngine) -> None:
    (subscription_id,) = await add(engine, 1)
    (claimed,) = await claim(engine)
    await record(engine, claimed, TRANSIENT)
    assert await state_of(engine, subscription_id) == ("pending", False)
    assert await claim(engine) == []
    async with engine.connect() as conn:
        due_in = await dispatch.next_due_in_s(conn)
    assert due_in is not None
    assert 25 < due_in <= 30


async def test_a_cancel_during_a_start_waits_for_it_then_stops(engine: AsyncEngine) -> None:
    (subscription_id,) = await add(engine, 1)
    (start,) = await claim(engine)
    async with engine.begin() as conn:
        await request_stop(conn, subscription_id)
    # The start is still in flight: the stop must not be claimable alongside it.
    assert await claim(engine) == []
    await record(engine, start, ACCEPTED)
    assert await state_of(engine, subscription_id) == ("stopping", True)
    (stop,) = await claim(engine)
    assert stop.operation is Operation.STOP
    await record(engine, stop, ACCEPTED)
    assert (await state_of(engine, subscription_id))[0] == "stopped"


async def test_released_claims_are_due_again_without_spending_an_attempt(
    engine: AsyncEngine,
) -> None:
    await add(engine, 2)
    claims = await claim(engine)
    async with engine.begin() as conn:
        await dispatch.release(conn, claims)
    again = await claim(engine)
    assert {c.attempt for c in again} == {1}
