"""The reconciler: asks ShipEngine about packages whose webhooks may have gone missing.

ShipEngine gives up delivering a webhook after a few attempts, and stops tracking by itself on
some states; a package can then fall silent while it still moves. Each round the reconciler
marks long-delivered packages done (they cost nothing more), then polls `GET /v1/tracking` for
active packages silent longer than their status allows, within what the shared rate budget
leaves after starts and stops. What it learns is filed exactly like a webhook: same code path,
same deduplication, so a poll that finds nothing new is a duplicate and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import changes, reconcile
from service.db.deliveries import Incoming, store_and_file
from service.db.dispatch import DEFAULT_RETRY_AFTER_S, pause
from service.db.driver import driver_connection
from service.domain.subscriptions import Budget, Operation, OutcomeKind
from service.domain.tracking import RearmPolicy
from service.metrics import Metrics
from service.process.waiting import wait_set
from service.shipengine.client import ShipEngineClient

log = structlog.get_logger(__name__)

# Silent packages reported to the change feed at most per round; the next round takes the rest.
STALE_BATCH = 1000


class Reconciler:
    def __init__(
        self,
        engine: AsyncEngine,
        client: ShipEngineClient,
        *,
        budget: Budget,
        silence_s: Mapping[str | None, float],
        done_after_s: float,
        interval_s: float,
        batch: int,
        rearm: RearmPolicy,
        metrics: Metrics,
        stale_after_s: float,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._engine = engine
        self._client = client
        self._budget = budget
        self._silence_s = silence_s
        self._done_after_s = done_after_s
        self._interval_s = interval_s
        self._batch = batch
        self._rearm = rearm
        self._metrics = metrics
        self._stale_after = timedelta(seconds=stale_after_s)
        self._clock = clock  # None: the database's clock; tests move their own
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception:
                # A database outage or a bug costs one round, not the process.
                log.exception("reconcile.round_failed")
            await wait_set(self._stopping, self._interval_s)

    def stop(self) -> None:
        self._stopping.set()

    async def run_once(self) -> int:
        """One round: mark what is done, report what fell silent to the change feed, poll what
        is silent; returns how many were polled."""
        now = self._clock() if self._clock is not None else None
        async with self._engine.begin() as conn:
            done = await reconcile.mark_done(conn, self._done_after_s)
            stale = await changes.note_stale(
                conn, silent_for=self._stale_after, limit=STALE_BATCH, now=now
            )
            watched = await reconcile.claim_silent(
                conn, limit=self._batch, silence_s=self._silence_s, budget=self._budget
            )
        if done:
            log.info("reconcile.done", subscriptions=done)
        if stale:
            log.info("reconcile.stale", subscriptions=stale)
        await asyncio.gather(*(self._poll(package) for package in watched))
        return len(watched)

    async def _poll(self, package: reconcile.Watched) -> None:
        polled = await self._client.get_tracking(package.carrier_code, package.tracking_number)
        outcome = polled.outcome
        self._metrics.polls.labels(outcome.kind.value).inc()
        if polled.information is None:
            log.warning(
                "reconcile.poll_failed",
                subscription_id=str(package.subscription_id),
                outcome=outcome.kind.value,
                http_status=outcome.http_status,
                error_code=outcome.error_code,
            )
            if outcome.kind is OutcomeKind.RATE_LIMITED:
                seconds = outcome.retry_after_s or DEFAULT_RETRY_AFTER_S
                async with self._engine.begin() as conn:
                    await pause(conn, "rate_limit", seconds, outcome.as_error(Operation.START))
            return
        payload = {
            "resource_url": polled.url,
            "resource_type": "API_TRACK",
            "data": polled.information,
        }
        incoming = Incoming.read(
            payload,
            json.dumps(payload).encode(),
            headers={},
            verification="not_applicable",
            source="poll",
        )
        async with self._engine.begin() as conn:
            (filed,) = await store_and_file(await driver_connection(conn), [incoming], self._rearm)
        log.info(
            "reconcile.polled",
            subscription_id=str(package.subscription_id),
            outcome=filed.outcome,
            new_events=filed.new_events,
            status_changed=filed.status_changed,
        )
