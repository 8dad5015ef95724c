"""Group commit: deliveries (and subscribes) that arrive together are committed together,
each answered as if it had come alone, and one that cannot be stored fails alone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import subscriptions as queries
from service.db.deliveries import FiledDelivery, Incoming, store_and_file
from service.db.errors import DatabaseOverloaded, is_unavailable
from service.db.group_commit import WRITERS, GroupCommit
from service.db.subscriptions import NewSubscription, Subscribed, create_subscription
from service.domain.tracking import RearmPolicy
from tests.payloads import track_body
from tests.waiting import eventually

REARM = RearmPolicy(max_rearms=1, delay_s=60)
T = TypeVar("T")


def incoming(number: str, step: int) -> Incoming:
    payload = track_body(number, "ups", step)
    return Incoming.read(
        payload,
        json.dumps(payload).encode(),
        headers={"x-shipengine-timestamp": "1"},
        verification="verified",
    )


async def subscribe(engine: AsyncEngine, *numbers: str) -> None:
    async with engine.begin() as conn:
        for number in numbers:
            await create_subscription(conn, NewSubscription("ups", number))


class Deliveries(GroupCommit[Incoming, FiledDelivery]):
    """The receiver's group commit, counting the groups it commits."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.groups: list[int] = []
        super().__init__(engine, self._file, self.groups.append)

    @staticmethod
    async def _file(db: asyncpg.Connection, items: Sequence[Incoming]) -> list[FiledDelivery]:
        return await store_and_file(db, items, REARM)


async def queued(group_commit: GroupCommit[T, Any], items: list[T]) -> list[asyncio.Task[Any]]:
    """The items waiting in the queue, before any writer runs."""
    tasks = [asyncio.create_task(group_commit.submit(item)) for item in items]
    await asyncio.sleep(0)  # one turn of the loop: each task queues in its first step
    assert group_commit.waiting == len(tasks)
    return tasks


@contextlib.asynccontextmanager
async def running(group_commit: GroupCommit[Any, Any]) -> AsyncIterator[None]:
    """The group commit started, and closed (what is queued committed) at the end."""
    group_commit.start()
    try:
        yield
    finally:
        await group_commit.close()


async def outcomes(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT tracking_number, outcome FROM webhook_deliveries ORDER BY id")
        )
        return [(row.tracking_number, row.outcome) for row in rows]


async def test_deliveries_queued_together_share_one_commit_and_are_answered_each(
    engine: AsyncEngine,
) -> None:
    await subscribe(engine, "1ZA", "1ZB")
    batcher = Deliveries(engine)
    sent = [incoming("1ZA", 1), incoming("1ZB", 2), incoming("1ZA", 1), incoming("1ZC", 1)]
    tasks = await queued(batcher, sent)
    batcher.start()
    answers = await asyncio.gather(*tasks)
    await batcher.close()

    assert batcher.groups == [4]
    assert [a.outcome for a in answers] == ["filed", "filed", "duplicate", "orphan"]
    assert answers[2].subscription_id == answers[0].subscription_id
    assert [a.new_events for a in answers] == [1, 2, 0, 0]
    assert await outcomes(engine) == [
        ("1ZA", "filed"),
        ("1ZB", "filed"),
        ("1ZC", "orphan"),
        ("1ZA", "duplicate"),
    ]


async def test_a_caller_that_hangs_up_has_its_delivery_committed_all_the_same(
    engine: AsyncEngine,
) -> None:
    await subscribe(engine, "1ZA", "1ZB")
    batcher = Deliveries(engine)
    hung_up, waiting = await queued(batcher, [incoming("1ZA", 1), incoming("1ZB", 1)])
    hung_up.cancel()
    async with running(batcher):
        answer = await waiting

    assert hung_up.cancelled()
    assert answer.outcome == "filed"
    assert await outcomes(engine) == [("1ZA", "filed"), ("1ZB", "filed")]


