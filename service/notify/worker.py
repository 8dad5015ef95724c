"""The notifier: follows the change feed into endpoints' queues, sends their messages and
records what came of each. Several may run, in one process or many (`service/db/notify.py`
says how they share the work).

It wakes when changes commit (LISTEN on the feed's channel) or the API asks (an endpoint
enabled again), when a retry falls due, and polls as a fallback. Finished sends are recorded
by one recorder task, in batches; a database outage is waited out, and what could not be
recorded comes back when its lease runs out and is sent again (at least once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import changes, notify
from service.db.changes import CHANGES_CHANNEL
from service.db.engine import asyncpg_dsn
from service.db.errors import is_transient, is_unavailable
from service.db.notify import WAKE_CHANNEL, Attempt, Finished, Send
from service.domain.notifications import SEND_AHEAD_S, Answer, retry_delay_s, verdict
from service.metrics import Metrics
from service.notify.sending import post
from service.process.waiting import wait_set

log = structlog.get_logger(__name__)

RECORD_BATCH = 256
FAN_OUT_PAGE = 500
POLL_INTERVAL_S = 5.0
# The shortest sleep between rounds that found something due but claimed nothing.
MIN_WAIT_S = 0.05
# How long a drain waits for transactions begun before it to end (their changes to show).
DRAIN_SETTLE_S = 10.0
OUTAGE_BACKOFF_MAX_S = 30.0
# Free slots are claimed for once this share of them (1/8) is free.
CLAIM_BATCH_SHARE = 8
# A send claimed ahead waits this long for a slot at most; past it this worker's slots are
# clogged (slow consumers) and the lane is given back, for a worker that has room.
READY_WAIT_MAX_S = 1.0
# And then the worker claims no more than its free slots for this long.
CLOGGED_S = 10.0

Clock = Callable[[], datetime]


def wall_clock() -> datetime:
    return datetime.now(UTC)


class Notifier:
    def __init__(
        self,
        engine: AsyncEngine,
        session: aiohttp.ClientSession,
        *,
        database_url: str,
        render: notify.Render,
        per_endpoint: int,
        slots: int,
        timeout_s: float,
        lease_s: float,
        backlog: int,
        allowed_hosts: Iterable[str],
        metrics: Metrics,
        clock: Clock = wall_clock,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._session = session
        self._database_url = database_url
        self._render = render
        self._per_endpoint = per_endpoint
        self._slots = slots
        self._timeout_s = timeout_s
        self._lease_s = lease_s
        self._backlog = backlog
        self._allowed_hosts = tuple(allowed_hosts)
        self.metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._sends: set[asyncio.Task[None]] = set()
        # Sends claimed ahead, as many as the slots, each with when it was claimed, waiting for
        # a slot: one that frees starts its next send at once, not a claim's round trip later.
        # What may no longer go (`_stale`) is given back to the queue in the next round.
        self._ready: collections.deque[tuple[Send, datetime]] = collections.deque()
        self._giving_back: list[Send] = []
        # Until then no claiming ahead: sends waited too long for a slot, given back for others.
        self._clogged_until: datetime | None = None
        # Endpoints that answered with a pause or a 410, and when: what was claimed of them
        # before that must not go (the record that pauses or disables them may not be in yet).
        self._halted: dict[uuid.UUID, datetime] = {}
        # Claim tokens of sends answered but not yet recorded: their endpoints' room is free.
        self._answered: set[uuid.UUID] = set()
        self._finished: asyncio.Queue[Finished] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        # Whether the feed may hold what the queues have not taken: changes committed (the
        # feed's NOTIFY), an endpoint enabled or replayed, a queue that was full has room, or
        # the poll interval passed (a NOTIFY lost).
        self._feed_moved = True
        self._queues_full: frozenset[uuid.UUID] = frozenset()

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Send until `stop()`; sends in flight are then left to their leases (at least once:
        a message whose send was cut short is sent again)."""
        recorder = asyncio.create_task(self._record_forever(), name="notify-recorder")
        try:
            await self._work_forever()
        finally:
            self._giving_back.extend(send for send, _ in self._ready)
            self._ready.clear()
            await self._give_back()
            for task in list(self._sends):
                task.cancel()
            await asyncio.gather(*self._sends, return_exceptions=True)
            await self._finished.join()
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
            await self._close_listener()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def drain(self) -> int:
        """Queue what the feed holds, then send every due message and record it, until none is
        due; return how many sends were made (tests, one-off runs). Retries are left for later:
        move the clock to make them due."""
        if not await changes.settled(self._engine, DRAIN_SETTLE_S):
            log.warning("notify.drain_feed_held_back", waited_s=DRAIN_SETTLE_S)
        made = 0
        while True:
            while (await self._fan_out()).unread:
                pass
            sends = await self._claim(self._slots)
            if not sends:
                return made
            made += len(sends)
            finished = await asyncio.gather(*(self._attempt(send) for send in sends))
            await self._record(list(finished))

    async def _work_forever(self) -> None:
        outage_s = 0.0
        while not self._stopping.is_set():
            self._wake.clear()  # before the round: a NOTIFY during it is not lost
            try:
                await self._ensure_listening()
                more = False
                if self._feed_moved:
                    self._feed_moved = False  # before the fan-out, as the wake above
                    fanned = await self._fan_out()
                    more, self._queues_full = fanned.unread, fanned.full
                    self._feed_moved |= more
                await self._give_back()
                wanted = self._wanted()
                claimed = await self._claim(wanted)
                self._hold(claimed)
                if outage_s:
                    log.info("notify.database_back")
                    outage_s = 0.0
                # Busy while there is more to take: the feed's next page, or a claim that got
                # all it asked for (more may be due).
                if not more and not (wanted and len(claimed) == wanted):
                    await self._sleep_until_work()
            except Exception as error:
                outage_s = min(max(outage_s * 2, 0.5), OUTAGE_BACKOFF_MAX_S)
                if is_unavailable(error) or is_transient(error):
                    log.warning(
                        "notify.database_unavailable",
                        error=type(error).__name__,
                        retry_in_s=outage_s,
                    )
                else:
                    log.exception("notify.round_failed", retry_in_s=outage_s)
                await wait_set(self._stopping, outage_s)

    async def _fan_out(self) -> notify.FanOut:
        return await notify.fan_out(
            self._engine,
            now=self._clock(),
            page=FAN_OUT_PAGE,
            backlog=self._backlog,
            render=self._render,
        )

    async def _claim(self, slots: int) -> list[Send]:
        now = self._clock()
        return await notify.claim(
            self._engine,
            now=now,
            lease_until=now + timedelta(seconds=self._lease_s),
            per_endpoint=self._per_endpoint,
            slots=slots,
            answered=self._answered,
        )

    def _wanted(self) -> int:
        """How many lanes to claim: enough to fill the free slots and the ready queue."""
        clogged = self._clogged_until is not None and self._clock() < self._clogged_until
        ahead = 0 if clogged else self._slots
        return max(self._slots + ahead - len(self._sends) - len(self._ready), 0)

    def _hold(self, sends: list[Send]) -> None:
        claimed_at = self._clock()
        self._ready.extend((send, claimed_at) for send in sends)
        self._start_ready()

    def _start_ready(self) -> None:
        now = self._clock()
        while self._ready and len(self._sends) < self._slots:
            send, claimed_at = self._ready.popleft()
            if self._stale(send, claimed_at, now):
                self._giving_back.append(send)
                continue
            task = asyncio.create_task(self._send_and_queue(send))
            self._sends.add(task)
            task.add_done_callback(self._send_done)

    def _stale(self, send: Send, claimed_at: datetime, now: datetime) -> bool:
        """Whether a send claimed at `claimed_at` may no longer start now: it could outlive its
        lease (and go out twice, or after the lane's next message); it waited past
        READY_WAIT_MAX_S; a rate-limited endpoint's is late by more than its spacing (it would
        go out back to back with the next); or its endpoint answered with a pause or a 410
        after it was claimed."""
        limit = send.lease_until - timedelta(seconds=self._timeout_s + SEND_AHEAD_S)
        if now > limit:
            return True
        if now - claimed_at > timedelta(seconds=READY_WAIT_MAX_S):
            self._clogged_until = now + timedelta(seconds=CLOGGED_S)
            return True
        rate = send.target.rate_limit_per_s
        if rate and now > send.send_at + timedelta(seconds=1 / rate):
            return True
        halted_at = self._halted.get(send.target.endpoint_id)
        return halted_at is not None and claimed_at <= halted_at

    async def _give_back(self) -> None:
        """Give back what may no longer go, and what waited too long, for any worker to send;
        if the database cannot be reached, their leases bring those lanes back."""
        now = self._clock()
        kept: collections.deque[tuple[Send, datetime]] = collections.deque()
        for send, claimed_at in self._ready:
            if self._stale(send, claimed_at, now):
                self._giving_back.append(send)
            else:
                kept.append((send, claimed_at))
        self._ready = kept
        oldest = min((claimed_at for _, claimed_at in kept), default=now)
        self._halted = {e: at for e, at in self._halted.items() if at >= oldest}
        if not self._giving_back:
            return
        sends, self._giving_back = self._giving_back, []
        try:
            await notify.release(self._engine, sends, now)
        except Exception as error:
            log.warning("notify.release_failed", lanes=len(sends), error=type(error).__name__)

    def _send_done(self, task: asyncio.Task[None]) -> None:
        """A slot is free: a ready send takes it, and other lanes may be due. Claimed for in
        batches (an eighth of the slots), not one claim per send; the recorder wakes the loop
        in any case."""
        self._sends.discard(task)
        self._start_ready()
        if self._wanted() >= max(1, self._slots // CLAIM_BATCH_SHARE):
            self._wake.set()

    async def _send_and_queue(self, send: Send) -> None:
        finished = await self._attempt(send)
        if finished.pause_until is None and not finished.disable:
            self._answered.add(send.claim_token)  # its endpoint's room is free
        else:  # the endpoint stops: its room stays taken until the record says so
            self._halted[send.target.endpoint_id] = self._clock()
        self._finished.put_nowait(finished)

    async def _attempt(self, send: Send) -> Finished:
        """Send at its time (a rate-limited endpoint's are spaced) and judge the answer."""
        delay_s = (send.send_at - self._clock()).total_seconds()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        answer = await post(
            self._session,
            send.target.url,
            message_id=send.message_id,
            body=send.body,
            secrets=send.target.secrets,
            timeout_s=self._timeout_s,
            allowed_hosts=self._allowed_hosts,
        )
        return self._judge(send, answer, self._clock())

    def _judge(self, send: Send, answer: Answer, now: datetime) -> Finished:
        judged = verdict(answer.outcome, send.failures, answer.retry_after_s)
        failures, next_attempt_at, pause_until = 0, now, None  # delivered: the next is due now
        if judged.pause_s is not None:
            failures = send.failures
            pause_until = next_attempt_at = now + timedelta(seconds=judged.pause_s)
        elif not judged.delivered:
            failures = send.failures + 1
            next_attempt_at = now + timedelta(seconds=retry_delay_s(failures, self._rng))
        attempt = Attempt.of(
            send.target.endpoint_id,
            send.message_id,
            send.subscription_id,
            send.type,
            send.failures + 1,
            answer,
            now,
        )
        return Finished(
            send=send,
            attempt=attempt,
            delivered=judged.delivered,
            failures=failures,
            next_attempt_at=next_attempt_at,
            disable=judged.disable,
            pause_until=pause_until,
        )

    async def _sleep_until_work(self) -> None:
        """Until changes commit or the API wakes us, a retry falls due, or the poll interval.
        While sends are in flight their ends wake us, and each round claims what fell due."""
        due = None
        if not self._sends:
            async with self._engine.connect() as conn:
                due = await notify.next_due(conn)
        wait_s = POLL_INTERVAL_S
        if self._ready:
            wait_s = READY_WAIT_MAX_S  # what waits for a slot too long is given back
        if due is not None:
            # Never a busy loop: what is due but cannot be claimed (another worker's sends
            # fill its endpoint's room) is looked at again a little later.
            wait_s = min(wait_s, max((due - self._clock()).total_seconds(), MIN_WAIT_S))
        if not await wait_set(self._wake, wait_s) and wait_s >= POLL_INTERVAL_S:
            self._feed_moved = True  # a poll: in case a NOTIFY was lost

    # -- recording ---------------------------------------------------------------------------

    async def _record_forever(self) -> None:
        while True:
            batch = [await self._finished.get()]
            while len(batch) < RECORD_BATCH and not self._finished.empty():
                batch.append(self._finished.get_nowait())
            try:
                await self._record(batch)
            finally:
                for finished in batch:
                    self._answered.discard(finished.send.claim_token)
                    self._finished.task_done()
            if any(f.delivered and f.send.target.endpoint_id in self._queues_full for f in batch):
                self._feed_moved = True  # a full queue has room again
            self._wake.set()  # a delivered lane's next message is due now; slots are free

    async def _record(self, batch: list[Finished]) -> None:
        """Record, retrying through a database outage until the leases would have run out;
        past that the sends are made again anyway (their lanes come back)."""
        deadline = time.monotonic() + self._lease_s
        backoff_s = 0.2
        while True:
            try:
                async with self._engine.begin() as conn:
                    recorded = await notify.record(conn, batch)
                break
            except Exception as error:
                retryable = is_unavailable(error) or is_transient(error)  # a deadlock with fan-out
                if time.monotonic() + backoff_s > deadline or not retryable:
                    log.exception("notify.record_failed", sends=len(batch))
                    return
                log.warning("notify.record_retry", error=type(error).__name__)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
        for finished in batch:
            self._observe(finished)
        for endpoint_id, reason in recorded.disabled:
            self.metrics.notify_endpoints_disabled.inc()
            log.warning("notify.endpoint_disabled", endpoint_id=str(endpoint_id), reason=reason)

    def _observe(self, finished: Finished) -> None:
        attempt = finished.attempt
        self.metrics.notifications.labels(attempt.outcome).inc()
        self.metrics.notification_latency.observe(attempt.latency_ms / 1000)
        # Every send at INFO would be most of the log under load; a failure is worth a line.
        (log.debug if finished.delivered else log.info)(
            "notify.sent",
            endpoint_id=str(attempt.endpoint_id),
            message_id=attempt.message_id,
            attempt=attempt.attempt,
            outcome=attempt.outcome,
            status=attempt.status_code,
            latency_ms=attempt.latency_ms,
        )

    # -- LISTEN ------------------------------------------------------------------------------

    async def _ensure_listening(self) -> None:
        """A connection of its own for LISTEN, reopened after an outage; polling covers gaps."""
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            listener = await asyncpg.connect(asyncpg_dsn(self._database_url), timeout=5)
            await listener.add_listener(CHANGES_CHANNEL, self._notified)
            await listener.add_listener(WAKE_CHANNEL, self._notified)
        except (OSError, TimeoutError, asyncpg.PostgresError) as error:
            log.warning("notify.listen_unavailable", error=type(error).__name__)
            self._listener = None
            return
        self._listener = listener

    def _notified(self, *_: object) -> None:
        self._feed_moved = True
        self._wake.set()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
