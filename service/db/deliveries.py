"""Webhook deliveries: stored raw with their verification, then filed, in one transaction.

Filing is one code path for everything that tells us about a package: a webhook, a replay of a
stored delivery, an orphan adopted by a new subscription, a reconciler's poll. It is idempotent:
events are stored once, a status never moves back in time, so filing anything again is harmless.

It is also set-based: many deliveries (those a receiver commits together, the orphans a new
subscription adopts) cost the same few statements as one. Each statement takes its rows as
one JSON parameter (`db/driver.py` says why), so its text never changes with the number of
rows and PostgreSQL prepares it once. The deliveries of a batch are filed in the order given,
each against its subscription as the ones before left it, exactly as if they had come one by
one.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncConnection

from service import json_exact
from service.db.driver import bytea_text, driver_connection, json_rows, named_statements
from service.db.tables import ORIGINAL, webhook_deliveries, webhook_refusal_counts
from service.domain.changes import filing_change, may_change
from service.domain.deliveries import DeliveryOutcome
from service.domain.tracking import (
    Filing,
    PackageStatus,
    RearmPolicy,
    TrackEvent,
    TrackingUpdate,
    content_digest,
    file_update,
    parse_track_payload,
)


@dataclasses.dataclass(frozen=True)
class Incoming:
    """A delivery as received (or polled), verified and parsed, not yet stored."""

    headers: dict[str, str]
    body: bytes
    update: TrackingUpdate
    content_sha256: bytes
    verification: str
    source: str = "webhook"

    @classmethod
    def read(
        cls,
        payload: object,
        body: bytes,
        *,
        headers: dict[str, str],
        verification: str,
        source: str = "webhook",
    ) -> Incoming:
        """`payload` (the JSON of `body`) parsed, and its content's digest from what was parsed."""
        update = parse_track_payload(payload)
        return cls(headers, body, update, content_digest(payload, update), verification, source)


@dataclasses.dataclass(frozen=True)
class FiledDelivery:
    delivery_id: int
    outcome: DeliveryOutcome  # filed, orphan or duplicate
    subscription_id: uuid.UUID | None
    new_events: int = 0
    status_changed: bool = False
    regression: bool = False
    rearmed: bool = False


@dataclasses.dataclass(frozen=True)
class Stored:
    """A stored delivery to file, with what its row says now: its outcome and subscription.
    An `outcome` of None leaves the row as it is (a duplicate replayed files its content but
    stays a duplicate)."""

    delivery_id: int
    update: TrackingUpdate
    outcome: DeliveryOutcome | None
    subscription_id: uuid.UUID | None = None


async def store_and_file(
    db: asyncpg.Connection, incoming: Sequence[Incoming], rearm: RearmPolicy
) -> list[FiledDelivery]:
    """`file_incoming`, with the packages' shared locks taken first (`share_packages`). `db` is
    in a transaction (from SQLAlchemy's connection: `driver_connection`)."""
    await share_packages(db, [item.update.tracking_number for item in incoming])
    return await file_incoming(db, incoming, rearm)


async def file_incoming(
    db: asyncpg.Connection, incoming: Sequence[Incoming], rearm: RearmPolicy
) -> list[FiledDelivery]:
    """Keep each delivery and file what it says; a copy of stored content is kept as a duplicate.
    The transaction holds the packages' shared locks already (`shared_locks_sql`).

    The unique index on content recognises a copy before any subscription row is locked, so a
    burst of retries of one delivery does not queue up on its subscription. Within the batch,
    the first of equal contents is the candidate original and the others its copies.
    """
    first_of: dict[bytes, int] = {}
    for index, item in enumerate(incoming):
        first_of.setdefault(item.content_sha256, index)
    candidates = [incoming[index] for index in first_of.values()]
    originals, live = await _insert_originals_and_lock(db, candidates)
    is_original = [
        first_of[item.content_sha256] == index and item.content_sha256 in originals
        for index, item in enumerate(incoming)
    ]
    pairs = list(zip(incoming, is_original, strict=True))
    to_file = [
        _as_stored(originals[item.content_sha256], item.update)
        for item, original in pairs
        if original
    ]
    copies = [item for item, original in pairs if not original]
    filed, duplicates = await _file(db, to_file, rearm, copies, live)
    return [next(filed) if original else next(duplicates) for original in is_original]


