"""Notification delivery's statements: following the change feed into each endpoint's queue,
claiming lanes to send, and recording what each send did.

An endpoint's queue is filled from the feed by whichever worker holds the fan-out lock (one at
a time, so workers woken together do not all read the same changes), up to `backlog` messages:
past that, what an endpoint has not taken waits in the feed, which keeps it for the feed's
retention. So a consumer that is down costs a bounded queue, not a copy of every change.

A lane (an endpoint's queue of one subscription) sends only its oldest message: a
subscription's changes arrive in `sequence` order, while the other lanes go on. Claiming a
lane leases it, as the dispatcher's claims are leased: a worker that dies mid-send loses
nothing, the lease runs out and another sends the message again (at least once).

`now` is the sender's clock, passed to every statement, so tests can move it by a day.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import changes
from service.db.changes import ChangeFilter, Position
from service.db.driver import bytea_text, driver_connection, json_rows, named_statements
from service.db.tables import (
    notify_attempts,
    notify_cursors,
    notify_endpoints,
    notify_lanes,
)
from service.domain.endpoints import RATE_LIMIT_MIN_PER_S, EndpointState
from service.domain.notifications import SEND_AHEAD_S, Answer, secrets_in_force

log = structlog.get_logger(__name__)

# What wakes the senders when an endpoint may send again (enabled, replayed), at commit.
WAKE_CHANNEL = "notify_wake"
# The fan-out lock's key (pg_advisory_xact_lock): any fixed number no other lock here uses.
FAN_OUT_LOCK = 0x6E6F74696679  # "notify"
# The space of the endpoints' claim locks (the high half of their keys), apart from any other's.
ENDPOINT_LOCK_SPACE = 0x6E65  # "ne"
# The most endpoints one claim locks: advisory locks share the server's lock table (about 64
# per connection), and a claim holding hundreds could exhaust it for every session.
CLAIM_ENDPOINTS_MAX = 64

Render = Callable[[RowMapping], bytes]


@dataclasses.dataclass(frozen=True)
class Target:
    """An endpoint as a send needs it."""

    endpoint_id: uuid.UUID
    url: str
    secrets: tuple[str, ...] = dataclasses.field(repr=False)  # the first is the current one
    rate_limit_per_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Send:
    """A claimed lane's oldest message, to send at `send_at`."""

    target: Target
    subscription_id: uuid.UUID
    claim_token: uuid.UUID
    failures: int  # of this message so far
    change_id: int
    type: str
    body: bytes = dataclasses.field(repr=False)
    send_at: datetime
    lease_until: datetime  # the claim's: the send must be over well before

    @property
    def message_id(self) -> str:
        return f"chg_{self.change_id}"


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One send and how it went, as `notify_attempts` keeps it."""

    endpoint_id: uuid.UUID
    message_id: str
    subscription_id: uuid.UUID | None
    type: str
    attempt: int
    outcome: str
    status_code: int | None
    latency_ms: float
    response: str | None = dataclasses.field(repr=False)
    attempted_at: datetime

    def row(self) -> dict[str, Any]:
        """As `notify_attempts` takes it (dataclasses.asdict, without its deep copies: a
        tenth of a busy sender's time)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def of(
        cls,
        endpoint_id: uuid.UUID,
        message_id: str,
        subscription_id: uuid.UUID | None,
        type: str,
        attempt: int,
        answer: Answer,
        at: datetime,
    ) -> Attempt:
        return cls(
            endpoint_id=endpoint_id,
            message_id=message_id,
            subscription_id=subscription_id,
            type=type,
            attempt=attempt,
            outcome=answer.outcome.value,
            status_code=answer.status_code,
            latency_ms=round(answer.latency_ms, 3),
            response=answer.response,
            attempted_at=at,
        )


@dataclasses.dataclass(frozen=True)
class Finished:
    """A claimed send, done: its attempt, and what follows for its lane and endpoint."""

    send: Send
    attempt: Attempt
    delivered: bool
    failures: int  # of the message after this attempt
    next_attempt_at: datetime  # of the lane: now when delivered, else the retry or pause
    disable: str | None = None
    pause_until: datetime | None = None


