"""The claim queries on a real PostgreSQL: disjoint claims, leases, fencing, cancels."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import dispatch
from service.db.subscriptions import (
    NewSubscription,
    create_subscription,
    get_subscription,
    list_attempts,
    request_stop,
)
from service.domain.subscriptions import Budget, CallOutcome, Operation, OutcomeKind, RetryPolicy

ACCEPTED = CallOutcome(OutcomeKind.ACCEPTED, http_status=204)
TRANSIENT = CallOutcome(OutcomeKind.TRANSIENT, http_status=503)


async def add(engine: AsyncEngine, count: int) -> list[uuid.UUID]:
    ids = []
    async with engine.begin() as conn:
        for n in range(count):
            row, _ = await create_subscription(conn, NewSubscription("ups", f"1Z{n:06}"))
            ids.append(row["id"])
    return ids


UNLIMITED = Budget(rate_per_minute=0, account_probe_s=60)
POLICY = RetryPolicy(base_s=1, cap_s=10, max_attempts=5)


async def claim(engine: AsyncEngine, limit: int = 100, lease_s: float = 60) -> list[dispatch.Claim]:
    async with engine.begin() as conn:
        claimed = await dispatch.claim_due(conn, limit=limit, lease_s=lease_s, budget=UNLIMITED)
    return claimed.claims


async def record(engine: AsyncEngine, claimed: dispatch.Claim, outcome: CallOutcome) -> object:
    result = dispatch.CallResult(claimed, outcome, datetime.now(UTC), 12.5, retry_in_s=30)
    async with engine.begin() as conn:
        (moved,) = await dispatch.record_outcomes(conn, [result], policy=POLICY, budget=UNLIMITED)
    return moved


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


RATE_LIMITED = CallOutcome(OutcomeKind.RATE_LIMITED, http_status=429, retry_after_s=30)
ACCOUNT = CallOutcome(
    OutcomeKind.ACCOUNT,
    http_status=401,
    request_id="r-401",
    errors=[{"error_code": "unauthorized", "error_type": "security"}],
)


async def execute(engine: AsyncEngine, sql: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(sql))


async def claim_with(engine: AsyncEngine, budget: Budget, limit: int = 100) -> Any:
    async with engine.begin() as conn:
        return await dispatch.claim_due(conn, limit=limit, lease_s=60, budget=budget)


async def test_the_rate_budget_is_shared_by_concurrent_claimers(engine: AsyncEngine) -> None:
    await add(engine, 50)
    budget = Budget(rate_per_minute=60, account_probe_s=60)  # one a second, burst 1
    await execute(engine, "UPDATE dispatch_control SET tokens = 1, refilled_at = clock_timestamp()")
    rounds = await asyncio.gather(*(claim_with(engine, budget) for _ in range(8)))
    assert sum(len(r.claims) for r in rounds) == 1

    await execute(engine, "UPDATE dispatch_control SET tokens = 0, refilled_at = clock_timestamp()")
    version_before = await row_version(engine)
    empty = await claim_with(engine, budget)
    assert empty.claims == []
    _, refill_s = dispatch.bucket_shape(60)
    assert 0.9 < empty.held_for_s <= 1 / refill_s  # the time for one token to refill
    # Held back, the claimer wrote nothing: waiting dispatchers cost no commits.
    assert await row_version(engine) == version_before


async def row_version(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        return str((await conn.execute(sa.text("SELECT xmin FROM dispatch_control"))).scalar_one())


async def test_a_429_pauses_every_claimer_without_spending_an_attempt(
    engine: AsyncEngine,
) -> None:
    await add(engine, 2)
    (limited,) = await claim(engine, limit=1)
    await record(engine, limited, RATE_LIMITED)

    held = await claim_with(engine, UNLIMITED)
    assert held.claims == []
    assert 25 < held.held_for_s <= 30
    async with engine.connect() as conn:
        pause = await dispatch.current_pause(conn)
    assert pause is not None
    assert pause.kind == "rate_limit"
    row = await attempts_and_due(engine, limited.subscription_id)
    assert row == (0, True)


async def attempts_and_due(engine: AsyncEngine, subscription_id: uuid.UUID) -> tuple[int, bool]:
    async with engine.connect() as conn:
        attempts, later = (
            await conn.execute(
                sa.text(
                    "SELECT attempts, next_attempt_at > now() + interval '20 seconds' "
                    "FROM subscriptions WHERE id = :id"
                ),
                {"id": subscription_id},
            )
        ).one()
    return attempts, later


async def test_an_account_refusal_pauses_until_one_probe_passes(engine: AsyncEngine) -> None:
    await add(engine, 5)
    (refused,) = await claim(engine, limit=1)
    await record(engine, refused, ACCOUNT)
    assert (await claim_with(engine, UNLIMITED)).claims == []
    async with engine.connect() as conn:
        pause = await dispatch.current_pause(conn)
    assert pause is not None
    assert pause.kind == "account"
    assert pause.reason is not None
    assert pause.reason["errors"][0]["error_code"] == "unauthorized"

    # The probe interval passes: exactly one claimer gets exactly one call.
    await execute(engine, "UPDATE dispatch_control SET paused_until = now() - interval '1 s'")
    await execute(
        engine, "UPDATE subscriptions SET next_attempt_at = now() WHERE claim_token IS NULL"
    )
    rounds = await asyncio.gather(*(claim_with(engine, UNLIMITED) for _ in range(4)))
    probes = [c for r in rounds for c in r.claims]
    assert len(probes) == 1

    await record(engine, probes[0], ACCEPTED)
    async with engine.connect() as conn:
        assert await dispatch.current_pause(conn) is None
    assert len((await claim_with(engine, UNLIMITED)).claims) == 4  # the refused one too


async def test_every_call_is_kept_with_its_outcome(engine: AsyncEngine) -> None:
    (subscription_id,) = await add(engine, 1)
    (dead,) = await claim(engine)
    await expire_leases(engine)
    (alive,) = await claim(engine)
    await record(engine, alive, ACCOUNT)
    await record(engine, dead, ACCEPTED)
    async with engine.connect() as conn:
        attempts = await list_attempts(conn, subscription_id)
    assert [(a["attempt"], a["outcome"], a["claim_lost"]) for a in attempts] == [
        (1, "accepted", True),
        (2, "account", False),
    ]
    assert attempts[1]["request_id"] == "r-401"
    assert attempts[1]["error_code"] == "unauthorized"
    assert attempts[1]["latency_ms"] == 12.5


async def test_transient_failures_give_up_after_max_attempts(engine: AsyncEngine) -> None:
    (subscription_id,) = await add(engine, 1)
    for attempt in range(1, POLICY.max_attempts + 1):
        await execute(engine, "UPDATE subscriptions SET next_attempt_at = now()")
        (claimed,) = await claim(engine)
        assert claimed.attempt == attempt
        await record(engine, claimed, TRANSIENT)
    assert await state_of(engine, subscription_id) == ("failed", False)
    async with engine.connect() as conn:
        row = await get_subscription(conn, subscription_id)
    assert row is not None
    assert row["last_error"]["http_status"] == 503