async def share_packages(db: asyncpg.Connection, numbers: Iterable[str | None]) -> None:
    """Hold the packages' filing locks in shared mode until the transaction ends.

    Filing chooses a package's live subscription from one snapshot; a subscription created
    meanwhile adopts the orphans it can see. Without these locks a subscription committed
    between a delivery's snapshot and its commit saw no orphan, and the delivery saw no
    subscription: it stayed an orphan. `subscribe` takes the same locks exclusively after its
    INSERT, so each side waits for the other's commit and the second sees the first. Shared
    among deliveries, they never wait for each other. Taken in key order by both sides, they
    cannot deadlock.
    """
    await db.execute(shared_locks_sql(numbers))


def shared_locks_sql(numbers: Iterable[str | None]) -> str:
    """`share_packages`' statement: no parameter, so that it can go in one round trip with the
    BEGIN of its transaction (`GroupCommit`'s `opening`)."""
    return _locks_sql("pg_advisory_xact_lock_shared", numbers)


async def lock_packages(db: asyncpg.Connection, numbers: Iterable[str]) -> None:
    """The packages' filing locks, exclusively, until the transaction ends (`share_packages`)."""
    await db.execute(_locks_sql("pg_advisory_xact_lock", numbers))


def _locks_sql(lock: str, numbers: Iterable[str | None]) -> str:
    """The packages' locks taken by `lock`, their keys written in: the text holds integers
    only, whatever the tracking numbers hold."""
    keys = ",".join(str(key) for key in package_lock_keys(n for n in numbers if n))
    return f"SELECT count({lock}(k)) FROM unnest(ARRAY[{keys}]::bigint[]) k"


# A package's lock is one of PACKAGE_LOCKS advisory locks, chosen by its tracking number (a
# delivery may not name its carrier). Buckets, not one lock a package: advisory locks live in
# PostgreSQL's shared lock table (max_locks_per_transaction x max_connections entries), which a
# few bulk subscribes of 1,000 packages would otherwise fill; two packages that share a bucket
# only wait for each other a little more often.
PACKAGE_LOCKS = 256
_PACKAGE_LOCK_SPACE = 0x7472  # the advisory lock space of these locks, apart from any other's


def package_lock_keys(numbers: Iterable[str]) -> list[int]:
    """The advisory lock keys of these packages, distinct, in the order both sides take them.
    Worked out here, not by PostgreSQL, so that the shared locks' statement needs no
    parameter; CRC-32 spreads tracking numbers over the buckets as well as any hash."""
    buckets = {zlib.crc32(n.encode("utf-8", "surrogatepass")) % PACKAGE_LOCKS for n in numbers}
    return [_PACKAGE_LOCK_SPACE << 32 | bucket for bucket in sorted(buckets)]


def _as_stored(row: asyncpg.Record, update: TrackingUpdate) -> Stored:
    return Stored(
        row["delivery_id"], update, DeliveryOutcome(row["outcome"]), row["subscription_id"]
    )


async def file_stored(
    db: asyncpg.Connection, deliveries: Sequence[Stored], rearm: RearmPolicy
) -> list[FiledDelivery]:
    """File stored deliveries against the live subscriptions of their packages (or keep them
    orphans), in the order given; one result per delivery, in that order."""
    if not deliveries:
        return []  # a new subscription without orphans: no connection work at all
    live = await _lock_live(db, {d.update.tracking_number for d in deliveries})
    filed, _ = await _file(db, deliveries, rearm, (), live)
    return list(filed)


# The live subscriptions of a batch's packages, locked, by tracking number.
_Live = dict[str, list[asyncpg.Record]]


class _Change(NamedTuple):
    """A row of status_changes, named as its columns."""

    subscription_id: uuid.UUID
    previous_status_code: str | None
    status_code: str | None
    occurred_at: datetime | None
    delivery_id: int


@dataclasses.dataclass
class _Writes:
    """What filing a batch writes, gathered as it is folded, in one statement's arrays."""

    events: dict[tuple[uuid.UUID, bytes], tuple[datetime, int, TrackEvent]] = dataclasses.field(
        default_factory=dict
    )
    shown: dict[uuid.UUID, PackageStatus] = dataclasses.field(default_factory=dict)
    history: list[_Change] = dataclasses.field(default_factory=list)
    candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    marks: list[dict[str, Any]] = dataclasses.field(default_factory=list)


