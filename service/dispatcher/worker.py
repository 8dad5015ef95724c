"""The dispatcher: claims due subscriptions and makes their ShipEngine calls.

Several may run at once, in one process or many; the claim query keeps them apart. It wakes
on NOTIFY for new work, sleeps until the earliest retry otherwise, and polls as a fallback in
case a notification is lost (a reconnect, a dispatcher started late).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import dispatch
from service.db.dispatch import Claim
from service.db.engine import asyncpg_dsn
from service.db.errors import is_unavailable
from service.domain.subscriptions import CallOutcome, Operation, RetryPolicy

log = structlog.get_logger(__name__)

Caller = Callable[[Operation, str, str, str | None], Awaitable[CallOutcome]]


class Dispatcher:
    def __init__(
        self,
        engine: AsyncEngine,
        call: Caller,
        *,
        database_url: str,
        concurrency: int,
        lease_s: float,
        poll_interval_s: float,
        retry_policy: RetryPolicy,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._call = call
        self._database_url = database_url
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._poll_interval_s = poll_interval_s
        self._retry_policy = retry_policy
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.listening = asyncio.Event()  # set while NOTIFY can wake it (else it polls)

    async def run(self) -> None:
        """Dispatch until `stop()`; then let in-flight calls finish."""
        listener = await self._listen()
        try:
            while not self._stopping.is_set():
                # Cleared before the claim, so a NOTIFY that lands during it is not lost.
                self._wake.clear()
                self._slot_free.clear()
                try:
                    claimed = await self._claim_and_start()
                    if claimed == 0:
                        await self._sleep_until_work()
                    elif len(self._in_flight) >= self._concurrency:
                        await self._wait(self._slot_free, self._poll_interval_s)
                except Exception as error:
                    if not is_unavailable(error):
                        raise
                    log.warning("dispatch.database_unavailable", error=str(error))
                    await self._wait(self._stopping, self._poll_interval_s)
        finally:
            if listener is not None:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    await listener.close()
            await self._drain_in_flight()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._slot_free.set()

    async def drain(self) -> int:
        """Make every call due now, then return how many were made (tests, one-off runs).

        Retries that the calls schedule, however soon, are left for the next drain.
        """
        async with self._engine.connect() as conn:
            started_at = await dispatch.database_now(conn)
        made = 0
        while True:
            claimed = await self._claim_and_start(due_by=started_at)
            made += claimed
            if claimed == 0 and not self._in_flight:
                return made
            await asyncio.gather(*self._in_flight)

    async def _claim_and_start(self, due_by: datetime | None = None) -> int:
        free = self._concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        async with self._engine.begin() as conn:
            claims = await dispatch.claim_due(
                conn, limit=free, lease_s=self._lease_s, due_by=due_by
            )
        for claim in claims:
            task = asyncio.create_task(self._process(claim))
            self._in_flight.add(task)
            task.add_done_callback(self._finished)
        return len(claims)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slot_free.set()

    async def _process(self, claim: Claim) -> None:
        bound = log.bind(
            subscription_id=str(claim.subscription_id),
            operation=claim.operation.value,
            attempt=claim.attempt,
        )
        started = time.perf_counter()
        outcome = await self._call(
            claim.operation, claim.carrier_code, claim.tracking_number, claim.carrier_id
        )
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        retry_in_s = self._retry_policy.delay_s(claim.attempt, outcome, self._rng)
        try:
            async with self._engine.begin() as conn:
                moved = await dispatch.record_outcome(conn, claim, outcome, retry_in_s)
        except Exception:
            # The claim's lease brings the call back; nothing is lost by not recording it.
            bound.exception("dispatch.record_failed", outcome=outcome.kind.value)
            return
        if moved is None:
            bound.warning("dispatch.claim_lost", outcome=outcome.kind.value)
            return
        bound.info(
            "dispatch.call",
            outcome=outcome.kind.value,
            http_status=outcome.http_status,
            request_id=outcome.request_id,
            latency_ms=latency_ms,
            state=moved.state.value,
            retry_in_s=None if moved.retry_in_s is None else round(moved.retry_in_s, 3),
        )

    async def _sleep_until_work(self) -> None:
        async with self._engine.connect() as conn:
            due_in_s = await dispatch.next_due_in_s(conn)
        timeout = (
            self._poll_interval_s if due_in_s is None else min(due_in_s, self._poll_interval_s)
        )
        await self._wait(self._wake, timeout)

    @staticmethod
    async def _wait(event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    async def _listen(self) -> asyncpg.Connection | None:
        """A dedicated connection for LISTEN; without it the dispatcher still works, by polling."""
        try:
            connection: asyncpg.Connection = await asyncpg.connect(asyncpg_dsn(self._database_url))
            await connection.add_listener(dispatch.DISPATCH_CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError) as error:
            log.warning("dispatch.listen_unavailable", error=str(error))
            return None
        self.listening.set()
        return connection

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _drain_in_flight(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