# -- following the feed ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FanOut:
    queued: int  # messages queued
    unread: bool  # the feed holds more than a page for an endpoint: read on at once
    full: frozenset[uuid.UUID]  # endpoints whose queue was full: read on once one has room


async def fan_out(
    engine: AsyncEngine, *, now: datetime, page: int, backlog: int, render: Render
) -> FanOut:
    """Queue what every enabled endpoint wants of the feed past its cursor, a page at most
    each (nothing when another worker is at it: it does the same)."""
    async with engine.begin() as conn:
        if not await conn.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(FAN_OUT_LOCK))):
            return FanOut(0, unread=False, full=frozenset())
        followers, full = await _followers(conn, backlog)
        if not followers:
            return FanOut(0, unread=False, full=full)
        # The feed is read in a snapshot of its own; this transaction writes only at the end,
        # so it holds no transaction id (and so the feed's horizon) back while the feed is read.
        async with changes.snapshot(engine) as feed:
            messages, cursors, unread = await _read_for(feed, followers, page, render)
        if not cursors:
            return FanOut(0, unread=False, full=full)
        db = await driver_connection(conn)
        result = await _ENQUEUE.fetch(
            db,
            messages=json_rows(messages),
            cursors=json_rows(cursors),
            now=now,
        )
        return FanOut(result[0]["queued"], unread=unread, full=full)


@dataclasses.dataclass(frozen=True)
class _Follower:
    endpoint_id: uuid.UUID
    position: Position
    created_by: str | None  # None: every client's
    types: frozenset[str] | None  # None: every type

    def wants(self, change: RowMapping) -> bool:
        return (self.created_by is None or change["created_by"] == self.created_by) and (
            self.types is None or change["type"] in self.types
        )


async def _followers(
    conn: AsyncConnection, backlog: int
) -> tuple[list[_Follower], frozenset[uuid.UUID]]:
    """Enabled endpoints whose queue has room, and those whose queue is full."""
    queued = (
        sa.select(sa.func.coalesce(sa.func.sum(notify_lanes.c.pending), 0))
        .where(notify_lanes.c.endpoint_id == notify_endpoints.c.id)
        .scalar_subquery()
    )
    query = (
        sa.select(
            notify_endpoints.c.id,
            notify_endpoints.c.created_by,
            notify_endpoints.c.all_clients,
            notify_endpoints.c.types,
            notify_cursors.c.txid,
            notify_cursors.c.change_id,
            (queued >= backlog).label("full"),
        )
        .join_from(notify_endpoints, notify_cursors)
        .where(notify_endpoints.c.state == EndpointState.ENABLED.value)
    )
    rows = list(await conn.execute(query))
    followers = [
        _Follower(
            row.id,
            Position(row.txid, row.change_id),
            None if row.all_clients else row.created_by,
            frozenset(row.types) if row.types is not None else None,
        )
        for row in rows
        if not row.full
    ]
    return followers, frozenset(row.id for row in rows if row.full)


