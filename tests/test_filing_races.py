"""A delivery whose subscription changes between its insert and the lock of its subscription.

The receiver's first statement inserts each delivery filed against the live subscription its
package has in the statement's snapshot, read without a lock, then locks the package's live
subscriptions: what it locked is what filing uses, and the rare row whose subscription changed
meanwhile is corrected (`service/db/deliveries.py`). Here another transaction, on a connection
of its own, changes the subscription and keeps its row locked; the filing is seen waiting for
that transaction in PostgreSQL (`pg_blocking_pids`), and only then does the change commit. No
sleeps: each step waits for a fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import dispatch
from service.db.deliveries import FiledDelivery, Incoming, store_and_file
from service.db.driver import driver_connection
from service.db.subscriptions import NewSubscription, request_stop, subscribe
from service.domain.subscriptions import Budget, CallOutcome, Operation, OutcomeKind, RetryPolicy
from service.domain.tracking import RearmPolicy
from tests.payloads import track_body
from tests.waiting import eventually

NUMBER = "9405511899223197428490"
REARM = RearmPolicy(max_rearms=0, delay_s=60)
UNLIMITED = Budget(rate_per_minute=0, account_probe_s=60)
POLICY = RetryPolicy(base_s=1, cap_s=10, max_attempts=5)
ACCEPTED = CallOutcome(OutcomeKind.ACCEPTED, http_status=204)
WAIT_S = 10  # bound of every wait on the other transaction


def incoming(carrier_code: str | None, steps: int) -> Incoming:
    """A verified delivery of NUMBER after `steps` events."""
    payload = track_body(NUMBER, carrier_code, steps)
    return Incoming.read(payload, json.dumps(payload).encode(), headers={}, verification="verified")


@dataclasses.dataclass(frozen=True)
class Transaction:
    """An open transaction on a connection of its own, and the PostgreSQL backend serving it."""

    conn: AsyncConnection
    pid: int


@contextlib.asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[Transaction]:
    """A transaction the test commits itself; rolled back if it has not."""
    async with engine.connect() as conn:
        await conn.begin()
        pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        yield Transaction(conn, pid)


async def blocked(engine: AsyncEngine, waiter: Transaction, by: Transaction) -> None:
    """Returns once `waiter` waits for a lock that `by` holds: the barrier, as PostgreSQL sees
    it."""

    async def probe() -> bool | None:
        async with engine.connect() as conn:
            waits = (
                await conn.execute(
                    sa.text("SELECT CAST(:holder AS integer) = ANY(pg_blocking_pids(:pid))"),
                    {"holder": by.pid, "pid": waiter.pid},
                )
            ).scalar_one()
        return True if waits else None

    await eventually(probe, timeout_s=WAIT_S)


async def settled(engine: AsyncEngine, work: asyncio.Task[Any], tx: Transaction) -> None:
    """Returns once `work` is done, or waits for a lock (for whatever transaction holds it)."""

    async def probe() -> bool | None:
        if work.done():
            return True
        async with engine.connect() as conn:
            waits = (
                await conn.execute(
                    sa.text("SELECT cardinality(pg_blocking_pids(:pid)) > 0"), {"pid": tx.pid}
                )
            ).scalar_one()
        return True if waits else None

    await eventually(probe, timeout_s=WAIT_S)


async def subscribed(engine: AsyncEngine, carrier_code: str) -> uuid.UUID:
    """A new subscription of NUMBER with that carrier, committed (its start due)."""
    async with engine.begin() as conn:
        ((row, created),) = await subscribe(
            await driver_connection(conn), [NewSubscription(carrier_code, NUMBER)], REARM
        )
    assert created
    subscription_id: uuid.UUID = row["id"]
    return subscription_id


async def stop_claimed(engine: AsyncEngine, subscription_id: uuid.UUID) -> dispatch.Claim:
    """Cancelled, and its stop call claimed by a dispatcher: `stopping`, still live."""
    async with engine.begin() as conn:
        await request_stop(conn, subscription_id)
    async with engine.begin() as conn:
        claimed = await dispatch.claim_due(conn, limit=10, lease_s=60, budget=UNLIMITED)
    (claim,) = [c for c in claimed.claims if c.subscription_id == subscription_id]
    assert claim.operation is Operation.STOP
    return claim


async def record_stop_accepted(tx: Transaction, claim: dispatch.Claim) -> None:
    """The dispatcher records that ShipEngine accepted the stop: the row is `stopped`, and
    locked until `tx` commits."""
    result = dispatch.CallResult(claim, ACCEPTED, datetime.now(UTC), 1.0, retry_in_s=1)
    await dispatch.record_outcomes(tx.conn, [result], policy=POLICY, budget=UNLIMITED)


async def delivery_row(engine: AsyncEngine, delivery_id: int) -> tuple[str, uuid.UUID | None]:
    """The stored delivery's outcome and subscription."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text("SELECT outcome, subscription_id FROM webhook_deliveries WHERE id = :id"),
                {"id": delivery_id},
            )
        ).one()
    return row.outcome, row.subscription_id


