"""The asyncpg connection under a SQLAlchemy one, for the hot paths' fixed statements.

On the webhook path SQLAlchemy's own work per statement (compiling a cached text, processing
parameters and result rows) cost more CPU than asyncpg's, about 100 µs against 60 µs
(a statement of two 16-element arrays, measured on the 2-core bench machine). The statements
there are fixed texts over arrays that need none of it, so they go to asyncpg directly, inside
the transaction of the SQLAlchemy connection they were given: committed or rolled back with it.

Their rows go as one JSON parameter each (`json_rows`), not as an array per column. asyncpg
encodes an array element by element, testing each against abstract base classes, and a
timestamp through Python datetime arithmetic: about 0.7 µs an element, 2 µs a timestamp
(measured here), so a filing batch's forty arrays cost the receiver more CPU than its own
filing logic. orjson writes the same rows as one text in a few microseconds, and PostgreSQL
reads them (`json_to_recordset`) with each column type's own input function.

Their texts are named SQL, in `sql/*.sql` beside this file, read once when their module is
imported (`named_statements`): each statement follows a `-- name: <name>` line, and a piece
that several share follows a `-- part: <name>` line and stands wherever `{<name>}` does. The
comment lines right after either line are its documentation, left out of the text sent.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from service import json_exact


async def driver_connection(conn: AsyncConnection) -> asyncpg.Connection:
    """`conn`'s asyncpg connection, inside `conn`'s transaction.

    SQLAlchemy begins its transaction lazily, at the first statement it runs, and this
    connection may have run none yet: then a first statement goes through SQLAlchemy, which
    begins the transaction as it always does (so its commit or rollback ends it) and, on a
    connection that a restart or failover left dead, recognises the disconnect and discards the
    connection and the pool's others of the same age. Begun any other way, a dead connection
    went back to the pool and every later request on it failed. A connection lost later, between
    two statements, is recognised by SQLAlchemy's rollback the same way.
    """
    raw = await conn.get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    if not (conn.in_transaction() and driver.is_in_transaction()):
        await conn.exec_driver_sql("SELECT 1")  # one round trip per transaction, not per statement
    return driver


@dataclasses.dataclass(frozen=True)
class Statement:
    """A fixed SQL text written with :named parameters, held as asyncpg's numbered ones."""

    sql: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, text: str) -> Statement:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match[1] not in names:
                names.append(match[1])
            return f"${names.index(match[1]) + 1}"

        return cls(_NAMED.sub(number, text), tuple(names))

    async def fetch(self, db: asyncpg.Connection, **values: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await db.fetch(self.sql, *self._arguments(values))
        return rows

    async def execute(self, conn: AsyncConnection, **values: Any) -> Sequence[Row[Any]]:
        """Through SQLAlchemy: as the first statement of a transaction it begins it, and a
        connection found dead is discarded (see `driver_connection`)."""
        result = await conn.exec_driver_sql(self.sql, self._arguments(values))
        return result.all() if result.returns_rows else []

    def _arguments(self, values: dict[str, Any]) -> tuple[Any, ...]:
        if values.keys() != set(self.names):
            raise TypeError(f"parameters {sorted(values)}, statement takes {sorted(self.names)}")
        return tuple(values[n] for n in self.names)


# `:name`, but not the second colon of a `::type` cast.
_NAMED = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def named_statements(filename: str) -> dict[str, Statement]:
    """The statements of `sql/<filename>`, by name."""
    text = importlib.resources.files(__package__).joinpath("sql", filename).read_text("utf-8")
    return {name: Statement.of(sql) for name, sql in named_sql(text).items()}


def named_sql(text: str) -> dict[str, str]:
    """The statements of a file of named SQL, by name, with the parts they name included."""
    blocks = _HEADER.split(text)
    if _DOCUMENTATION.sub("", blocks[0]):
        raise ValueError("named SQL: text before the first `-- name:` or `-- part:` line")
    found: dict[str, dict[str, str]] = {"name": {}, "part": {}}
    for kind, name, block in zip(blocks[1::3], blocks[2::3], blocks[3::3], strict=True):
        if name in found["name"] or name in found["part"]:
            raise ValueError(f"named SQL: {name} twice")
        # Comment lines before a block's SQL document it, and those after it document the next
        # block: neither is sent, nor spliced into a statement that includes the block.
        found[kind][name] = _TRAILING.sub("", _DOCUMENTATION.sub("", block, count=1))
    parts, included = found["part"], set[str]()
    statements = {
        name: _included(sql, parts, (name,), included) for name, sql in found["name"].items()
    }
    if unused := parts.keys() - included:
        raise ValueError(f"named SQL: parts {sorted(unused)} are not used")
    return statements


def _included(sql: str, parts: dict[str, str], within: tuple[str, ...], used: set[str]) -> str:
    """`sql` with each `{part}` replaced by that part, its lines indented as the line it is on."""
    lines = []
    for line in sql.split("\n"):
        if _INCLUDE.search(line.partition("--")[2]):
            raise ValueError(f"named SQL: a part named in a comment of {within[-1]}")
        indent = "\n" + line[: len(line) - len(line.lstrip())]
        for name in _INCLUDE.findall(line):
            if name not in parts:
                raise ValueError(f"named SQL: no part {name} for {within[-1]}")
            if name in within:
                raise ValueError(f"named SQL: part {name} includes itself")
            used.add(name)
            part = _included(parts[name], parts, (*within, name), used)
            line = line.replace(f"{{{name}}}", part.replace("\n", indent))
        lines.append(line)
    return "\n".join(lines)


_HEADER = re.compile(r"^-- (name|part): ([a-z_][a-z0-9_]*)[ \t]*\n", re.MULTILINE)
# The comment lines (and blank ones) at the start of a block.
_DOCUMENTATION = re.compile(r"\A(?:[ \t]*(?:--[^\n]*)?\n)*")
# The comment lines (and blank ones) at the end of a block.
_TRAILING = re.compile(r"(?:\n[ \t]*(?:--[^\n]*)?)*\s*\Z")
_INCLUDE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def json_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows for `json_to_recordset(CAST(:param AS json)) AS v(column type, ...)`, which finds
    each column by its key. Values are JSON's (integers of any size), UUIDs and aware
    datetimes (as RFC 3339 text), and bytes as `bytea_text`; a float that is not finite would
    become null."""
    return json_exact.dumps(rows, default=_json_text).decode()


def bytea_text(value: bytes) -> str:
    """`value` in bytea's hex input format, for a bytea column of `json_rows`."""
    return "\\x" + value.hex()


def _json_text(value: object) -> str:
    """What orjson does not write itself: asyncpg's UUID (a uuid.UUID, but not the class orjson
    knows); and, for the standard library (rows with an integer past 64 bits), any UUID and
    datetime, written as orjson writes them."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not for json_rows")