async def _file(
    db: asyncpg.Connection,
    deliveries: Sequence[Stored],
    rearm: RearmPolicy,
    copies: Sequence[Incoming],
    live: _Live,
) -> tuple[Iterator[FiledDelivery], Iterator[FiledDelivery]]:
    """File `deliveries` in order against their packages' `live` subscriptions, locked, and
    keep `copies` as duplicates: the results of each, in their order. One statement."""
    writes = _Writes()
    folded = [_fold(d, _match(live, d.update), writes, rearm) for d in deliveries]
    if writes.marks:
        await _MARK.fetch(db, marks=json_rows(writes.marks))
    new_events: dict[int, int] = {}
    duplicates: list[FiledDelivery] = []
    if writes.events or writes.shown or copies:
        rows = await _WRITE_FILINGS.fetch(
            db,
            events=_event_rows(writes.events),
            statuses=_status_rows(writes.shown),
            rearm_delay_s=rearm.delay_s,
            history=json_rows([change._asdict() for change in writes.history]),
            candidates=json_rows(writes.candidates),
            **_delivery_parameters(copies),
        )
        new_events = {row["id"]: row["events"] for row in rows if row["kind"] == "event"}
        # Identities are drawn in the order rows are inserted, which is the order given.
        copied = sorted((r["id"], r["subscription_id"]) for r in rows if r["kind"] == "copy")
        duplicates = [FiledDelivery(id_, DeliveryOutcome.DUPLICATE, sub) for id_, sub in copied]
    filed = (
        FiledDelivery(
            delivery_id,
            DeliveryOutcome.FILED,
            subscription_id,
            new_events=new_events.get(delivery_id, 0),
            status_changed=filing.changed,
            regression=filing.regression,
            rearmed=filing.rearmed,
        )
        if subscription_id is not None and filing is not None
        else FiledDelivery(delivery_id, DeliveryOutcome.ORPHAN, None)
        for delivery_id, subscription_id, filing in folded
    )
    return filed, iter(duplicates)


def _fold(
    delivery: Stored, subscription: asyncpg.Record | None, writes: _Writes, rearm: RearmPolicy
) -> tuple[int, uuid.UUID | None, Filing | None]:
    """File one delivery against what its subscription shows after the batch's earlier ones."""
    if subscription is None:
        if delivery.outcome not in (None, DeliveryOutcome.ORPHAN):
            writes.marks.append(_mark(delivery.delivery_id, DeliveryOutcome.ORPHAN, None))
        return delivery.delivery_id, None, None
    subscription_id: uuid.UUID = subscription["id"]
    for event in delivery.update.events:
        first = (subscription["created_at"], delivery.delivery_id, event)
        writes.events.setdefault((subscription_id, event.key), first)
    before = writes.shown.get(subscription_id) or _package_status(subscription)
    filing = file_update(before, delivery.update, rearm)
    writes.shown[subscription_id] = filing.status
    if may_change(filing):
        candidate = _candidate(delivery, subscription_id, before, filing)
        if candidate["type"] is not None or delivery.update.events:
            candidate["ord"] = len(writes.candidates)
            writes.candidates.append(candidate)
    if filing.changed:
        writes.history.append(
            _Change(
                subscription_id,
                before.status_code,
                filing.status.status_code,
                delivery.update.newest_event_at,
                delivery.delivery_id,
            )
        )
    if delivery.outcome is not None and (delivery.outcome, delivery.subscription_id) != (
        DeliveryOutcome.FILED,
        subscription_id,
    ):
        writes.marks.append(_mark(delivery.delivery_id, DeliveryOutcome.FILED, subscription_id))
    return delivery.delivery_id, subscription_id, filing


def _candidate(
    delivery: Stored, subscription_id: uuid.UUID, before: PackageStatus, filing: Filing
) -> dict[str, Any]:
    """The change a delivery makes (`candidates` in `write_filings`): its type if it changed
    the status or the eta (else it is one only if it stored new events), and what the
    subscription shows after it; its newest event is the one it reports."""
    status = filing.status
    dated = [event for event in delivery.update.events if event.occurred_at is not None]
    newest = max(dated, key=lambda event: event.occurred_at or _NEVER, default=None)
    return {
        "subscription_id": subscription_id,
        "delivery_id": delivery.delivery_id,
        "type": filing_change(before, filing),
        "previous_status_code": before.status_code,
        "status_code": status.status_code,
        "status_description": status.status_description,
        "estimated_delivery_date": status.estimated_delivery_date,
        "actual_delivery_date": status.actual_delivery_date,
        "last_event_at": status.last_event_at,
        "newest_event": newest._asdict() if newest is not None else None,
    }


_NEVER = datetime.min.replace(tzinfo=UTC)


def _match(live: _Live, update: TrackingUpdate) -> asyncpg.Record | None:
    """The newest live subscription of the package. The carrier code can be missing from a
    delivery; the tracking number alone then decides."""
    candidates = [
        row
        for row in live.get(update.tracking_number or "", ())
        if update.carrier_code is None or row["carrier_code"] == update.carrier_code
    ]
    return max(candidates, key=lambda row: row["created_at"], default=None)