async def _read_for(
    feed: AsyncConnection, followers: list[_Follower], page: int, render: Render
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """The messages to queue, the cursors to move, and whether a page stopped short of the
    edge: the feed read once per position that endpoints share (most share the edge), each
    change rendered once."""
    edge = await changes.current_edge(feed)
    by_position: dict[Position, list[_Follower]] = {}
    for follower in followers:
        if follower.position < edge:
            by_position.setdefault(follower.position, []).append(follower)
    messages: list[dict[str, Any]] = []
    cursors: list[dict[str, Any]] = []
    bodies: dict[int, str] = {}
    unread = False
    for position, sharing in by_position.items():
        read = await _read_page(feed, position, page, sharing)
        unread = unread or not read.at_edge
        for follower in sharing:
            for change in read.changes:
                if not follower.wants(change):
                    continue
                if change["id"] not in bodies:
                    bodies[change["id"]] = bytea_text(render(change))
                messages.append(_message(follower.endpoint_id, change, bodies[change["id"]]))
            cursors.append(
                {
                    "endpoint_id": follower.endpoint_id,
                    "txid": read.next.txid,
                    "change_id": read.next.change_id,
                }
            )
    return messages, cursors, unread


async def _read_page(
    feed: AsyncConnection, position: Position, page: int, sharing: list[_Follower]
) -> changes.FeedPage:
    try:
        return await changes.read(feed, position, page, ChangeFilter())
    except changes.CursorExpired:
        # Disabled (or stuck) for longer than the feed keeps changes: what retention deleted
        # is gone. Said loudly, and delivery goes on from the oldest change kept.
        log.warning(
            "notify.changes_lost_to_retention",
            endpoints=[str(follower.endpoint_id) for follower in sharing],
        )
        return await changes.read(feed, None, page, ChangeFilter())
    except changes.CursorUnknown:
        # The database was restored into another server: its transaction ids have not
        # reached the cursor. Going on from the edge is all that can be done.
        log.warning(
            "notify.cursor_unknown_restarting_at_edge",
            endpoints=[str(follower.endpoint_id) for follower in sharing],
        )
        edge = await changes.current_edge(feed)
        return changes.FeedPage([], edge, edge.txid + 1, at_edge=True)


def _message(endpoint_id: uuid.UUID, change: RowMapping, body: str) -> dict[str, Any]:
    return {
        "endpoint_id": endpoint_id,
        "change_id": change["id"],
        "subscription_id": change["subscription_id"],
        "sequence": change["sequence"],
        "type": change["type"],
        "body": body,
    }


async def start_at_edge(conn: AsyncConnection, endpoint_id: uuid.UUID) -> None:
    """A new endpoint's cursor: it receives what commits from now on."""
    edge = await changes.current_edge(conn)
    await conn.execute(
        sa.insert(notify_cursors).values(
            endpoint_id=endpoint_id, txid=edge.txid, change_id=edge.change_id
        )
    )


# -- claiming ----------------------------------------------------------------------------------


async def claim(
    engine: AsyncEngine,
    *,
    now: datetime,
    lease_until: datetime,
    per_endpoint: int,
    slots: int,
    answered: Collection[uuid.UUID] = (),
) -> list[Send]:
    """Lanes due now, up to `per_endpoint` in flight for each endpoint (across every worker)
    and `slots` in all, shared in turns among endpoints; each with the time it may be sent (a
    rate-limited endpoint's are spaced out). `answered`: the claim tokens of this worker's sends
    that were answered but are not recorded yet; they hold their lanes (the next message waits
    for the record) but no longer the endpoint's room."""
    if slots <= 0:
        return []
    async with engine.begin() as conn:
        locked = await _LOCK_ENDPOINTS.execute(
            conn,
            now=now,
            ahead_s=SEND_AHEAD_S,
            endpoints=min(slots, CLAIM_ENDPOINTS_MAX),
            lock_space=ENDPOINT_LOCK_SPACE,
        )
        if not locked:
            return []
        rows = await _CLAIM.execute(
            conn,
            endpoints=[row.id for row in locked],
            now=now,
            lease_until=lease_until,
            per_endpoint=per_endpoint,
            slots=slots,
            answered=list(answered),
            ahead_s=SEND_AHEAD_S,
            rate_min=RATE_LIMIT_MIN_PER_S,
        )
    targets: dict[uuid.UUID, Target] = {}
    sends = []
    for row in rows:
        endpoint_id = row.endpoint_id
        if (target := targets.get(endpoint_id)) is None:
            secrets = secrets_in_force(
                row.secret, row.previous_secret, row.previous_secret_expires_at, now
            )
            target = targets[endpoint_id] = Target(
                endpoint_id, row.url, tuple(secrets), row.rate_limit_per_s
            )
        sends.append(
            Send(
                target=target,
                subscription_id=row.subscription_id,
                claim_token=row.claim_token,
                failures=row.failures,
                change_id=row.change_id,
                type=row.type,
                body=bytes(row.body),
                send_at=row.send_at,
                lease_until=lease_until,
            )
        )
    return sends


async def release(engine: AsyncEngine, sends: Iterable[Send], now: datetime) -> None:
    """Give claimed lanes back unsent, due now (those their claims still hold)."""
    lanes = [
        {
            "endpoint_id": send.target.endpoint_id,
            "subscription_id": send.subscription_id,
            "claim_token": send.claim_token,
        }
        for send in sends
    ]
    if lanes:
        async with engine.begin() as conn:
            await _RELEASE.execute(conn, lanes=json_rows(lanes), now=now)


# -- recording ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recorded:
    disabled: list[tuple[uuid.UUID, str]]  # endpoints this disabled, and why


async def record(conn: AsyncConnection, finished: Sequence[Finished]) -> Recorded:
    """Keep each attempt; for each send whose claim still holds its lane (a lease that ran
    out belongs to whoever claimed the lane since), delete what was delivered and release the
    lane; disable or pause endpoints. `conn` must be in a transaction."""
    if not finished:
        return Recorded([])
    released = await _FINISH.execute(  # through SQLAlchemy: it begins the transaction
        conn,
        attempts=json_rows([f.attempt.row() for f in finished]),
        finished=json_rows(
            [
                {
                    "endpoint_id": f.send.target.endpoint_id,
                    "subscription_id": f.send.subscription_id,
                    "claim_token": f.send.claim_token,
                    "change_id": f.send.change_id,
                    "delivered": f.delivered,
                    "failures": f.failures,
                    "next_attempt_at": f.next_attempt_at,
                }
                for f in finished
            ]
        ),
    )
    empty = [
        {"endpoint_id": row.endpoint_id, "subscription_id": row.subscription_id}
        for row in released
        if row.pending == 0
    ]
    if empty:
        await _DROP_EMPTY_LANES.execute(conn, lanes=json_rows(empty))
    return Recorded(await _endpoint_effects(conn, finished))


async def _endpoint_effects(
    conn: AsyncConnection, finished: Iterable[Finished]
) -> list[tuple[uuid.UUID, str]]:
    disabled: dict[uuid.UUID, str] = {}
    paused: dict[uuid.UUID, datetime] = {}
    for f in finished:
        endpoint_id = f.send.target.endpoint_id
        if f.disable is not None:
            disabled.setdefault(endpoint_id, f.disable)
        if f.pause_until is not None:
            paused[endpoint_id] = max(f.pause_until, paused.get(endpoint_id, f.pause_until))
    for endpoint_id, until in paused.items():
        await conn.execute(
            sa.update(notify_endpoints)
            .where(notify_endpoints.c.id == endpoint_id)
            .values(
                paused_until=sa.func.greatest(
                    sa.func.coalesce(notify_endpoints.c.paused_until, until), until
                )
            )
        )
    made: list[tuple[uuid.UUID, str]] = []
    for endpoint_id, reason in disabled.items():
        result = await conn.execute(
            sa.update(notify_endpoints)
            .where(
                notify_endpoints.c.id == endpoint_id,
                notify_endpoints.c.state == EndpointState.ENABLED.value,
            )
            .values(
                state=EndpointState.DISABLED.value,
                disabled_reason=reason,
                updated_at=sa.func.now(),
            )
        )
        if result.rowcount:
            made.append((endpoint_id, reason))
    return made


async def record_attempts(conn: AsyncConnection, attempts: Sequence[Attempt]) -> list[RowMapping]:
    """Attempts that belong to no lane (a `test` ping), as kept."""
    query = (
        sa.insert(notify_attempts)
        .values([attempt.row() for attempt in attempts])
        .returning(*notify_attempts.c)
    )
    return list((await conn.execute(query)).mappings())


# -- waiting -----------------------------------------------------------------------------------


async def next_due(conn: AsyncConnection) -> datetime | None:
    """When the earliest lane of an enabled endpoint is due (a lease's end included), and not
    before its endpoint's pause ends; None when no lane waits."""
    earliest_lane = (
        sa.select(sa.func.min(notify_lanes.c.next_attempt_at))
        .where(notify_lanes.c.endpoint_id == notify_endpoints.c.id)
        .scalar_subquery()
    )
    # greatest() skips NULLs: an endpoint with no lane has nothing due, paused or not. A
    # rate-limited one's next claim waits for its next send to come within SEND_AHEAD_S.
    next_claim = notify_endpoints.c.next_send_at - timedelta(seconds=SEND_AHEAD_S)
    due = sa.case(
        (earliest_lane.is_(None), None),
        else_=sa.func.greatest(earliest_lane, notify_endpoints.c.paused_until, next_claim),
    )
    query = sa.select(sa.func.min(due)).where(
        notify_endpoints.c.state == EndpointState.ENABLED.value
    )
    found: datetime | None = await conn.scalar(query)
    return found


@dataclasses.dataclass(frozen=True)
class EndpointCounts:
    by_state: dict[EndpointState, int]
    queued: int  # messages not yet delivered


async def endpoint_counts(conn: AsyncConnection) -> EndpointCounts:
    """What ops watch of notifications: endpoints by state, and what waits to be sent."""
    states = await conn.execute(
        sa.select(notify_endpoints.c.state, sa.func.count()).group_by(notify_endpoints.c.state)
    )
    queued = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(notify_lanes.c.pending), 0)))
    return EndpointCounts({EndpointState(state): n for state, n in states}, int(queued or 0))


