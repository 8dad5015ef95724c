"""The change feed: every change, in commit order, with no gaps.

Changes are written in the transaction that makes them (filing, `deliveries.py`; a dispatcher's
outcome and a silence noticed, `note`). Their ids are drawn when each is inserted, but the
transactions commit in another order: a reader that had passed id 8 would never see the 7 of a
transaction still open then. So the feed is not read by id.

A change is placed by its transaction's id (`txid`, assigned at its first write) and its own id,
and read only below the horizon: the oldest transaction still running anywhere on the server
(`pg_snapshot_xmin(pg_current_snapshot())`). Every transaction below it has ended, so what a
reader sees there is final: a change committed later has a txid at or above the horizon of any
read before it, so it sorts after any position that read returned. A reader that follows
`next` therefore sees every change exactly once. The price: a change is readable once every
transaction older than its own has ended, so a long-running writing transaction anywhere on
the server delays the feed by as long as it runs. Writers here keep theirs short (retention
deletes in small transactions of its own for that reason).

Positions go to callers as opaque cursors (`service/api/changes.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db.driver import driver_connection, json_rows, named_statements
from service.db.tables import WATCHED, changes, changes_pruned, subscriptions
from service.domain.changes import ChangeType
from service.domain.tracking import TERMINAL_STATUSES

# What notifies a stream reader of committed changes: each statement that inserts changes
# notifies its transaction's id on it (migration 0010's trigger), delivered at commit.
CHANGES_CHANNEL = "changes"
# A filtered read scans at most this many changes for its page, so a rare filter costs a
# bounded read: its cursor moves past what it scanned, and the next page goes on from there.
SCAN_LIMIT = 10_000
_LAST_ID = 2**63 - 1
# How often `settled` looks whether older transactions have ended.
SETTLE_POLL_S = 0.01


class Position(NamedTuple):
    """A place in the feed, between changes: after every change at or before (txid, id)."""

    txid: int
    change_id: int


START = Position(0, 0)


class CursorExpired(Exception):
    """The position is older than what retention deleted: changes after it are gone."""


class CursorUnknown(Exception):
    """The position is past every transaction begun on this server: no read gave it (or the
    database was restored into another server, whose transaction ids have not reached it)."""


@dataclasses.dataclass(frozen=True)
class ChangeFilter:
    types: frozenset[ChangeType] = frozenset()
    subscription_id: uuid.UUID | None = None
    created_by: str | None = None

    @property
    def narrows(self) -> bool:
        return bool(self.types) or self.subscription_id is not None or self.created_by is not None


@dataclasses.dataclass(frozen=True)
class FeedPage:
    changes: list[RowMapping]  # `changes`' columns and the subscription's (`IMMUTABLE`)
    next: Position  # where the next page starts
    horizon: int  # the oldest transaction still running when it was read
    at_edge: bool  # nothing more was visible: `next` is the horizon's edge


# What a change does not keep of its subscription, for nothing of it ever changes.
IMMUTABLE = (
    subscriptions.c.carrier_code,
    subscriptions.c.tracking_number,
    subscriptions.c.carrier_id,
    subscriptions.c.reference,
    subscriptions.c.metadata,
    subscriptions.c.created_by,
    subscriptions.c.created_at,
)


@asynccontextmanager
async def snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A read-only transaction whose statements all see one snapshot, as `read` needs."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        async with conn.begin():
            yield conn


async def read(
    conn: AsyncConnection, after: Position | None, limit: int, where: ChangeFilter
) -> FeedPage:
    """The changes after `after` (None: the oldest kept) that `where` lets through, in commit
    order, at most `limit`. `conn` must be in a `snapshot`."""
    horizon = await check(conn, after)
    start = after or START
    visible = [_position() > _literal(start), changes.c.txid < horizon]
    scanned_to = None
    if where.narrows:
        scanned_to = await _scan_edge(conn, visible)
        if scanned_to is not None:
            visible.append(_position() <= _literal(scanned_to))
    query = (
        _with_subscription()
        .where(*visible, *_filters(where))
        .order_by(changes.c.txid, changes.c.id)
        .limit(limit)
    )
    rows = list((await conn.execute(query)).mappings())
    if len(rows) == limit:
        return FeedPage(rows, position_of(rows[-1]), horizon, at_edge=False)
    if scanned_to is not None:
        return FeedPage(rows, scanned_to, horizon, at_edge=False)
    return FeedPage(rows, max(start, edge(horizon)), horizon, at_edge=True)


async def check(conn: AsyncConnection, position: Position | None) -> int:
    """The horizon, if `position` is one to read after: raises CursorUnknown when it is past
    every transaction begun, CursorExpired when retention deleted changes after it."""
    horizon, begun, pruned_txid, pruned_id = (await conn.execute(_HORIZON_AND_PRUNED)).one()
    if position is not None and position.txid >= begun:
        raise CursorUnknown(position)
    if position is not None and position < Position(pruned_txid, pruned_id):
        raise CursorExpired(position)
    horizon_txid: int = horizon
    return horizon_txid


async def position_before(conn: AsyncConnection, since: datetime) -> Position | None:
    """The position just before the first change (in feed order) made at or after `since`:
    reading after it gives every change since then (and some a little older, made by
    transactions that committed later). None when no change is that recent."""
    first = (
        await conn.execute(
            sa.select(changes.c.txid, changes.c.id)
            .where(changes.c.occurred_at >= since)
            .order_by(changes.c.txid, changes.c.id)
            .limit(1)
        )
    ).first()
    return None if first is None else Position(first.txid, first.id - 1)


@dataclasses.dataclass(frozen=True)
class Newest:
    changes: list[RowMapping]  # as `read`'s, but newest first
    edge: Position  # after every change shown: where a reader of what follows them starts


async def newest(conn: AsyncConnection, limit: int) -> Newest:
    """The `limit` newest changes visible below the horizon (as `read` sees them), newest
    first, and the edge they were read at: a reader going on from `edge` sees every later
    change exactly once. `conn` must be in a `snapshot`."""
    horizon = await _horizon(conn)
    query = (
        _with_subscription()
        .where(changes.c.txid < horizon)
        .order_by(changes.c.txid.desc(), changes.c.id.desc())
        .limit(limit)
    )
    return Newest(list((await conn.execute(query)).mappings()), edge(horizon))


async def held_back_s(conn: AsyncConnection) -> float:
    """How long the oldest transaction holding the horizon back has run (0: none does): the
    feed's readers see nothing committed since it began until it ends."""
    seconds = await conn.scalar(_HELD_BACK)
    return float(seconds or 0.0)


