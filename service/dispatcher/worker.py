"""The dispatcher: claims due subscriptions and makes their ShipEngine calls.

Several may run at once, in one process or many; the claim query keeps them apart. It wakes
on NOTIFY for new work, sleeps until the earliest retry otherwise, and polls as a fallback in
case a notification is lost (a reconnect, a dispatcher started late).

Finished calls are recorded by one recorder task in batches: under load many outcomes share a
transaction, when idle each is recorded at once. Database outages are waited out with backoff;
nothing is lost meanwhile, because unrecorded claims come back when their lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import dispatch
from service.db.dispatch import CallResult, Claim
from service.db.engine import asyncpg_dsn
from service.db.errors import is_unavailable
from service.domain.subscriptions import (
    Budget,
    CallOutcome,
    Operation,
    OutcomeKind,
    RetryPolicy,
    Transition,
)
from service.metrics import Metrics
from service.process.waiting import wait_set

log = structlog.get_logger(__name__)

Caller = Callable[[Operation, str, str, str | None], Awaitable[CallOutcome]]

RECORD_BATCH = 256
OUTAGE_BACKOFF_MAX_S = 30.0


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
        shutdown_grace_s: float,
        retry_policy: RetryPolicy,
        budget: Budget,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._call = call
        self._database_url = database_url
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._poll_interval_s = poll_interval_s
        self._shutdown_grace_s = shutdown_grace_s
        self._retry_policy = retry_policy
        self._budget = budget
        self.metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._calls: dict[asyncio.Task[None], Claim] = {}
        self._results: asyncio.Queue[CallResult] = asyncio.Queue()
        self._slot_free = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self.listening = asyncio.Event()  # set while NOTIFY can wake it (else it polls)

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until `stop()`; then finish or release in-flight calls and record them."""
        recorder = asyncio.create_task(self._record_forever(), name="dispatch-recorder")
        try:
            await self._claim_forever()
        finally:
            await self._finish_in_flight()
            await self._results.join()
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
            await self._close_listener()

    def stop(self) -> None:
        """Stop claiming; `run()` then lets in-flight calls finish within the grace period."""
        self._stopping.set()
        self._wake.set()
        self._slot_free.set()

    async def drain(self) -> int:
        """Make every call due now and record it; return how many (tests, one-off runs).

        Retries that the calls schedule, however soon, are left for the next drain.
        """
        async with self._engine.connect() as conn:
            started_at = await dispatch.database_now(conn)
        made = 0
        while True:
            claimed, _ = await self._claim_and_start(due_by=started_at)
            made += claimed
            if claimed == 0 and not self._calls:
                return made
            if self._calls:
                await asyncio.wait(list(self._calls))
            # Recorded before the next claim, so a pause they cause holds the next round back.
            await self._record_pending()

    async def _claim_forever(self) -> None:
        outage_s = 0.0
        while not self._stopping.is_set():
            # Cleared before the claim, so a NOTIFY that lands during it is not lost.
            self._wake.clear()
            self._slot_free.clear()
            try:
                await self._ensure_listening()
                wanted = self._concurrency - len(self._calls)
                claimed, held_for_s = await self._claim_and_start()
                if outage_s:
                    log.info("dispatch.database_back")
                    outage_s = 0.0
                if len(self._calls) >= self._concurrency:
                    await wait_set(self._slot_free, self._poll_interval_s)
                elif held_for_s is not None:
                    # The budget or a pause holds claiming back: new work cannot change that,
                    # so no NOTIFY wakes us and nothing is asked of the database meanwhile.
                    await wait_set(self._stopping, min(held_for_s, self._poll_interval_s))
                elif claimed < wanted:
                    await self._sleep_until_work()  # all that was due is taken
            except Exception as error:
                outage_s = min(max(outage_s * 2, 0.5), OUTAGE_BACKOFF_MAX_S)
                if is_unavailable(error):
                    log.warning(
                        "dispatch.database_unavailable",
                        error=type(error).__name__,
                        retry_in_s=outage_s,
                    )
                else:
                    log.exception("dispatch.claim_failed", retry_in_s=outage_s)
                await wait_set(self._stopping, outage_s)

    async def _claim_and_start(self, due_by: datetime | None = None) -> tuple[int, float | None]:
        free = self._concurrency - len(self._calls)
        if free <= 0:
            return 0, None
        async with self._engine.begin() as conn:
            claimed = await dispatch.claim_due(
                conn, limit=free, lease_s=self._lease_s, budget=self._budget, due_by=due_by
            )
        for claim in claimed.claims:
            task = asyncio.create_task(self._make_call(claim))
            self._calls[task] = claim
            task.add_done_callback(self._call_done)
        return len(claimed.claims), claimed.held_for_s

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._calls.pop(task, None)
        self._slot_free.set()

    async def _make_call(self, claim: Claim) -> None:
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        outcome = await self._call(
            claim.operation, claim.carrier_code, claim.tracking_number, claim.carrier_id
        )
        self._results.put_nowait(
            CallResult(
                claim=claim,
                outcome=outcome,
                started_at=started_at,
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
                retry_in_s=self._retry_policy.delay_s(claim.attempt, self._rng),
            )
        )

    async def _sleep_until_work(self) -> None:
        """Until new work is notified, a retry falls due, or the poll interval passes."""
        async with self._engine.connect() as conn:
            due_in_s = await dispatch.next_due_in_s(conn)
        await wait_set(
            self._wake,
            self._poll_interval_s if due_in_s is None else min(due_in_s, self._poll_interval_s),
        )

    # -- recording ---------------------------------------------------------------------------

    async def _record_forever(self) -> None:
        while True:
            first = await self._results.get()
            await self._record_batch([first, *self._take_waiting(RECORD_BATCH - 1)])

    async def _record_pending(self) -> None:
        while not self._results.empty():
            await self._record_batch(self._take_waiting(RECORD_BATCH))

    def _take_waiting(self, most: int) -> list[CallResult]:
        batch: list[CallResult] = []
        while len(batch) < most and not self._results.empty():
            batch.append(self._results.get_nowait())
        return batch

    async def _record_batch(self, batch: list[CallResult]) -> None:
        """Record, retrying through database outages; give up only if the lease would expire.

        Giving up is safe: the claims come back after their lease and the calls are made again
        (ShipEngine's start and stop are idempotent).
        """
        deadline = time.monotonic() + self._lease_s
        backoff_s = 0.2
        try:
            while True:
                try:
                    async with self._engine.begin() as conn:
                        moves = await dispatch.record_outcomes(
                            conn, batch, policy=self._retry_policy, budget=self._budget
                        )
                    break
                except Exception as error:
                    if time.monotonic() + backoff_s > deadline or not is_unavailable(error):
                        log.exception("dispatch.record_failed", calls=len(batch))
                        return
                    log.warning(
                        "dispatch.record_retry", error=type(error).__name__, retry_in_s=backoff_s
                    )
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 5.0)
            for result, moved in zip(batch, moves, strict=True):
                self._observe(result, moved)
        finally:
            for _ in batch:
                self._results.task_done()

    def _observe(self, result: CallResult, moved: Transition | None) -> None:
        claim, outcome = result.claim, result.outcome
        self.metrics.dispatch_calls.labels(
            claim.operation.value, outcome.kind.value, outcome.error_code or ""
        ).inc()
        self.metrics.dispatch_latency.labels(claim.operation.value).observe(
            result.latency_ms / 1000
        )
        fields = {
            "subscription_id": str(claim.subscription_id),
            "operation": claim.operation.value,
            "attempt": claim.attempt,
            "outcome": outcome.kind.value,
            "http_status": outcome.http_status,
            "request_id": outcome.request_id,
            "error_code": outcome.error_code,
            "latency_ms": result.latency_ms,
        }
        if moved is None:
            self.metrics.dispatch_claims_lost.inc()
            log.warning("dispatch.claim_lost", **fields)
        elif outcome.kind.pauses_dispatch:
            kind = "rate_limit" if outcome.kind is OutcomeKind.RATE_LIMITED else "account"
            self.metrics.dispatch_pauses.labels(kind).inc()
            log.error("dispatch.paused", **fields, message=outcome.message)
        else:
            log.info("dispatch.call", **fields, state=moved.state.value)

    # -- stopping ----------------------------------------------------------------------------

    async def _finish_in_flight(self) -> None:
        """Let in-flight calls end within the grace period; release the claims of the rest."""
        if not self._calls:
            return
        _, unfinished = await asyncio.wait(list(self._calls), timeout=self._shutdown_grace_s)
        abandoned = [self._calls[task] for task in unfinished if task in self._calls]
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if abandoned:
            try:
                async with self._engine.begin() as conn:
                    await dispatch.release(conn, abandoned)
                log.info("dispatch.released", calls=len(abandoned))
            except Exception:
                # Their leases bring them back all the same, only later.
                log.exception("dispatch.release_failed", calls=len(abandoned))

    # -- LISTEN ------------------------------------------------------------------------------

    async def _ensure_listening(self) -> None:
        """A dedicated connection for LISTEN, reopened after an outage; polling covers gaps."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self.listening.clear()
        try:
            listener = await asyncpg.connect(asyncpg_dsn(self._database_url), timeout=5)
            await listener.add_listener(dispatch.DISPATCH_CHANNEL, self._notified)
        except (OSError, TimeoutError, asyncpg.PostgresError) as error:
            log.warning("dispatch.listen_unavailable", error=type(error).__name__)
            self._listener = None
            return
        self._listener = listener
        self.listening.set()

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _close_listener(self) -> None:
        self.listening.clear()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
