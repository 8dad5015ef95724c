"""Behind PgBouncer (no statement cache) and with a read replica, the API works the same."""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa
from aiohttp.test_utils import TestClient, TestServer

from service.api.app import create_app
from service.api.keys import ENGINE, READ_ENGINE
from service.db.engine import create_engine
from service.db.tables import subscriptions
from service.settings import Settings
from tests.conftest import bearer


async def test_without_a_statement_cache_and_with_a_read_url(
    live_settings: Settings, token: str
) -> None:
    settings = dataclasses.replace(
        live_settings,
        database_statement_cache=False,
        database_read_url=live_settings.database_url,  # a stand-in replica: the same server
    )
    async with TestClient(TestServer(create_app(settings)), headers=bearer(token)) as api:
        assert api.app[READ_ENGINE] is not api.app[ENGINE]
        for number in ("A1", "A2", "A3", "A4", "A5", "A6"):  # past asyncpg's prepare threshold
            body = {"carrier_code": "ups", "tracking_number": number}
            assert (await api.post("/v1/subscriptions", json=body)).status == 202
        listed = await (await api.get("/v1/subscriptions")).json()
        assert len(listed["items"]) == 6
        assert (await api.get("/v1/ops/summary")).status == 200


async def test_without_a_read_url_reads_share_the_primary(live_settings: Settings) -> None:
    async with TestClient(TestServer(create_app(live_settings))) as api:
        assert api.app[READ_ENGINE] is api.app[ENGINE]


async def prepared_after_queries(database_url: str, statement_cache: bool) -> int:
    engine = create_engine(database_url, pool_size=1, statement_cache=statement_cache)
    try:
        async with engine.connect() as conn:
            for _ in range(6):
                await conn.execute(
                    sa.select(subscriptions.c.id).where(subscriptions.c.id.is_(None))
                )
            query = sa.text("SELECT count(*) FROM pg_prepared_statements")
            return int((await conn.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def test_pgbouncer_mode_leaves_no_named_prepared_statements(database_url: str) -> None:
    # In transaction mode the next statement may run on another server connection, where a
    # named prepared statement does not exist: with the cache off none is kept.
    assert await prepared_after_queries(database_url, statement_cache=True) > 0
    assert await prepared_after_queries(database_url, statement_cache=False) == 0
