"""Group commit for webhook deliveries: those that arrive together are committed together.

Each delivery is still answered only after it is committed; what changes is that the
deliveries which arrive while a batch is being committed wait for the next batch and share its
transaction and its few set-based statements (`store_and_file`). Under load, a batch holds
everything that queued meanwhile; when quiet, a delivery is a batch of one and waits for
nothing. Profiling showed a delivery filed on its own spent most of its time issuing about
seven statements under a row lock; shared by a batch, their cost all but disappears.

A batch that fails for any reason but an unreachable database is filed again one delivery at
a time, so a delivery that cannot be filed fails alone (and a deadlock between batches, should
one happen, costs a retry rather than an error).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.deliveries import FiledDelivery, Incoming, store_and_file
from service.db.errors import is_unavailable
from service.domain.tracking import RearmPolicy
from service.metrics import Metrics

log = structlog.get_logger(__name__)

MAX_BATCH = 256
# Batches in flight at once: while one waits on the database, the next one is being filled.
WRITERS = 2


@dataclasses.dataclass(frozen=True)
class _Waiting:
    incoming: Incoming
    answer: asyncio.Future[FiledDelivery]


class DeliveryBatcher:
    def __init__(self, engine: AsyncEngine, rearm: RearmPolicy, metrics: Metrics) -> None:
        self._engine = engine
        self._rearm = rearm
        self._metrics = metrics
        self._queue: collections.deque[_Waiting] = collections.deque()
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
        """Deliveries queued for the next batch."""
        return len(self._queue)

    async def file(self, incoming: Incoming) -> FiledDelivery:
        """Store and file one delivery; returns once it is committed."""
        if self._closing:
            raise RuntimeError("the delivery batcher is closed")
        answer: asyncio.Future[FiledDelivery] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(_retrieve)
        self._queue.append(_Waiting(incoming, answer))
        self._queued.set()
        # Shielded: a sender that hangs up leaves its delivery in the batch, to be kept (and
        # recognised as a duplicate when ShipEngine sends it again).
        return await asyncio.shield(answer)

    async def _write(self) -> None:
        while True:
            await self._queued.wait()
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            if not self._queue and not self._closing:
                self._queued.clear()
            if batch:
                await self._commit(batch)
            elif self._closing:
                return

    async def _commit(self, batch: list[_Waiting]) -> None:
        self._metrics.webhook_batch_size.observe(len(batch))
        try:
            async with self._engine.begin() as conn:
                filed = await store_and_file(conn, [w.incoming for w in batch], self._rearm)
        except Exception as error:
            if len(batch) > 1 and not is_unavailable(error):
                log.warning("webhook.batch_failed", deliveries=len(batch), error=repr(error))
                for waiting in batch:
                    await self._commit([waiting])
                return
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(error)
            return
        for waiting, result in zip(batch, filed, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(result)


def _retrieve(answer: asyncio.Future[FiledDelivery]) -> None:
    """Mark an answer's error as seen: the sender may have hung up, and the error is logged."""
    if not answer.cancelled():
        answer.exception()