def _package_status(subscription: asyncpg.Record) -> PackageStatus:
    return PackageStatus(
        status_code=subscription["status_code"],
        status_description=subscription["status_description"],
        estimated_delivery_date=subscription["estimated_delivery_date"],
        actual_delivery_date=subscription["actual_delivery_date"],
        last_event_at=subscription["last_event_at"],
        rearms=subscription["rearms"],
        rearm_due=subscription["rearm_due"],
        rearmable=subscription["rearmable"],
    )


async def _insert_originals_and_lock(
    db: asyncpg.Connection, incoming: list[Incoming]
) -> tuple[dict[bytes, asyncpg.Record], _Live]:
    """Store each as the original of its content unless one is stored already, and lock the
    live subscriptions of the packages of those stored: by content, the rows stored (id,
    outcome, subscription_id: `_as_stored`), and the locked subscriptions by tracking number."""
    if not incoming:
        return {}, {}
    rows = await _INSERT_ORIGINALS_AND_LOCK.fetch(db, **_delivery_parameters(incoming))
    originals = {row["content_sha256"]: row for row in rows if row["kind"] == "original"}
    return originals, _by_package(row for row in rows if row["kind"] == "live")


def _delivery_parameters(incoming: Sequence[Incoming]) -> dict[str, Any]:
    """`delivery_rows`' parameters (`sql/deliveries.sql`): the bodies, which can be large,
    stay bytes."""
    rows = [
        {
            "headers": item.headers,
            "content_sha256": bytea_text(item.content_sha256),
            "resource_type": item.update.resource_type,
            "carrier_code": item.update.carrier_code,
            "tracking_number": item.update.tracking_number,
            "source": item.source,
            "verification": item.verification,
        }
        for item in incoming
    ]
    return {"deliveries": json_rows(rows), "bodies": [item.body for item in incoming]}


async def _lock_live(db: asyncpg.Connection, tracking_numbers: Iterable[str | None]) -> _Live:
    """The live subscriptions of these tracking numbers, locked (`lock_live`)."""
    numbers = sorted(number for number in tracking_numbers if number is not None)
    return _by_package(await _LOCK_LIVE.fetch(db, numbers=numbers) if numbers else ())


def _by_package(rows: Iterable[asyncpg.Record]) -> _Live:
    live: _Live = collections.defaultdict(list)
    for row in rows:
        live[row["tracking_number"]].append(row)
    return live


def _event_rows(
    events: dict[tuple[uuid.UUID, bytes], tuple[datetime, int, TrackEvent]],
) -> str:
    return json_rows(
        [
            {
                "subscription_id": subscription_id,
                "subscription_created_at": created_at,
                "event_key": bytea_text(key),
                "delivery_id": delivery_id,
                **event._asdict(),
            }
            for (subscription_id, key), (created_at, delivery_id, event) in events.items()
        ]
    )


def _status_rows(shown: dict[uuid.UUID, PackageStatus]) -> str:
    """What each subscription shows after the batch; its row is locked, so the values
    computed here are the ones to keep."""
    return json_rows(
        [
            {
                "id": subscription_id,
                "status_code": status.status_code,
                "status_description": status.status_description,
                "estimated_delivery_date": status.estimated_delivery_date,
                "actual_delivery_date": status.actual_delivery_date,
                "last_event_at": status.last_event_at,
                "rearms": status.rearms,
                "rearm_due": status.rearm_due,
            }
            for subscription_id, status in shown.items()
        ]
    )


def _mark(
    delivery_id: int, outcome: DeliveryOutcome, subscription_id: uuid.UUID | None
) -> dict[str, Any]:
    return {"id": delivery_id, "outcome": outcome, "subscription_id": subscription_id}


async def record_refusal(
    conn: AsyncConnection,
    *,
    headers: dict[str, str],
    body: bytes,
    refusal: str,
    verification: str,
) -> int:
    """Keep a refused delivery and why: it was not acknowledged, but ops can see it. What is
    kept of it is the receiver's to cap (`webhooks/refusals.py`: a sample of a few KiB)."""
    delivery_id: int = (
        await conn.execute(
            sa.insert(webhook_deliveries)
            .values(
                headers=headers,
                body=body,
                body_sha256=hashlib.sha256(body).digest(),
                outcome=DeliveryOutcome.REFUSED.value,
                refusal=refusal,
                verification=verification,
            )
            .returning(webhook_deliveries.c.id)
        )
    ).scalar_one()
    return delivery_id