# Running transactions with an id, and prepared ones (two-phase commit), which hold the
# horizon with no session at all.
_HELD_BACK = sa.text(
    "SELECT extract(epoch FROM clock_timestamp() - least("
    "(SELECT min(xact_start) FROM pg_stat_activity WHERE backend_xid IS NOT NULL), "
    "(SELECT min(prepared) FROM pg_prepared_xacts)))"
)


def edge(horizon: int) -> Position:
    """The position after every change visible below `horizon`: every change to come has a
    txid at or above it."""
    return Position(horizon - 1, _LAST_ID)


async def current_edge(conn: AsyncConnection) -> Position:
    """Where a reader that wants only what comes next starts."""
    return edge(await _horizon(conn))


@dataclasses.dataclass(frozen=True)
class Committed:
    """What had committed when a snapshot was taken (`pg_current_snapshot()`)."""

    xmin: int
    xmax: int
    running: frozenset[int]

    def holds(self, txid: int) -> bool:
        """Whether the transaction `txid` had committed (or ended) by then."""
        return txid < self.xmin or (txid < self.xmax and txid not in self.running)


async def opening(conn: AsyncConnection) -> tuple[Position, Committed]:
    """Where a reader that wants only what commits from now on starts, and what had committed
    by now: the changes between that edge and now that it must leave out. `conn` must be in a
    `snapshot`."""
    xmin, xmax, running = (await conn.scalar(_CURRENT_SNAPSHOT)).split(":")
    committed = Committed(int(xmin), int(xmax), frozenset(int(x) for x in running.split(",") if x))
    return edge(committed.xmin), committed


_CURRENT_SNAPSHOT = sa.text("SELECT CAST(pg_current_snapshot() AS text)")
# The next transaction id to be assigned, as a bigint: for a raw asyncpg connection.
NEXT_TXID_SQL = "SELECT CAST(CAST(pg_snapshot_xmax(pg_current_snapshot()) AS text) AS bigint)"


async def settled(engine: AsyncEngine, timeout_s: float) -> bool:
    """Wait until every transaction begun before now has ended, so what they committed is in
    the feed; False if one still runs after `timeout_s` (for drains: tests, one-off runs)."""
    async with engine.connect() as conn:
        begun = await conn.scalar(sa.text(NEXT_TXID_SQL))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while await _horizon(conn) < begun:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(SETTLE_POLL_S)
    return True


async def _horizon(conn: AsyncConnection) -> int:
    horizon: int = (await conn.execute(_HORIZON_AND_PRUNED)).one()[0]
    return horizon


def _with_subscription() -> sa.Select[Any]:
    """Changes with what never changes of their subscription (`IMMUTABLE`)."""
    return sa.select(changes, *IMMUTABLE).join_from(
        changes, subscriptions, subscriptions.c.id == changes.c.subscription_id
    )


