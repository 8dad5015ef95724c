"""Alembic environment: runs migrations over the async engine.

The database comes from `config.attributes["database_url"]` when called from the service
(`python -m service migrate`, the tests), else from the DATABASE_URL environment variable.
"""

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from service.db.engine import create_engine
from service.db.partitions import is_partition
from service.db.tables import metadata

config = context.config


def _database_url() -> str:
    url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("DATABASE_URL: required, but not set")
    return str(url)


def _include_name(name: str | None, type_: str, _: object) -> bool:
    """Partitions are created by the service as time passes, not by the schema."""
    return not (type_ == "table" and name is not None and is_partition(name))


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        include_name=_include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_engine(_database_url(), pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
asyncio.run(_run_async())
