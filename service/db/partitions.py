"""Time partitions of the two tables that grow forever: created ahead, dropped past retention.

| table | partition key | one partition per | dropped after |
|---|---|---|---|
| webhook_deliveries | received_week | week | DELIVERY_RETENTION_DAYS |
| tracking_events | subscription_created_at | month | EVENT_RETENTION_DAYS |

Partitions are named `<table>_<YYYYMMDD of their start>`. Each table also has a DEFAULT
partition, so an insert never fails for want of a partition (say maintenance stopped running
for weeks, or a subscription older than the oldest partition hears from its package); if rows
wait there when their partition is created, they are moved into it in the same transaction,
and rows past retention are deleted from it.

`maintain` runs when the API starts and every hour after (`service/api/app.py`), and as
`python -m service partitions`. A transaction-level advisory lock lets one process at a time do
it; DDL waits at most `LOCK_TIMEOUT` for its locks, so maintenance never queues traffic behind
a long transaction: it fails, and the next round tries again.

DDL takes no bound parameters, so its statements are SQL text that names partitions and writes
their bounds: the names as `_id` quotes them, the bounds as `Partitioned.bound` writes them.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.compiler import IdentifierPreparer

# Periods created ahead of the current one.
AHEAD = 2
LOCK_TIMEOUT = "5s"
# pg_try_advisory_xact_lock's key: any constant the service uses for nothing else.
ADVISORY_KEY = 0x7472_6163_6B70  # "trackp"


@dataclasses.dataclass(frozen=True)
class Partitioned:
    table: str
    key: str
    monthly: bool  # else weekly
    key_is_date: bool  # else timestamptz

    def start_of(self, moment: datetime) -> date:
        day = moment.astimezone(UTC).date()
        if self.monthly:
            return day.replace(day=1)
        return day - timedelta(days=day.weekday())

    def after(self, start: date) -> date:
        if self.monthly:
            return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
        return start + timedelta(days=7)

    def name(self, start: date) -> str:
        return f"{self.table}_{start:%Y%m%d}"

    @property
    def default(self) -> str:
        return f"{self.table}_default"

    def bound(self, day: date) -> str:
        """A bound as SQL: a date, or midnight UTC of it."""
        if self.key_is_date:
            return f"'{day.isoformat()}'::date"
        return f"'{day.isoformat()} 00:00:00+00'::timestamptz"

    def before(self, day: date) -> str:
        """As SQL, that a row's key comes before `day`."""
        return f"{_id(self.key)} < {self.bound(day)}"

    def within(self, start: date) -> str:
        """As SQL, that a row's key is in the period that begins on `start`."""
        return f"{_id(self.key)} >= {self.bound(start)} AND {self.before(self.after(start))}"

    def start_from_name(self, name: str) -> date | None:
        found = re.fullmatch(rf"{self.table}_(\d{{8}})", name)
        return datetime.strptime(found[1], "%Y%m%d").date() if found else None


DELIVERIES = Partitioned("webhook_deliveries", "received_week", monthly=False, key_is_date=True)
EVENTS = Partitioned("tracking_events", "subscription_created_at", monthly=True, key_is_date=False)
TABLES = (DELIVERIES, EVENTS)

PARTITION_NAME = re.compile(rf"^({'|'.join(t.table for t in TABLES)})_(default|\d{{8}})$")


def is_partition(name: str) -> bool:
    """A partition, not a table of the schema (for schema comparisons)."""
    return PARTITION_NAME.match(name) is not None


@dataclasses.dataclass
class Maintenance:
    created: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    # Rows moved out of, and rows past retention deleted from, a DEFAULT partition.
    moved: dict[str, int] = dataclasses.field(default_factory=dict)
    purged: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: bool = False  # another process held the lock

    def as_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


async def maintain(
    conn: AsyncConnection,
    *,
    delivery_retention_days: int,
    event_retention_days: int,
    now: datetime | None = None,
    dry_run: bool = False,
) -> Maintenance:
    """Create this period's partitions and AHEAD more; drop those wholly past retention.

    Call it in a transaction of its own; `dry_run` only says what it would do.
    """
    now = now or datetime.now(UTC)
    done = Maintenance()
    key = sa.literal(ADVISORY_KEY, sa.BigInteger)
    if not await conn.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(key))):
        done.skipped = True
        return done
    # SET LOCAL lock_timeout, with the value bound.
    await conn.execute(sa.select(sa.func.set_config("lock_timeout", LOCK_TIMEOUT, True)))
    retention = {DELIVERIES: delivery_retention_days, EVENTS: event_retention_days}
    for table in TABLES:
        existing = await _partitions(conn, table)
        start = table.start_of(now)
        for _ in range(AHEAD + 1):
            if table.name(start) not in existing:
                await _create(conn, table, start, done, dry_run=dry_run)
            start = table.after(start)
        cutoff = (now - timedelta(days=retention[table])).astimezone(UTC).date()
        for name in sorted(existing):
            first = table.start_from_name(name)
            if first is not None and table.after(first) <= cutoff:
                done.dropped.append(name)
                if not dry_run:
                    await conn.execute(sa.text(f"DROP TABLE {_id(name)}"))
        await _purge_default(conn, table, cutoff, done, dry_run=dry_run)
    return done


async def _partitions(conn: AsyncConnection, table: Partitioned) -> set[str]:
    rows = await conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = CAST(:table AS regclass)"
        ),
        {"table": table.table},
    )
    return {row.relname for row in rows}


async def _create(
    conn: AsyncConnection, table: Partitioned, start: date, done: Maintenance, *, dry_run: bool
) -> None:
    name, within, default = table.name(start), table.within(start), _id(table.default)
    waiting = await conn.scalar(sa.text(f"SELECT count(*) FROM {default} WHERE {within}"))
    done.created.append(name)
    if waiting:
        done.moved[name] = waiting
    if dry_run:
        return
    bounds = f"FROM ({table.bound(start)}) TO ({table.bound(table.after(start))})"
    create = f"CREATE TABLE {_id(name)} PARTITION OF {_id(table.table)} FOR VALUES {bounds}"
    if not waiting:
        await conn.execute(sa.text(create))
        return
    # The DEFAULT partition may not hold rows of a range that has a partition: take it out,
    # create the partition, move the rows through the parent into it, put the default back.
    for statement in (
        f"ALTER TABLE {_id(table.table)} DETACH PARTITION {default}",
        create,
        f"INSERT INTO {_id(table.table)} SELECT * FROM {default} WHERE {within}",
        f"DELETE FROM {default} WHERE {within}",
        f"ALTER TABLE {_id(table.table)} ATTACH PARTITION {default} DEFAULT",
    ):
        await conn.execute(sa.text(statement))


async def _purge_default(
    conn: AsyncConnection, table: Partitioned, cutoff: date, done: Maintenance, *, dry_run: bool
) -> None:
    default, past = _id(table.default), table.before(cutoff)
    if dry_run:
        count = await conn.scalar(sa.text(f"SELECT count(*) FROM {default} WHERE {past}"))
    else:
        count = (await conn.execute(sa.text(f"DELETE FROM {default} WHERE {past}"))).rowcount
    if count:
        done.purged[table.default] = count


def _id(name: str) -> str:
    """A table's or a column's name as an SQL identifier, quoted where it must be (never, as
    things are: the names are the schema's, and those of partitions that `PARTITION_NAME`
    matches)."""
    return _PREPARER.quote(name)


_PREPARER: IdentifierPreparer = PGDialect().identifier_preparer  # type: ignore[no-untyped-call]