async def test_a_delivery_that_cannot_be_stored_fails_alone(engine: AsyncEngine) -> None:
    await subscribe(engine, "1ZA", "1ZB")
    batcher = Deliveries(engine)
    # PostgreSQL's jsonb refuses a NUL character: this one delivery cannot be stored.
    unstorable = dataclasses.replace(incoming("1ZB", 1), headers={"x-bad": "\u0000"})
    tasks = await queued(batcher, [incoming("1ZA", 1), unstorable, incoming("1ZA", 2)])
    batcher.start()
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    await batcher.close()

    assert [getattr(a, "outcome", None) for a in answers] == ["filed", None, "filed"]
    assert isinstance(answers[1], Exception)
    assert await outcomes(engine) == [("1ZA", "filed"), ("1ZA", "filed")]


async def test_a_group_that_loses_a_deadlock_is_committed_again_whole(
    engine: AsyncEngine,
) -> None:
    attempts: list[int] = []

    async def work(db: asyncpg.Connection, items: Sequence[str]) -> list[str]:
        attempts.append(len(items))
        await db.execute("SELECT 1")
        if len(attempts) == 1:
            # What PostgreSQL answers the transaction it picks to break a deadlock.
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return [f"{item} committed" for item in items]

    batcher = GroupCommit(engine, work, lambda _: None)
    tasks = await queued(batcher, ["a", "b"])
    batcher.start()
    answers = await asyncio.gather(*tasks)
    await batcher.close()

    assert answers == ["a committed", "b committed"]
    assert attempts == [2, 2]


async def test_closing_commits_what_is_queued_first(engine: AsyncEngine) -> None:
    await subscribe(engine, "1ZA")
    batcher = Deliveries(engine)
    tasks = await queued(batcher, [incoming("1ZA", step) for step in (1, 2, 3)])
    batcher.start()
    await batcher.close()

    assert [task.result().outcome for task in tasks] == ["filed"] * 3
    with pytest.raises(RuntimeError):
        await batcher.submit(incoming("1ZA", 4))


async def test_subscribes_queued_together_share_one_commit(engine: AsyncEngine) -> None:
    groups: list[int] = []

    async def create(db: asyncpg.Connection, news: Sequence[NewSubscription]) -> list[Subscribed]:
        return await queries.subscribe(db, news, REARM)

    subscribes = GroupCommit(engine, create, groups.append)
    news = [NewSubscription("ups", "1ZS1"), NewSubscription("ups", "1ZS2")]
    tasks = await queued(subscribes, [*news, NewSubscription("ups", "1ZS1")])
    subscribes.start()
    answers = await asyncio.gather(*tasks)
    await subscribes.close()

    assert groups == [3]
    assert [created for _, created in answers] == [True, True, False]
    assert answers[2][0]["id"] == answers[0][0]["id"]


async def test_past_its_queue_bound_a_group_commit_sheds_work_as_unavailable(
    engine: AsyncEngine,
) -> None:
    release = asyncio.Event()

    async def wait_then_echo(_: asyncpg.Connection, items: Sequence[int]) -> list[int]:
        await release.wait()
        return list(items)

    group_commit: GroupCommit[int, int] = GroupCommit(
        engine, wait_then_echo, lambda _: None, max_queued=2
    )
    waiting = await queued(group_commit, [1, 2])
    with pytest.raises(DatabaseOverloaded) as shed:
        await group_commit.submit(3)
    assert is_unavailable(shed.value)
    group_commit.start()
    release.set()
    assert await asyncio.gather(*waiting) == [1, 2]
    await group_commit.close()


async def backend_of(db: asyncpg.Connection, items: Sequence[int]) -> list[int]:
    """Each item answered with the server process its group's transaction ran on."""
    pid: int = await db.fetchval("SELECT pg_backend_pid()")
    return [pid for _ in items]


async def test_a_writer_keeps_its_connection_while_work_comes_and_gives_it_back_when_idle(
    engine: AsyncEngine,
) -> None:
    group_commit: GroupCommit[int, int] = GroupCommit(engine, backend_of, lambda _: None)
    async with running(group_commit):
        # One item at a time, each submitted as soon as the one before is answered.
        pids = {await group_commit.submit(n) for n in range(20)}
        assert len(pids) <= WRITERS  # no check-out per group: each writer kept its connection
        assert engine.pool.checkedout() >= 1  # type: ignore[attr-defined]

        async def all_back() -> bool | None:
            return True if engine.pool.checkedout() == 0 else None  # type: ignore[attr-defined]

        await eventually(all_back, timeout_s=5)


