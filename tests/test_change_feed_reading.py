"""Reading the change feed: gap-free in commit order, resumable, bounded, kept for a while."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.api import app as app_module
from service.db import changes as feed
from service.db.tokens import create_token
from service.domain.access import Scope
from service.domain.changes import ChangeType
from service.settings import Settings
from tests.conftest import AppWith, bearer
from tests.test_change_feed import changes, page_of, subscribe

Client = TestClient[web.Request, web.Application]


async def open_transaction(engine: AsyncEngine) -> AsyncConnection:
    conn = await engine.connect()
    await conn.begin()
    return conn


async def note(conn: AsyncConnection, subscription_id: str) -> None:
    await feed.note(conn, [(uuid.UUID(subscription_id), ChangeType.STALE)])


async def ids_in_table_order(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.text("SELECT subscription_id FROM changes ORDER BY id"))
        return [str(row.subscription_id) for row in rows]


async def test_a_change_that_took_its_id_first_but_commits_last_is_read_exactly_once(
    api: Client, engine: AsyncEngine
) -> None:
    first, second = await subscribe(api, "FIRST"), await subscribe(api, "SECOND")
    early = await open_transaction(engine)
    late = await open_transaction(engine)
    try:
        await note(early, first)  # takes the lower id, and holds it uncommitted
        await note(late, second)
        await late.commit()
        # By id, a reader would now see `second` and move past `first`'s id for good.
        page = await page_of(api)
        assert page["items"] == []  # nothing is final while an older transaction runs
        await early.commit()
    finally:
        await early.close()
        await late.close()
    assert await ids_in_table_order(engine) == [first, second]
    found = await changes(api, after=page["next_cursor"])
    assert [change["subscription_id"] for change in found] == [first, second]


async def test_changes_are_read_in_the_order_their_transactions_began_writing(
    api: Client, engine: AsyncEngine
) -> None:
    first, second = await subscribe(api, "FIRST"), await subscribe(api, "SECOND")
    older = await open_transaction(engine)
    newer = await open_transaction(engine)
    try:
        await older.execute(sa.text("SELECT pg_current_xact_id()"))  # its id is taken first
        await note(newer, first)  # the lower change id, in the newer transaction
        await newer.commit()
        page = await page_of(api)
        assert page["items"] == []  # the older transaction may still write: wait for it
        await note(older, second)
        await older.commit()
    finally:
        await older.close()
        await newer.close()
    found = await changes(api, after=page["next_cursor"])
    assert [change["subscription_id"] for change in found] == [second, first]
    assert await changes(api) == found


async def test_following_next_cursor_reads_every_change_once_and_then_waits_at_the_edge(
    api: Client, engine: AsyncEngine
) -> None:
    made = [await subscribe(api, f"PAGED-{n}") for n in range(5)]
    async with engine.begin() as conn:
        for subscription_id in made:
            await note(conn, subscription_id)
    seen: list[str] = []
    page = await page_of(api, limit=2)
    while page["items"]:
        seen += [change["subscription_id"] for change in page["items"]]
        page = await page_of(api, limit=2, after=page["next_cursor"])
    assert seen == made
    edge = page["next_cursor"]
    assert (await page_of(api, after=edge))["next_cursor"] == edge  # nothing new: stay
    extra = await subscribe(api, "PAGED-LATE")
    async with engine.begin() as conn:
        await note(conn, extra)
    assert [change["subscription_id"] for change in await changes(api, after=edge)] == [extra]


async def test_a_rare_filter_reads_a_bounded_stretch_and_moves_its_cursor_past_it(
    api: Client, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed, "SCAN_LIMIT", 3)
    made = [await subscribe(api, f"SCAN-{n}") for n in range(5)]
    async with engine.begin() as conn:
        for subscription_id in made:
            await note(conn, subscription_id)
    page = await page_of(api, subscription_id=made[4])
    assert page["items"] == []  # three scanned, none of them its own
    found = await changes(api, subscription_id=made[4], after=page["next_cursor"])
    assert [change["subscription_id"] for change in found] == [made[4]]


async def test_filters_by_type_repeated_by_subscription_and_by_client(
    api: Client, engine: AsyncEngine, app_with: AppWith, live_settings: Settings
) -> None:
    async with engine.begin() as conn:
        other_token = (await create_token(conn, "other", [Scope.WRITE])).plaintext
    other = await app_with(live_settings)
    answer = await other.post(
        "/v1/subscriptions",
        json={"carrier_code": "stamps_com", "tracking_number": "OTHER-1"},
        headers=bearer(other_token),
    )
    theirs = (await answer.json())["id"]
    mine = await subscribe(api, "MINE-1")
    async with engine.begin() as conn:
        await feed.note(conn, [(uuid.UUID(theirs), ChangeType.STALE)])
        await feed.note(conn, [(uuid.UUID(mine), ChangeType.ACTIVE)])
        await feed.note(conn, [(uuid.UUID(mine), ChangeType.STOPPED)])

    def subscriptions(found: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(change["subscription_id"], change["type"]) for change in found]

    assert subscriptions(await changes(api, created_by="other")) == [(theirs, "tracking.stale")]
    assert subscriptions(await changes(api, subscription_id=mine)) == [
        (mine, "subscription.active"),
        (mine, "subscription.stopped"),
    ]
    both = await api.get(
        "/v1/changes", params=[("type", "tracking.stale"), ("type", "subscription.stopped")]
    )
    assert subscriptions((await both.json())["items"]) == [
        (theirs, "tracking.stale"),
        (mine, "subscription.stopped"),
    ]


async def make_old(engine: AsyncEngine, count: int) -> None:
    """The first `count` changes, made 31 days ago."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE changes SET occurred_at = now() - interval '31 days' "
                "WHERE id IN (SELECT id FROM changes ORDER BY txid, id LIMIT :count)"
            ),
            {"count": count},
        )


