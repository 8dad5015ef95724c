"""The simulator's state and behaviour, reachable from tests as `app[SIMULATOR]`.

Each tracked package lives in one background task: it sleeps `pace_s`, advances one step and
delivers that step's webhook (with its retries) before the next step. A package's deliveries
therefore arrive in order unless a test asks for disorder (`script_lifecycle`), which keeps
tests deterministic. `wait_idle()` waits for every such task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from service.simulator import errors, lifecycle
from service.simulator.calllog import CallArrival, CallLog, PackageKey
from service.simulator.config import SimulatorConfig
from service.simulator.lifecycle import JsonDict
from service.simulator.ratelimit import SlidingWindow
from service.simulator.records import (
    OPERATIONS,
    CallRecord,
    DeliveryRecord,
    LifecycleOptions,
    Operation,
    Script,
    Webhook,
    script_defaults,
)
from service.simulator.signing import SigningKeys

log = structlog.stdlib.get_logger(__name__)

WEBHOOK_EVENTS = frozenset(
    {
        "batch",
        "carrier_connected",
        "order_source_refresh_complete",
        "rate",
        "report_complete",
        "sales_orders_imported",
        "track",
    }
)


@dataclasses.dataclass
class Package:
    carrier_code: str
    tracking_number: str
    carrier_id: str | None
    steps: list[JsonDict]
    """`tracking_information` after each step of its life."""
    reached: int = 0
    """How many steps have happened."""
    task: asyncio.Task[None] | None = None
    """The task living the package's life while it is tracked."""

    @property
    def finished(self) -> bool:
        return self.reached >= len(self.steps)

    @property
    def information(self) -> JsonDict:
        if self.reached == 0:
            return lifecycle.unknown_tracking_information(self.tracking_number)
        return self.steps[self.reached - 1]

    def to_json(self) -> dict[str, Any]:
        return {
            "carrier_code": self.carrier_code,
            "tracking_number": self.tracking_number,
            "carrier_id": self.carrier_id,
            "status_code": self.information["status_code"],
            "steps_reached": self.reached,
            "steps": len(self.steps),
            "tracking": self.task is not None,
        }