# The disabled endpoints a summary names, newest first.
SUMMARY_DISABLED = 20


async def summary(conn: AsyncConnection) -> dict[str, Any]:
    """Notifications for ops: endpoints by state, what waits to be sent, and which endpoints
    the sender disabled, why and since when; in JSON's types, as the summary is served."""
    counts = await endpoint_counts(conn)
    e = notify_endpoints.c
    disabled = await conn.execute(
        sa.select(e.id, e.created_by, e.disabled_reason, e.updated_at.label("since"))
        .where(e.state == EndpointState.DISABLED.value)
        .order_by(e.updated_at.desc())
        .limit(SUMMARY_DISABLED)
    )
    return {
        "endpoints": {state.value: counts.by_state.get(state, 0) for state in EndpointState},
        "queued": counts.queued,
        "disabled": [
            {
                "id": str(row.id),
                "created_by": row.created_by,
                "disabled_reason": row.disabled_reason,
                "since": row.since.isoformat(),
            }
            for row in disabled
        ],
    }


async def resume_lanes(conn: AsyncConnection, endpoint_id: uuid.UUID, now: datetime) -> None:
    """An endpoint enabled again: every lane due now with a clean slate, its pause dropped, so
    delivery resumes where it stopped."""
    await conn.execute(
        sa.update(notify_lanes)
        .where(notify_lanes.c.endpoint_id == endpoint_id, notify_lanes.c.claim_token.is_(None))
        .values(failures=0, next_attempt_at=now)
    )
    await conn.execute(
        sa.update(notify_endpoints)
        .where(notify_endpoints.c.id == endpoint_id)
        .values(paused_until=None, next_send_at=None)
    )


async def prune_attempts(conn: AsyncConnection, keep_days: int, batch: int) -> int:
    """Delete up to `batch` attempts older than `keep_days`. Callers commit each batch."""
    old = (
        sa.select(notify_attempts.c.id)
        .where(notify_attempts.c.attempted_at < sa.func.now() - timedelta(days=keep_days))
        .limit(batch)
    )
    result = await conn.execute(sa.delete(notify_attempts).where(notify_attempts.c.id.in_(old)))
    return int(result.rowcount)


_STATEMENTS = named_statements("notify.sql")
_ENQUEUE = _STATEMENTS["enqueue"]
_LOCK_ENDPOINTS = _STATEMENTS["lock_endpoints"]
_CLAIM = _STATEMENTS["claim"]
_RELEASE = _STATEMENTS["release"]
_FINISH = _STATEMENTS["finish"]
_DROP_EMPTY_LANES = _STATEMENTS["drop_empty_lanes"]