async def test_retention_deletes_old_changes_and_an_older_cursor_is_told_it_expired(
    api: Client, engine: AsyncEngine, app_with: AppWith, live_settings: Settings
) -> None:
    made = [await subscribe(api, f"KEPT-{n}") for n in range(4)]
    for subscription_id in made:
        async with engine.begin() as conn:
            await note(conn, subscription_id)
    first_page = await page_of(api, limit=1)
    await make_old(engine, 2)
    await app_with(live_settings)  # an API starting prunes what is past retention

    kept = await changes(api)
    assert [change["subscription_id"] for change in kept] == made[2:]
    expired = await api.get("/v1/changes", params={"after": first_page["next_cursor"]})
    assert expired.status == 410
    (error,) = (await expired.json())["errors"]
    assert (error["error_code"], error["field_name"]) == ("cursor_expired", "after")


async def test_a_cursor_at_the_newest_change_pruned_reads_on_without_a_gap(
    api: Client, engine: AsyncEngine
) -> None:
    made = [await subscribe(api, f"EDGE-{n}") for n in range(3)]
    for subscription_id in made:
        async with engine.begin() as conn:
            await note(conn, subscription_id)
    at_second = (await page_of(api, limit=2))["next_cursor"]
    await make_old(engine, 2)
    async with engine.begin() as conn:
        assert await feed.prune(conn, keep_days=30, batch=1) == 1
    async with engine.begin() as conn:
        assert await feed.prune(conn, keep_days=30, batch=1) == 1
    found = await changes(api, after=at_second)
    assert [change["subscription_id"] for change in found] == made[2:]


@pytest.mark.parametrize(
    "query",
    [
        {"after": "zz"},
        {"after": "f" * 32},  # past 64 bits
        {"after": "0" * 31},
        {"after": "7fffffffffffffff" + "0" * 16},  # past every transaction begun: made up
        {"limit": "0"},
        {"limit": "1_0"},
        {"limit": "+5"},
        {"limit": "5.0"},
        {"limit": " 5"},
        {"limit": "1001"},
        {"type": "tracking.unknown"},
        {"subscription_id": "not-a-uuid"},
        {"created_by": ""},
        {"unknown": "1"},
    ],
)
async def test_a_query_it_cannot_read_is_a_400_naming_the_parameter(
    api: Client, query: dict[str, str]
) -> None:
    answer = await api.get("/v1/changes", params=query)
    assert answer.status == 400
    (error,) = (await answer.json())["errors"]
    assert error["field_name"].split(".")[0] == next(iter(query))  # type.0: its first value


async def test_reading_the_feed_takes_a_token_that_may_read_subscriptions(
    api: Client, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        reader = (await create_token(conn, "dashboard", [Scope.READ])).plaintext
        scraper = (await create_token(conn, "prometheus", [Scope.METRICS])).plaintext
    assert (await api.get("/v1/changes", headers=bearer(reader))).status == 200
    assert (await api.get("/v1/changes", headers=bearer(scraper))).status == 403
    assert (await api.get("/v1/changes", headers={"Authorization": ""})).status == 401


@pytest.mark.parametrize("name", ["after", "limit", "subscription_id", "created_by"])
async def test_a_parameter_given_twice_is_a_400_not_one_of_them_taken(
    api: Client, name: str
) -> None:
    values = {"after": "0" * 32, "limit": "5", "subscription_id": str(uuid.uuid4())}
    value = values.get(name, "someone")
    answer = await api.get("/v1/changes", params=[(name, value), (name, value)])
    assert answer.status == 400
    (error,) = (await answer.json())["errors"]
    assert (error["field_name"], error["message"]) == (name, f"{name}: given more than once")


async def test_retention_deletes_in_small_batches_until_nothing_old_is_left(
    api: Client,
    engine: AsyncEngine,
    app_with: AppWith,
    live_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each batch its own short transaction (a long one would hold every reader back), and
    as many batches as it takes."""
    monkeypatch.setattr(app_module, "PRUNE_BATCH", 1)
    made = [await subscribe(api, f"BATCH-{n}") for n in range(4)]
    for subscription_id in made:
        async with engine.begin() as conn:
            await note(conn, subscription_id)
    await make_old(engine, 3)
    await app_with(live_settings)
    assert [change["subscription_id"] for change in await changes(api)] == made[3:]