def position_of(row: RowMapping) -> Position:
    return Position(row["txid"], row["id"])


def _snapshot_bound(bound: str) -> sa.Cast[int]:
    """`pg_snapshot_xmin` (the horizon) or `pg_snapshot_xmax` (the next transaction id) of
    the statement's snapshot, as a bigint."""
    value = getattr(sa.func, bound)(sa.func.pg_current_snapshot())
    return sa.cast(sa.cast(value, sa.Text), sa.BigInteger)


_HORIZON_AND_PRUNED = sa.select(
    _snapshot_bound("pg_snapshot_xmin"),
    _snapshot_bound("pg_snapshot_xmax"),
    changes_pruned.c.txid,
    changes_pruned.c.change_id,
)


def _position() -> sa.Tuple:
    return sa.tuple_(changes.c.txid, changes.c.id)


def _literal(position: Position) -> sa.Tuple:
    return sa.tuple_(
        sa.literal(position.txid, sa.BigInteger), sa.literal(position.change_id, sa.BigInteger)
    )


async def _scan_edge(
    conn: AsyncConnection, visible: list[sa.ColumnElement[bool]]
) -> Position | None:
    """The position of the SCAN_LIMIT-th visible change, if there are that many."""
    edge = (
        await conn.execute(
            sa.select(changes.c.txid, changes.c.id)
            .where(*visible)
            .order_by(changes.c.txid, changes.c.id)
            .offset(SCAN_LIMIT - 1)
            .limit(1)
        )
    ).first()
    return Position(edge.txid, edge.id) if edge is not None else None


def _filters(where: ChangeFilter) -> list[sa.ColumnElement[bool]]:
    filters: list[sa.ColumnElement[bool]] = []
    if where.types:
        filters.append(changes.c.type.in_(sorted(where.types)))
    if where.subscription_id is not None:
        filters.append(changes.c.subscription_id == where.subscription_id)
    if where.created_by is not None:
        filters.append(subscriptions.c.created_by == where.created_by)
    return filters


async def note(conn: AsyncConnection, notes: Sequence[tuple[uuid.UUID, ChangeType]]) -> int:
    """A change for each (subscription, type), showing the subscription as it is now; each
    subscription at most once. Returns how many were made."""
    if not notes:
        return 0
    db = await driver_connection(conn)
    rows = [{"subscription_id": sid, "type": type_} for sid, type_ in notes]
    return len(await _NOTE.fetch(db, notes=json_rows(rows)))


async def note_stale(
    conn: AsyncConnection, *, silent_for: timedelta, limit: int, now: datetime | None = None
) -> int:
    """`tracking.stale` for active packages, not delivered, with no carrier news for
    `silent_for` (since they were created, if never), once per silence: a delivery ends the
    silence, and the next may be reported in turn. `now`: the database's, unless given (tests
    move it). Returns how many were reported."""
    heard = sa.func.coalesce(subscriptions.c.last_heard_at, subscriptions.c.created_at)
    at = sa.func.now() if now is None else sa.literal(now, sa.DateTime(timezone=True))
    silent = (
        await conn.execute(
            sa.select(subscriptions.c.id)
            .where(
                WATCHED,
                sa.or_(
                    subscriptions.c.status_code.is_(None),
                    subscriptions.c.status_code.not_in(sorted(TERMINAL_STATUSES)),
                ),
                heard < at - silent_for,
                sa.or_(
                    subscriptions.c.stale_noted_at.is_(None),
                    subscriptions.c.stale_noted_at < heard,
                ),
            )
            .order_by(subscriptions.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    return await note(conn, [(row.id, ChangeType.STALE) for row in silent])


async def prune(conn: AsyncConnection, keep_days: int, batch: int) -> int:
    """Delete up to `batch` changes older than `keep_days`, and remember the newest position
    deleted. Callers commit each batch on its own: a long transaction holds the feed back."""
    gone = (
        await conn.execute(
            sa.delete(changes)
            .where(
                changes.c.id.in_(
                    sa.select(changes.c.id)
                    .where(changes.c.occurred_at < sa.func.now() - timedelta(days=keep_days))
                    .limit(batch)
                )
            )
            .returning(changes.c.txid, changes.c.id)
        )
    ).all()
    if gone:
        newest = max(Position(row.txid, row.id) for row in gone)
        await conn.execute(
            sa.update(changes_pruned)
            .where(sa.tuple_(changes_pruned.c.txid, changes_pruned.c.change_id) < _literal(newest))
            .values(txid=newest.txid, change_id=newest.change_id)
        )
    return len(gone)


_NOTE = named_statements("changes.sql")["note"]
