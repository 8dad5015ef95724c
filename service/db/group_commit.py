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
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db.errors import DatabaseOverloaded, is_transient, is_unavailable

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


@dataclasses.dataclass(frozen=True)
class _Waiting(Generic[In, Out]):
    item: In
    answer: asyncio.Future[Out]


class GroupCommit(Generic[In, Out]):
    def __init__(
        self,
        engine: AsyncEngine,
        work: Callable[[AsyncConnection, Sequence[In]], Awaitable[Sequence[Out]]],
        observe_group: Callable[[int], None],
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self._engine = engine
        self._max_queued = max_queued
        self._work = work
        self._observe_group = observe_group
        self._queue: collections.deque[_Waiting[In, Out]] = collections.deque()
        self._queued = asyncio.Event()
        self._closing = False
        self._writers: list[asyncio.Task[None]] = []

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
        # Shielded: a caller that hangs up leaves its item in the group, to be committed all
        # the same (a webhook then comes again and is recognised as a duplicate).
        return await asyncio.shield(answer)

    async def _write(self) -> None:
        while True:
            await self._queued.wait()
            group = [self._queue.popleft() for _ in range(min(MAX_GROUP, len(self._queue)))]
            if not self._queue and not self._closing:
                self._queued.clear()
            if group:
                await self._commit(group)
            elif self._closing:
                return

    async def _commit(self, group: list[_Waiting[In, Out]], attempt: int = 1) -> None:
        self._observe_group(len(group))
        try:
            async with self._engine.begin() as conn:
                results = await self._work(conn, [waiting.item for waiting in group])
        except Exception as error:
            if is_transient(error) and attempt < TRANSIENT_ATTEMPTS:
                log.warning("group_commit.conflict", items=len(group), attempt=attempt)
                await self._commit(group, attempt + 1)
                return
            if len(group) > 1 and not is_unavailable(error):
                log.warning(
                    "group_commit.group_failed", items=len(group), error=type(error).__name__
                )
                for waiting in group:
                    await self._commit([waiting])
                return
            for waiting in group:
                if not waiting.answer.done():
                    waiting.answer.set_exception(error)
            return
        for waiting, result in zip(group, results, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(result)


def _retrieve(answer: asyncio.Future[Out]) -> None:
    """Mark an answer's error as seen: the caller may have hung up, and the error is logged."""
    if not answer.cancelled():
        answer.exception()
