"""Group commit: requests that arrive together are committed together.

Each request is still answered only after its work is committed; what changes is that the
requests which arrive while a transaction commits wait for the next one and share it, and
with it the set-based statements of `work`, which takes a list and returns one result per
item, in order. Under load a transaction holds everything that queued meanwhile; when quiet,
a request is a group of one and waits for nothing. Profiles of the webhook receiver and of
POST /v1/subscriptions showed most of a lone request's time went to its statements and its
commit; shared by a group, their cost all but disappears.

A group that loses a deadlock (or a serialization conflict) is run again as it was, up to
TRANSIENT_ATTEMPTS times in all. A group that fails for any other reason but an unreachable
database is run again one item at a time, so an item that cannot be committed fails alone.

Each writer keeps its connection between groups while work keeps coming (`_Lease`), and runs
its transactions on asyncpg directly: `work` gets the asyncpg connection inside a transaction
begun for it. Through SQLAlchemy, checking a connection out of the pool and back cost 150 µs
of CPU a group and its begin and commit another 170 µs, as much as the rest of a group of 16
deliveries' statements (measured on the 2-core bench machine).

Under load each round trip costs far more than its statement: the reply waits for the event
loop, busy with requests (1.3 ms for a BEGIN, against 0.1 ms on an idle API). So a group
commit may be given an `opening`: a statement without parameters for its items, sent in one
message with the BEGIN (the receiver's shared package locks).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db.errors import DatabaseOverloaded, is_disconnect, is_transient, is_unavailable

log = structlog.get_logger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

MAX_GROUP = 256
# Items waiting at most: past it, a database that does not keep up (slow, or gone silent until
# DATABASE_COMMAND_TIMEOUT_S) is answered 503 at once rather than holding every request's body
# in memory meanwhile.
MAX_QUEUED = 4096
# Transactions in flight at once: while one waits on the database, the next group fills.
WRITERS = 2
TRANSIENT_ATTEMPTS = 3
# How long a writer with nothing to do keeps its connection: under load the next group comes
# within milliseconds; when quiet, the connection goes back to the pool for others.
IDLE_HOLD_S = 0.05


@dataclasses.dataclass(frozen=True)
class _Waiting(Generic[In, Out]):
    item: In
    answer: asyncio.Future[Out]


class GroupCommit(Generic[In, Out]):
    def __init__(
        self,
        engine: AsyncEngine,
        work: Callable[[asyncpg.Connection, Sequence[In]], Awaitable[Sequence[Out]]],
        observe_group: Callable[[int], None],
        max_queued: int = MAX_QUEUED,
        opening: Callable[[Sequence[In]], str] | None = None,
    ) -> None:
        self._max_queued = max_queued
        self._work = work
        self._opening = opening
        self._observe_group = observe_group
        self._queue: collections.deque[_Waiting[In, Out]] = collections.deque()
        self._queued = asyncio.Event()
        self._closing = False
        self._writers: list[asyncio.Task[None]] = []
        self._connections = _Connections(engine)

    def start(self) -> None:
        self._writers = [asyncio.create_task(self._write()) for _ in range(WRITERS)]

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._queued.set()
        await asyncio.gather(*self._writers)

    @property
    def waiting(self) -> int:
        """Items queued for the next group."""
        return len(self._queue)

    async def submit(self, item: In) -> Out:
        """Do `item`'s work; returns its result once it is committed."""
        if self._closing:
            raise RuntimeError("group commit is closed")
        if len(self._queue) >= self._max_queued:
            raise DatabaseOverloaded(f"{len(self._queue)} items already wait to be committed")
        answer: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(_retrieve)
        self._queue.append(_Waiting(item, answer))
        self._queued.set()
        # A caller that hangs up cancels only its answer: its item stays queued, to be
        # committed all the same (a webhook then comes again and is recognised as a
        # duplicate), and the writer leaves the cancelled answer alone. Awaited bare, not
        # through asyncio.shield, whose extra future and callbacks every request paid for.
        return await answer

    async def _write(self) -> None:
        lease = _Lease(self._connections)
        try:
            while True:
                if not self._queue and not self._closing:
                    await self._wait_for_work(lease)
                group = [self._queue.popleft() for _ in range(min(MAX_GROUP, len(self._queue)))]
                if not self._queue and not self._closing:
                    self._queued.clear()
                if group:
                    await self._commit(lease, group)
                elif self._closing:
                    return
        finally:
            await lease.release()

    async def _wait_for_work(self, lease: _Lease) -> None:
        try:
            async with asyncio.timeout(IDLE_HOLD_S):
                await self._queued.wait()
        except TimeoutError:
            await lease.release()
            await self._queued.wait()

    async def _commit(
        self, lease: _Lease, group: list[_Waiting[In, Out]], attempt: int = 1
    ) -> BaseException | None:
        """Commit the group and answer each item; the error that failed it, if it failed
        whole. Returned, not read back from the answers: a caller that hung up cancelled its
        answer, which then holds no error."""
        self._observe_group(len(group))
        try:
            results = await self._transaction(lease, [waiting.item for waiting in group])
        except Exception as error:
            if is_transient(error) and attempt < TRANSIENT_ATTEMPTS:
                log.warning("group_commit.conflict", items=len(group), attempt=attempt)
                return await self._commit(lease, group, attempt + 1)
            if len(group) > 1 and not is_unavailable(error):
                log.warning(
                    "group_commit.group_failed", items=len(group), error=type(error).__name__
                )
                await self._commit_each(lease, group)
                return None
            _fail(group, error)
            return error
        for waiting, result in zip(group, results, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(result)
        return None

    async def _commit_each(self, lease: _Lease, group: list[_Waiting[In, Out]]) -> None:
        """One item at a time, so that one that cannot be committed fails alone; once the
        database is gone, the rest fail with it rather than each waiting for it."""
        for index, waiting in enumerate(group):
            error = await self._commit(lease, [waiting])
            if error is not None and is_unavailable(error):
                _fail(group[index + 1 :], error)
                return

    async def _transaction(self, lease: _Lease, items: list[In]) -> Sequence[Out]:
        db = await lease.connection()
        try:
            lease.settled = False
            try:
                opening = self._opening(items) if self._opening else ""
                # One message, one round trip: a statement after BEGIN runs in its transaction.
                await db.execute(f"BEGIN; {opening}" if opening else "BEGIN")
                results = await self._work(db, items)
                # A transaction that failed and went on (an error caught by `work`) ends in a
                # ROLLBACK at COMMIT, without an error: its work must not be answered as done.
                if (status := await db.execute("COMMIT")) != "COMMIT":
                    raise RuntimeError(f"the transaction ended in {status}, not COMMIT")
            except BaseException as failure:
                lease.settled = await _roll_back(db, failure)
                raise
            lease.settled = True
            return results
        except Exception as error:
            if is_disconnect(error) or db.is_closed():
                self._connections.lost()
            if not lease.settled or is_unavailable(error) or db.is_closed():
                # Dead, or in a state not worth guessing at: replaced before the next group.
                await lease.discard()
            raise


class _Connections:
    """Where the writers' connections come from, and when one was last found dead: a restart
    or failover ends them all, so the others', taken before, are replaced before their use."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.lost_at = -1.0

    def lost(self) -> None:
        self.lost_at = time.monotonic()


class _Lease:
    """A writer's connection from the engine's pool, kept between its transactions."""

    def __init__(self, connections: _Connections) -> None:
        self._connections = connections
        self._conn: AsyncConnection | None = None
        self._driver: asyncpg.Connection | None = None
        self._taken_at = 0.0
        # False from a group's BEGIN until its COMMIT or ROLLBACK has been answered: a
        # connection left so (a writer cancelled mid-group) may be inside a transaction that
        # asyncpg does not know of yet, and is never given back to the pool.
        self.settled = True

    async def connection(self) -> asyncpg.Connection:
        if self._driver is not None and self._driver.is_closed():
            # Ended by the server (a restart, pg_terminate_backend): asyncpg saw it close.
            self._connections.lost()
        if self._taken_at <= self._connections.lost_at:
            await self.discard()
        if self._driver is None:
            conn = await self._checked_out()
            try:
                raw = await conn.get_raw_connection()
            except BaseException:
                await conn.close()
                raise
            self._conn, self._driver = conn, raw.driver_connection
            self._taken_at = time.monotonic()
            self.settled = True
        return self._driver

    async def _checked_out(self) -> AsyncConnection:
        """A connection that answers. The check goes through SQLAlchemy: a connection that a
        restart or failover left dead is recognised and discarded with the pool's others of
        its age, which a failure on asyncpg alone would leave for the next caller to meet."""
        try:
            return await self._answering()
        except Exception as error:
            if not is_disconnect(error):
                raise  # a full pool or a slow server: another try would only wait as long
            self._connections.lost()
            return await self._answering()  # one of the new connections the pool makes now

    async def _answering(self) -> AsyncConnection:
        conn = await self._connections.engine.connect()
        try:
            # Autocommit: the check is its one round trip, not BEGIN, SELECT and ROLLBACK.
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("SELECT 1")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def release(self) -> None:
        """Back to the pool; closed instead if a transaction may be open on it (a writer
        cancelled mid-group), which the pool would not roll back."""
        conn, driver = self._conn, self._driver
        if conn is None or driver is None:
            return
        if not self.settled or driver.is_closed() or driver.is_in_transaction():
            await self.discard()
        else:
            self._conn = self._driver = None
            await conn.close()

    async def discard(self) -> None:
        """Closed, not pooled: the pool makes a new one in its place."""
        conn = self._conn
        self._conn = self._driver = None
        if conn is not None:
            try:
                await conn.invalidate()
            finally:
                await conn.close()


async def _roll_back(db: asyncpg.Connection, failure: BaseException) -> bool:
    """Whether the transaction was rolled back after `failure`. Not tried after a statement
    that ran out of time or a cancelled writer: a ROLLBACK would first wait for the cancel of
    a statement, on a server that may not answer; the connection is discarded instead, as
    after a ROLLBACK that fails (`failure` stays the error reported)."""
    if db.is_closed() or isinstance(failure, TimeoutError | asyncio.CancelledError):
        return False
    try:
        await db.execute("ROLLBACK")
    except Exception:
        return False
    return True


def _fail(group: list[_Waiting[In, Out]], error: BaseException) -> None:
    for waiting in group:
        if not waiting.answer.done():
            waiting.answer.set_exception(error)


def _retrieve(answer: asyncio.Future[Out]) -> None:
    """Mark an answer's error as seen: the caller may have hung up, and the error is logged."""
    if not answer.cancelled():
        answer.exception()