async def shown(engine: AsyncEngine, subscription_id: uuid.UUID) -> tuple[str | None, int]:
    """The subscription's status code and how many events it holds."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT status_code, (SELECT count(*) FROM tracking_events AS e "
                    "WHERE e.subscription_id = s.id) AS events FROM subscriptions AS s "
                    "WHERE id = :id"
                ),
                {"id": subscription_id},
            )
        ).one()
    return row.status_code, row.events


async def file_behind(
    engine: AsyncEngine, delivery: Incoming, holder: Transaction
) -> FiledDelivery:
    """File `delivery` in a transaction of its own; once it waits for `holder`, commit
    `holder`. Returns what filing answered, committed."""
    async with transaction(engine) as receiver, asyncio.TaskGroup() as tasks:
        db = await driver_connection(receiver.conn)
        filing = tasks.create_task(store_and_file(db, [delivery], REARM))
        await blocked(engine, receiver, by=holder)
        await holder.conn.commit()
        async with asyncio.timeout(WAIT_S):
            (filed,) = await filing
        await receiver.conn.commit()
    return filed


# -- corrected by the lock ---------------------------------------------------------------------


async def test_a_delivery_whose_subscription_stops_while_it_waits_for_the_lock_is_an_orphan(
    engine: AsyncEngine,
) -> None:
    subscription_id = await subscribed(engine, "stamps_com")
    claim = await stop_claimed(engine, subscription_id)
    async with transaction(engine) as dispatcher:
        await record_stop_accepted(dispatcher, claim)
        # Inserted filed against the subscription its snapshot shows, `stopping`; then it waits.
        filed = await file_behind(engine, incoming("stamps_com", 2), dispatcher)
    assert (filed.outcome, filed.subscription_id) == ("orphan", None)
    assert await delivery_row(engine, filed.delivery_id) == ("orphan", None)
    assert await shown(engine, subscription_id) == (None, 0)
    # Kept as an orphan, it is the next subscription's to adopt.
    again = await subscribed(engine, "stamps_com")
    assert await delivery_row(engine, filed.delivery_id) == ("filed", again)
    assert await shown(engine, again) == ("IT", 2)


async def test_a_delivery_without_a_carrier_goes_to_the_live_one_left_when_the_newest_stops(
    engine: AsyncEngine,
) -> None:
    # The same number with two carriers; a delivery without a carrier code goes to the newest.
    older = await subscribed(engine, "ups")
    newest = await subscribed(engine, "fedex")
    claim = await stop_claimed(engine, newest)
    async with transaction(engine) as dispatcher:
        await record_stop_accepted(dispatcher, claim)
        filed = await file_behind(engine, incoming(None, 2), dispatcher)
    assert (filed.outcome, filed.subscription_id) == ("filed", older)
    assert await delivery_row(engine, filed.delivery_id) == ("filed", older)
    assert await shown(engine, older) == ("IT", 2)
    assert await shown(engine, newest) == (None, 0)


async def test_a_delivery_waiting_for_another_filing_of_its_package_files_against_what_it_left(
    engine: AsyncEngine,
) -> None:
    subscription_id = await subscribed(engine, "stamps_com")
    async with transaction(engine) as other:
        delivered = incoming("stamps_com", 4)
        await store_and_file(await driver_connection(other.conn), [delivered], REARM)
        # An older state, its snapshot taken before the delivered one commits: it must not
        # move the package back.
        filed = await file_behind(engine, incoming("stamps_com", 2), other)
    assert (filed.outcome, filed.subscription_id) == ("filed", subscription_id)
    assert (filed.new_events, filed.status_changed, filed.regression) == (0, False, True)
    assert await shown(engine, subscription_id) == ("DE", 4)
    async with engine.connect() as conn:
        changes = (
            await conn.execute(
                sa.text("SELECT previous_status_code, status_code FROM status_changes")
            )
        ).all()
    assert [tuple(change) for change in changes] == [(None, "DE")]


# -- a subscription created meanwhile ------------------------------------------------------------

# Filing cannot see a subscription committed after its statement's snapshot, and the new
# subscription's adoption of orphans cannot see a delivery not yet committed: without the
# packages' filing locks (`share_packages`), a subscription committed between the two never got
# the delivery. With them, whichever comes second waits for the first to commit.


async def subscribe_and_commit(tx: Transaction) -> uuid.UUID:
    """A new subscription of NUMBER (adopting its orphans), committed in `tx`."""
    db = await driver_connection(tx.conn)
    ((row, created),) = await subscribe(db, [NewSubscription("stamps_com", NUMBER)], REARM)
    await tx.conn.commit()
    assert created
    subscription_id: uuid.UUID = row["id"]
    return subscription_id


async def test_a_subscription_replacing_one_stopped_while_a_delivery_waits_gets_that_delivery(
    engine: AsyncEngine,
) -> None:
    stopped = await subscribed(engine, "stamps_com")
    claim = await stop_claimed(engine, stopped)
    async with (
        transaction(engine) as dispatcher,
        transaction(engine) as receiver,
        transaction(engine) as subscriber,
        asyncio.TaskGroup() as tasks,
    ):
        await record_stop_accepted(dispatcher, claim)
        delivery = incoming("stamps_com", 2)
        db = await driver_connection(receiver.conn)
        filing = tasks.create_task(store_and_file(db, [delivery], REARM))
        await blocked(engine, receiver, by=dispatcher)
        # The replacement waits on the live-package index for the stop to commit.
        replacing = tasks.create_task(subscribe_and_commit(subscriber))
        await blocked(engine, subscriber, by=dispatcher)
        await dispatcher.conn.commit()
        async with asyncio.timeout(WAIT_S):
            (filed,) = await filing
        # The delivery commits once the replacement has committed, or waits for it.
        await settled(engine, replacing, subscriber)
        await receiver.conn.commit()
        async with asyncio.timeout(WAIT_S):
            replacement = await replacing
    assert await shown(engine, replacement) == ("IT", 2)
    assert await delivery_row(engine, filed.delivery_id) == ("filed", replacement)


async def test_a_subscription_created_while_an_orphan_of_its_package_commits_adopts_it(
    engine: AsyncEngine,
) -> None:
    async with (
        transaction(engine) as receiver,
        transaction(engine) as subscriber,
        asyncio.TaskGroup() as tasks,
    ):
        db = await driver_connection(receiver.conn)
        (filed,) = await store_and_file(db, [incoming("stamps_com", 2)], REARM)
        subscribing = tasks.create_task(subscribe_and_commit(subscriber))
        # The orphan commits once the subscription has committed, or waits for it.
        await settled(engine, subscribing, subscriber)
        await receiver.conn.commit()
        async with asyncio.timeout(WAIT_S):
            subscription_id = await subscribing
    assert await shown(engine, subscription_id) == ("IT", 2)
    assert await delivery_row(engine, filed.delivery_id) == ("filed", subscription_id)