async def test_a_connection_the_server_ended_is_replaced_before_a_group_uses_it(
    engine: AsyncEngine,
) -> None:
    group_commit: GroupCommit[int, int] = GroupCommit(engine, backend_of, lambda _: None)
    async with running(group_commit):
        before = {await group_commit.submit(n) for n in range(4)}
        pids = {"pids": sorted(before)}
        async with engine.connect() as conn:
            await conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:pids AS int[])) pid"), pids
            )

        async def gone() -> bool | None:
            async with engine.connect() as conn:  # a transaction each: a new view of activity
                query = text(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(CAST(:pids AS int[]))"
                )
                return True if await conn.scalar(query, pids) == 0 else None

        # Gone from the server, and their end read by this process's loop meanwhile.
        await eventually(gone)
        answers = {await group_commit.submit(n) for n in range(4)}  # none fails
        assert not answers & before


async def test_a_group_opens_its_transaction_with_its_opening_statement(
    engine: AsyncEngine,
) -> None:
    async def holds_the_lock(db: asyncpg.Connection, items: Sequence[int]) -> list[bool]:
        held = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1"
            " AND pid = pg_backend_pid()",
            items[0],
        )
        return [held == 1 for _ in items]

    group_commit: GroupCommit[int, bool] = GroupCommit(
        engine,
        holds_the_lock,
        lambda _: None,
        opening=lambda items: f"SELECT pg_advisory_xact_lock({items[0]})",
    )
    async with running(group_commit):
        # Held while the work runs: taken in the transaction, not before it.
        assert await group_commit.submit(4242)
    async with engine.connect() as conn:
        query = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242")
        assert await conn.scalar(query) == 0  # and released with its commit


async def test_work_that_swallows_a_database_error_is_not_answered_as_committed(
    engine: AsyncEngine,
) -> None:
    async def swallow(db: asyncpg.Connection, items: Sequence[int]) -> list[int]:
        with contextlib.suppress(asyncpg.PostgresError):
            await db.execute("SELECT 1 / 0")  # the transaction is aborted from here on
        return list(items)

    group_commit: GroupCommit[int, int] = GroupCommit(engine, swallow, lambda _: None)
    async with running(group_commit):
        with pytest.raises(RuntimeError, match="ROLLBACK, not COMMIT"):
            await group_commit.submit(1)


def split_then_gone(calls: list[list[str]]) -> Callable[..., Awaitable[list[str]]]:
    """Work that fails a group of several (so that it is split), then finds the database gone
    on the first item alone; each call's items go to `calls`."""

    async def fails(_: asyncpg.Connection, items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        if len(items) > 1:
            raise ValueError("one of them cannot be stored")
        raise ConnectionResetError("the database went away meanwhile")

    return fails


async def test_items_split_after_a_failed_group_stop_waiting_once_the_database_is_gone(
    engine: AsyncEngine,
) -> None:
    calls: list[list[str]] = []
    group_commit: GroupCommit[str, str] = GroupCommit(
        engine, split_then_gone(calls), lambda _: None
    )
    tasks = await queued(group_commit, ["a", "b", "c"])
    group_commit.start()
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    await group_commit.close()

    assert calls == [["a", "b", "c"], ["a"]]  # b and c did not each wait for the database
    assert all(isinstance(answer, ConnectionResetError) for answer in answers)


async def test_the_rest_of_a_split_group_stops_waiting_even_when_the_first_caller_hung_up(
    engine: AsyncEngine,
) -> None:
    calls: list[list[str]] = []
    group_commit: GroupCommit[str, str] = GroupCommit(
        engine, split_then_gone(calls), lambda _: None
    )
    hung_up, *waiting = await queued(group_commit, ["a", "b", "c"])
    hung_up.cancel()  # its answer is cancelled: it can hold no error
    async with running(group_commit):
        answers = await asyncio.gather(*waiting, return_exceptions=True)

    assert calls == [["a", "b", "c"], ["a"]]
    assert all(isinstance(answer, ConnectionResetError) for answer in answers)