async def count_unstored_refusals(
    conn: AsyncConnection, counts: Mapping[str, int], *, keep_days: int
) -> None:
    """Add refusals that were counted, not stored, to this minute's counts by reason (every
    API process adds its own); and drop the counts older than `keep_days`."""
    if not counts:
        return
    rows = [
        {"minute": sa.func.date_trunc("minute", sa.func.now()), "reason": r, "unstored": n}
        for r, n in sorted(counts.items())
    ]
    insert = pg.insert(webhook_refusal_counts).values(rows)
    await conn.execute(
        insert.on_conflict_do_update(
            index_elements=[webhook_refusal_counts.c.minute, webhook_refusal_counts.c.reason],
            set_={"unstored": webhook_refusal_counts.c.unstored + insert.excluded.unstored},
        )
    )
    await conn.execute(
        sa.delete(webhook_refusal_counts).where(
            webhook_refusal_counts.c.minute < sa.func.now() - timedelta(days=keep_days)
        )
    )


async def adopt_orphans(
    db: asyncpg.Connection, packages: Sequence[tuple[str, str]], rearm: RearmPolicy
) -> set[tuple[str, str]]:
    """File the deliveries that came before their subscriptions; returns the packages that
    had some, as (carrier_code, tracking_number). One indexed query when none had any: a fixed
    statement to asyncpg (SQLAlchemy's expanding IN was 4 % of the subscribe path's CPU)."""
    wanted = set(packages)
    orphans = await _ORPHANS_OF.fetch(db, numbers=sorted({number for _, number in wanted}))
    adopted = set()
    to_file = []
    for orphan in orphans:
        # A delivery without a carrier code belongs to whichever carrier has its number.
        matches = [(c, n) for c, n in wanted if n == orphan["tracking_number"]]
        match = next((p for p in matches if p[0] == orphan["carrier_code"]), None)
        if match is None and orphan["carrier_code"] is None and matches:
            match = matches[0]
        if match is not None:
            to_file.append(Stored(orphan["id"], _reparse(orphan["body"]), DeliveryOutcome.ORPHAN))
            adopted.add(match)
    await file_stored(db, to_file, rearm)
    return adopted


def _reparse(body: bytes) -> TrackingUpdate:
    try:
        payload = json_exact.loads(body)  # the receiver's reader: the same values, read faster
    except (ValueError, RecursionError):
        payload = None
    return parse_track_payload(payload)


async def deliveries_to_replay(
    conn: AsyncConnection, received_from: datetime, received_to: datetime
) -> list[int]:
    """Originals received in [from, to): their copies say the same and need no replay."""
    rows = await conn.execute(
        sa.select(webhook_deliveries.c.id)
        .where(
            webhook_deliveries.c.received_at >= received_from,
            webhook_deliveries.c.received_at < received_to,
            ORIGINAL,
        )
        .order_by(webhook_deliveries.c.id)
    )
    return [row.id for row in rows]


async def replay(
    conn: AsyncConnection, delivery_ids: Sequence[int], rearm: RearmPolicy
) -> list[FiledDelivery]:
    """File stored deliveries again, in id order; refused ones (never trusted) and unknown ids
    are left out."""
    rows = (
        await conn.execute(
            sa.select(
                webhook_deliveries.c.id,
                webhook_deliveries.c.body,
                webhook_deliveries.c.outcome,
                webhook_deliveries.c.subscription_id,
            )
            .where(
                webhook_deliveries.c.id.in_(delivery_ids),
                webhook_deliveries.c.outcome != DeliveryOutcome.REFUSED.value,
            )
            .order_by(webhook_deliveries.c.id)
        )
    ).all()
    stored = [
        Stored(
            row.id,
            _reparse(row.body),
            None if row.outcome == DeliveryOutcome.DUPLICATE else DeliveryOutcome(row.outcome),
            row.subscription_id,
        )
        for row in rows
    ]
    return await file_stored(await driver_connection(conn), stored, rearm)


async def replay_one(
    conn: AsyncConnection, delivery_id: int, rearm: RearmPolicy
) -> FiledDelivery | None:
    """`replay` of one delivery; None if there is none, or it was refused."""
    replayed = await replay(conn, [delivery_id], rearm)
    return replayed[0] if replayed else None


# The webhook path's statements (`sql/deliveries.sql`), sent to asyncpg directly.
_STATEMENTS = named_statements("deliveries.sql")
_INSERT_ORIGINALS_AND_LOCK = _STATEMENTS["insert_originals_and_lock"]
_LOCK_LIVE = _STATEMENTS["lock_live"]
_ORPHANS_OF = _STATEMENTS["orphans_of"]
_MARK = _STATEMENTS["mark"]
_WRITE_FILINGS = _STATEMENTS["write_filings"]
