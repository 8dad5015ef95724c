"""The migrations: up, down and up again on an empty database, and in step with the models."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command
from service.db import migrate


async def tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    return set(names) - {"alembic_version"}


async def test_stairway_up_down_up(database_url: str, engine: AsyncEngine) -> None:
    before = await tables(engine)
    await asyncio.to_thread(migrate.downgrade, database_url, "base")
    assert await tables(engine) == set()
    await asyncio.to_thread(migrate.upgrade, database_url)
    assert (
        await tables(engine)
        == before
        == {
            "subscriptions",
            "webhook_deliveries",
            "tracking_events",
        }
    )


async def test_models_and_migrations_agree(database_url: str) -> None:
    # Raises when autogenerate would find anything to add, drop or alter.
    await asyncio.to_thread(command.check, migrate.alembic_config(database_url))
