"""The migrations: each one up, down and up again, and all of them in step with the models."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import migrate
from service.db.partitions import is_partition
from service.db.tables import metadata


async def tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    return {name for name in names if not is_partition(name)} - {"alembic_version"}


def revisions_in_order(database_url: str) -> list[str]:
    script = ScriptDirectory.from_config(migrate.alembic_config(database_url))
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


async def test_stairway_each_revision_up_down_up(database_url: str, engine: AsyncEngine) -> None:
    """Catches a downgrade that forgets something its upgrade made, one step at a time."""
    await asyncio.to_thread(migrate.downgrade, database_url, "base")
    assert await tables(engine) == set()
    previous = "base"
    for revision in revisions_in_order(database_url):
        await asyncio.to_thread(migrate.upgrade, database_url, revision)
        await asyncio.to_thread(migrate.downgrade, database_url, previous)
        await asyncio.to_thread(migrate.upgrade, database_url, revision)
        previous = revision
    assert await tables(engine) == set(metadata.tables)


async def test_models_and_migrations_agree(database_url: str) -> None:
    # Raises when autogenerate would find anything to add, drop or alter.
    await asyncio.to_thread(command.check, migrate.alembic_config(database_url))


async def test_filing_changes_no_indexed_column_of_a_subscription(engine: AsyncEngine) -> None:
    """A filing sets a subscription's status, dates, `last_heard_at` and `updated_at`. Were any
    of them in an index (as a key or in its predicate), no filing update could stay on its
    page (HOT): each would write an entry into every index of the table (migration 0014). The
    table keeps room on its pages for those updates."""
    async with engine.connect() as conn:
        indexed = set(
            (
                await conn.execute(
                    sa.text(
                        """
                        SELECT DISTINCT a.attname
                        FROM pg_index AS i
                        JOIN pg_attribute AS a ON a.attrelid = i.indrelid
                        WHERE i.indrelid = 'subscriptions'::regclass AND a.attnum > 0
                          AND (a.attnum = ANY(i.indkey) OR pg_get_expr(i.indpred, i.indrelid)
                                                           ~ ('\\m' || a.attname || '\\M'))
                        """
                    )
                )
            ).scalars()
        )
        options = (
            await conn.execute(
                sa.text("SELECT reloptions FROM pg_class WHERE oid = 'subscriptions'::regclass")
            )
        ).scalar_one()
    filed = {
        "status_code",
        "status_description",
        "estimated_delivery_date",
        "actual_delivery_date",
        "last_event_at",
        "rearms",
        "last_heard_at",
        "updated_at",
        "change_sequence",
    }
    assert {"tracking_number", "done_at"} <= indexed  # keys and predicates are both found
    assert not indexed & filed
    assert "fillfactor=80" in options