class Simulator:
    """ShipEngine's tracking API and `track` webhooks, with knobs for tests."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.keys = SigningKeys()
        self._call_log = CallLog()
        self._rate_window = SlidingWindow()
        self.deliveries: list[DeliveryRecord] = []
        self._webhooks: dict[str, Webhook] = {}
        self._webhook_ids = itertools.count(10_000_001)
        self._packages: dict[tuple[str, str], Package] = {}
        self._scripts: list[Script] = []
        self._lifecycles: dict[str, LifecycleOptions] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        # Set, then replaced, on every configure(): wakes packages waiting out the old pace.
        self._config_changed = asyncio.Event()

    # -- runtime settings ------------------------------------------------------------------

    def configure(
        self,
        *,
        pace_s: float | None = None,
        latency_s: float | None = None,
        delivery_retry_s: float | None = None,
        delivery_attempts: int | None = None,
        rate_limit_per_minute: int | None = None,
        rate_limit_window_s: float | None = None,
    ) -> SimulatorConfig:
        """Change settings at runtime; a package waiting for its next step sees a new pace now.

        None leaves a setting as it is; `rate_limit_per_minute=0` removes the rate limit.
        """
        current = self.config
        if delivery_attempts is not None and delivery_attempts < 1:
            raise ValueError("delivery_attempts must be 1 or more")
        if rate_limit_per_minute is not None and rate_limit_per_minute < 0:
            raise ValueError("rate_limit_per_minute must be zero (no limit) or more")
        per_minute = (
            current.rate_limit_per_minute
            if rate_limit_per_minute is None
            else rate_limit_per_minute or None
        )
        # replace() runs the config's own checks: a limit must let a call through per window.
        self.config = dataclasses.replace(
            current,
            pace_s=_at_least_zero("pace_s", pace_s, current.pace_s),
            latency_s=_at_least_zero("latency_s", latency_s, current.latency_s),
            delivery_retry_s=_at_least_zero(
                "delivery_retry_s", delivery_retry_s, current.delivery_retry_s
            ),
            delivery_attempts=delivery_attempts or current.delivery_attempts,
            rate_limit_per_minute=per_minute,
            rate_limit_window_s=(
                current.rate_limit_window_s if rate_limit_window_s is None else rate_limit_window_s
            ),
        )
        if per_minute is None:
            # Calls made without a limit do not count once one is set: a test that sets a
            # limit gets the whole window, whatever it called before.
            self._rate_window.clear()
        self._config_changed.set()
        self._config_changed = asyncio.Event()
        return self.config

    # -- the call log, calls in flight and the rate limit ----------------------------------

    @property
    def calls(self) -> list[CallRecord]:
        """Every /v1 call answered, in the order answered; read it, do not change it."""
        return self._call_log.records

    @property
    def in_flight(self) -> int:
        """/v1 calls arrived and not answered yet, latency and scripted delays included."""
        return self._call_log.in_flight

    @property
    def rate_limited_calls(self) -> int:
        """Calls answered 429 by the enforced rate limit (scripted 429s not included)."""
        return self._call_log.rate_limited

    def call_arrived(self, method: str, path: str, query: dict[str, str]) -> CallArrival:
        """A /v1 call is in flight from now until `call_answered`."""
        return self._call_log.arrive(method, path, query)

    def call_answered(
        self, arrival: CallArrival, http_status: int, *, rate_limited: bool = False
    ) -> CallRecord:
        """The call leaves the in-flight count and enters `calls`."""
        return self._call_log.answer(arrival, http_status, rate_limited=rate_limited)

    async def wait_for_in_flight(self, n: int) -> None:
        """Return once at least `n` /v1 calls are in flight at the same moment."""
        await self._call_log.wait_for_in_flight(n)

    async def wait_for_calls(self, n: int, path: str | None = None) -> None:
        """Return once at least `n` /v1 calls (to `path`, if given) have been answered."""
        await self._call_log.wait_for_calls(n, path)

    def max_concurrent_per_package(self) -> dict[PackageKey, int]:
        """For each (carrier_code, tracking_number) of a start or stop call, the most calls of
        that package that were in flight at once (since the last reset)."""
        return self._call_log.max_concurrent_per_package()

    def admit_call(self) -> int | None:
        """Count an authenticated call against the rate limit; when over it, the seconds of
        `Retry-After` instead (the call is refused and does not count)."""
        per_minute = self.config.rate_limit_per_minute
        if per_minute is None:
            return None
        return self._rate_window.admit(per_minute, self.config.rate_limit_window_s)

    # -- scripting -------------------------------------------------------------------------

    def script(
        self,
        tracking_number: str,
        *,
        operation: Operation = "start",
        status: int = 400,
        error_code: str | None = None,
        error_type: str | None = None,
        error_source: str | None = None,
        message: str | None = None,
        retry_after_s: int | None = None,
        delay_s: float = 0.0,
        times: int | None = None,
    ) -> Script:
        """Answer the next `times` matching calls (None: all) with `status`, after `delay_s`.

        Error fields left None take what ShipEngine sends with that status: 429 is the exact
        rate-limit error, 5xx `system`/`unspecified`, others a carrier `invalid_identifier`.
        A 2xx status makes the call succeed normally, only `delay_s` later.
        """
        _check_script(operation, status, delay_s, times, retry_after_s)
        source, kind, code, text = script_defaults(status, tracking_number)
        script = Script(
            tracking_number=tracking_number,
            operation=operation,
            status=status,
            error_source=error_source or source,
            error_type=error_type or kind,
            error_code=error_code or code,
            message=message or text,
            retry_after_s=1 if retry_after_s is None else retry_after_s,
            delay_s=delay_s,
            remaining=times,
        )
        self._scripts.append(script)
        return script

    def script_lifecycle(
        self, tracking_number: str, *, duplicate_each: bool = False, replay_older: bool = False
    ) -> LifecycleOptions:
        """Disorder in the deliveries of one package; read at each step, so it may change."""
        options = LifecycleOptions(duplicate_each=duplicate_each, replay_older=replay_older)
        self._lifecycles[tracking_number] = options
        return options

    def take_script(self, tracking_number: str, operation: Operation) -> Script | None:
        """The first script matching the call, counting this use of it."""
        for script in self._scripts:
            if script.tracking_number == tracking_number and script.operation == operation:
                if script.remaining is not None:
                    script.remaining -= 1
                    if script.remaining == 0:
                        self._scripts.remove(script)
                return script
        return None

    @property
    def scripts(self) -> list[Script]:
        return list(self._scripts)

    # -- webhook registrations -------------------------------------------------------------

    @property
    def webhooks(self) -> list[Webhook]:
        return list(self._webhooks.values())

    def get_webhook(self, webhook_id: str) -> Webhook:
        webhook = self._webhooks.get(webhook_id)
        if webhook is None:
            raise errors.not_found(f"Webhook '{webhook_id}' was not found.")
        return webhook

    def create_webhook(
        self,
        event: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        name: str | None = None,
    ) -> Webhook:
        """Register `url` for `event`; one per event, as ShipEngine allows (else 409)."""
        if event not in WEBHOOK_EVENTS:
            raise errors.invalid_field("event", f"'{event}' is not a webhook event.")
        if any(webhook.event == event for webhook in self._webhooks.values()):
            raise errors.webhook_conflict(event)
        webhook_id = f"se-{next(self._webhook_ids)}"
        webhook = Webhook(webhook_id, event, url, tuple(headers), name)
        self._webhooks[webhook_id] = webhook
        return webhook

    def update_webhook(
        self,
        webhook_id: str,
        *,
        url: str | None = None,
        headers: Iterable[tuple[str, str]] | None = None,
    ) -> Webhook:
        webhook = self.get_webhook(webhook_id)
        if url is not None:
            webhook = dataclasses.replace(webhook, url=url)
        if headers is not None:
            webhook = dataclasses.replace(webhook, headers=tuple(headers))
        self._webhooks[webhook_id] = webhook
        return webhook

    def delete_webhook(self, webhook_id: str) -> None:
        self.get_webhook(webhook_id)
        del self._webhooks[webhook_id]

    def _track_webhook(self) -> Webhook | None:
        return next((w for w in self._webhooks.values() if w.event == "track"), None)

    # -- tracking --------------------------------------------------------------------------

    @property
    def packages(self) -> list[Package]:
        return list(self._packages.values())

    def package(self, carrier_code: str, tracking_number: str) -> Package | None:
        return self._packages.get((carrier_code, tracking_number))

    def tracking_information(self, carrier_code: str, tracking_number: str) -> JsonDict:
        package = self.package(carrier_code, tracking_number)
        if package is None:
            return lifecycle.unknown_tracking_information(tracking_number)
        return package.information

    def start_tracking(
        self, carrier_code: str, tracking_number: str, carrier_id: str | None = None
    ) -> Package:
        """Idempotent: a tracked package goes on living; a stopped one resumes its life."""
        key = (carrier_code, tracking_number)
        package = self._packages.get(key)
        if package is None:
            steps = lifecycle.plan_life(tracking_number, carrier_code, datetime.now(UTC))
            package = Package(carrier_code, tracking_number, carrier_id, steps)
            self._packages[key] = package
        if package.task is None and not package.finished:
            package.task = self._spawn(self._live(package))
        return package

    async def stop_tracking(self, carrier_code: str, tracking_number: str) -> None:
        """No delivery of the package starts after this returns."""
        package = self.package(carrier_code, tracking_number)
        if package is None or package.task is None:
            return
        task, package.task = package.task, None
        task.cancel()
        await asyncio.wait({task})

    async def _live(self, package: Package) -> None:
        try:
            while not package.finished:
                await self._wait_pace()
                package.reached += 1
                await self._send_step(package, package.reached - 1)
        finally:
            # A stop followed by a start may already have given the package a new task.
            if package.task is asyncio.current_task():
                package.task = None

    async def _wait_pace(self) -> None:
        """Wait `pace_s` from now, re-reading it whenever the configuration changes."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(0)  # pace 0 still lets other tasks run between steps
        while (remaining := started + self.config.pace_s - loop.time()) > 0:
            changed = self._config_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def _send_step(self, package: Package, index: int) -> None:
        options = self._lifecycles.get(package.tracking_number, LifecycleOptions())
        for _ in range(2 if options.duplicate_each else 1):
            await self._deliver(package, index)
        if options.replay_older and index > 0:
            await self._deliver(package, index - 1)

    # -- deliveries ------------------------------------------------------------------------

    def bind_session(self, session: aiohttp.ClientSession | None) -> None:
        """The client session deliveries go through; the app's cleanup context owns it."""
        self._session = session

    async def _deliver(self, package: Package, index: int) -> None:
        information = package.steps[index]
        payload = lifecycle.webhook_body(self.config.public_url, package.carrier_code, information)
        # Serialised once: every attempt sends, and signs, these exact bytes.
        body = json.dumps(payload).encode()
        status_code = str(information["status_code"])
        attempts = self.config.delivery_attempts
        for attempt in range(1, attempts + 1):
            record = await self._attempt(package.tracking_number, status_code, attempt, body)
            if record.url is None or record.delivered:
                return
            if attempt < attempts:
                await asyncio.sleep(self.config.delivery_retry_s)
        log.warning(
            "simulator_delivery_gave_up",
            tracking_number=package.tracking_number,
            status_code=status_code,
            attempts=attempts,
        )

    async def _attempt(
        self, tracking_number: str, status_code: str, attempt: int, body: bytes
    ) -> DeliveryRecord:
        """One attempt, recorded in `deliveries` even when a stop cuts it short."""
        at = time.time()
        # The registration is read at send time: it may change between two attempts.
        webhook = self._track_webhook()
        if webhook is None:
            record = DeliveryRecord(
                at=at,
                url=None,
                tracking_number=tracking_number,
                status_code=status_code,
                attempt=attempt,
                http_status=None,
                error="no track webhook registered",
                body=body,
                headers={},
            )
            self.deliveries.append(record)
            return record
        ours = {
            "Content-Type": "application/json",
            "User-Agent": "ShipEngine/v1",
            **self.keys.headers(body),
        }
        # Custom headers come first and never replace ours, whatever their case.
        taken = {name.lower() for name in ours}
        custom = {name: value for name, value in webhook.headers if name.lower() not in taken}
        headers = {**custom, **ours}
        record = DeliveryRecord(
            at=at,
            url=webhook.url,
            tracking_number=tracking_number,
            status_code=status_code,
            attempt=attempt,
            http_status=None,
            error="cancelled: tracking stopped or simulator shut down",
            body=body,
            headers=headers,
        )
        try:
            http_status, error = await self._post(webhook.url, body, headers)
        except asyncio.CancelledError:
            # A stop cut the attempt short; the receiver may or may not have seen it.
            self.deliveries.append(record)
            raise
        record = dataclasses.replace(record, http_status=http_status, error=error)
        self.deliveries.append(record)
        return record

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int | None, str | None]:
        if self._session is None:
            raise RuntimeError("the simulator delivers only while its app is running")
        timeout = aiohttp.ClientTimeout(total=self.config.delivery_timeout_s)
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=timeout
            ) as response:
                await response.read()
                return response.status, None
        except (aiohttp.ClientError, TimeoutError) as error:
            return None, f"{type(error).__name__}: {error}"

    # -- background tasks ------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("simulator_task_failed", exc_info=error)

    async def wait_idle(self) -> None:
        """Return once every package's life and delivery has finished, later ones included.

        API calls still being answered (a scripted `delay_s`) are not waited for.
        """
        while pending := {task for task in self._tasks if not task.done()}:
            await asyncio.wait(pending)

    async def _cancel_all(self) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def reset(self) -> None:
        """Forget scripts, calls, deliveries, packages and the rate window's calls.

        Webhook registrations and settings stay; calls still in flight stay counted.
        """
        await self._cancel_all()
        self._scripts.clear()
        self._lifecycles.clear()
        self._call_log.clear()
        self._rate_window.clear()
        self.deliveries.clear()
        self._packages.clear()

    async def shutdown(self) -> None:
        await self._cancel_all()


def _at_least_zero(name: str, value: float | None, current: float) -> float:
    if value is None:
        return current
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number, zero or more")
    return value


def _check_script(
    operation: str, status: int, delay_s: float, times: int | None, retry_after_s: int | None
) -> None:
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    if not 200 <= status <= 599:
        raise ValueError(f"status must be an HTTP status from 200 to 599, got {status}")
    if delay_s < 0:
        raise ValueError("delay_s must be zero or more")
    if times is not None and times < 1:
        raise ValueError("times must be 1 or more, or None for every call")
    if retry_after_s is not None and retry_after_s < 0:
        raise ValueError("retry_after_s must be zero or more")
