"""Statements sent to asyncpg directly belong to the SQLAlchemy transaction they were given,
and the rows they take as JSON reach PostgreSQL as the values given."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.driver import bytea_text, driver_connection, json_rows


async def _names(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.text("SELECT name FROM driver_probe ORDER BY name"))
        return [row.name for row in rows]


@pytest.fixture
async def probe(engine: AsyncEngine) -> AsyncEngine:
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE driver_probe (name text)"))
    return engine


async def _write_then_fail(engine: AsyncEngine, *, sqlalchemy_first: bool) -> None:
    async with engine.begin() as conn:
        if sqlalchemy_first:
            await conn.execute(sa.text("INSERT INTO driver_probe VALUES ('by sqlalchemy')"))
        driver = await driver_connection(conn)
        await driver.execute("INSERT INTO driver_probe VALUES ('by the driver')")
        raise RuntimeError("the caller fails")


async def test_a_rollback_undoes_what_the_driver_wrote_before_any_sqlalchemy_statement(
    probe: AsyncEngine,
) -> None:
    with pytest.raises(RuntimeError):
        await _write_then_fail(probe, sqlalchemy_first=False)
    assert await _names(probe) == []


async def test_driver_and_sqlalchemy_statements_commit_together(probe: AsyncEngine) -> None:
    async with probe.begin() as conn:
        driver = await driver_connection(conn)
        await driver.execute("INSERT INTO driver_probe VALUES ('by the driver')")
        await conn.execute(sa.text("INSERT INTO driver_probe VALUES ('by sqlalchemy')"))
        assert await driver_connection(conn) is driver
    assert await _names(probe) == ["by sqlalchemy", "by the driver"]


async def test_the_driver_joins_a_transaction_sqlalchemy_began(probe: AsyncEngine) -> None:
    with pytest.raises(RuntimeError):
        await _write_then_fail(probe, sqlalchemy_first=True)
    assert await _names(probe) == []


async def test_a_connection_without_a_transaction_gets_one_as_sqlalchemy_would_begin_it(
    probe: AsyncEngine,
) -> None:
    async with probe.connect() as conn:
        driver = await driver_connection(conn)
        await driver.execute("INSERT INTO driver_probe VALUES ('committed')")
        await conn.commit()
        driver = await driver_connection(conn)
        await driver.execute("INSERT INTO driver_probe VALUES ('never committed')")
    assert await _names(probe) == ["committed"]


@pytest.mark.parametrize("extra", [{}, {"big": 2**70}], ids=["orjson", "standard library"])
async def test_json_rows_reach_postgresql_as_the_values_given(
    engine: AsyncEngine, extra: dict[str, int]
) -> None:
    moment = datetime(2026, 11, 20, 8, 0, 0, 123, tzinfo=UTC)
    async with engine.begin() as conn:
        driver = await driver_connection(conn)
        read_uuid = await driver.fetchval("SELECT gen_random_uuid()")  # asyncpg's own class
        row = {
            "id": read_uuid,
            "at": moment,
            "key": bytea_text(b"\x00\xff"),
            "text": 'a "b" \\ \u2028 📦',
        }
        got = await driver.fetchrow(
            "SELECT * FROM json_to_recordset($1::json)"
            " AS v(id uuid, at timestamptz, key bytea, text text, big numeric)",
            json_rows([{**row, **extra}]),
        )
    assert got is not None
    assert (got["id"], got["at"], got["key"], got["text"]) == (
        read_uuid,
        moment,
        b"\x00\xff",
        row["text"],
    )
    assert got["big"] == extra.get("big")
