"""The /v1 call log: calls answered, calls in flight, and ways for tests to wait on them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping

from service.simulator.records import CallRecord

PackageKey = tuple[str, str]
"""(carrier_code, tracking_number)."""

# The calls that act on one package; a dispatcher must never overlap two of them.
_PACKAGE_PATHS = frozenset({"/v1/tracking/start", "/v1/tracking/stop"})


@dataclasses.dataclass(frozen=True)
class CallArrival:
    """A /v1 call not answered yet; `CallLog.answer` turns it into its record."""

    at: float
    """`time.time()` when the call arrived."""
    method: str
    path: str
    query: dict[str, str]
    package: PackageKey | None
    """The package of a start or stop call; None for other calls."""


def package_of(path: str, query: Mapping[str, str]) -> PackageKey | None:
    """The package a start or stop call acts on, read as the endpoints read it."""
    if path not in _PACKAGE_PATHS:
        return None
    carrier_code = query.get("carrier_code", "").strip()
    tracking_number = query.get("tracking_number", "").strip()
    if not carrier_code or not tracking_number:
        return None
    return (carrier_code, tracking_number)


@dataclasses.dataclass(eq=False)
class _Waiter:
    ready: Callable[[], bool]
    future: asyncio.Future[None]


class CallLog:
    """Counts every /v1 call from its arrival to its answer, and records it when answered."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self._answered_per_path: collections.Counter[str] = collections.Counter()
        self._in_flight = 0
        self._package_in_flight: collections.Counter[PackageKey] = collections.Counter()
        self._package_peak: dict[PackageKey, int] = {}
        self._waiters: list[_Waiter] = []

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def rate_limited(self) -> int:
        """How many recorded calls the enforced rate limit refused."""
        return sum(1 for record in self.records if record.rate_limited)

    def arrive(self, method: str, path: str, query: dict[str, str]) -> CallArrival:
        arrival = CallArrival(time.time(), method, path, query, package_of(path, query))
        self._in_flight += 1
        if arrival.package is not None:
            self._package_in_flight[arrival.package] += 1
            now = self._package_in_flight[arrival.package]
            self._package_peak[arrival.package] = max(
                self._package_peak.get(arrival.package, 0), now
            )
        self._wake()
        return arrival

    def answer(self, arrival: CallArrival, http_status: int, *, rate_limited: bool) -> CallRecord:
        record = CallRecord(
            at=arrival.at,
            method=arrival.method,
            path=arrival.path,
            query=arrival.query,
            http_status=http_status,
            ended_at=time.time(),
            rate_limited=rate_limited,
        )
        self._in_flight -= 1
        if arrival.package is not None:
            self._package_in_flight[arrival.package] -= 1
            if self._package_in_flight[arrival.package] <= 0:
                del self._package_in_flight[arrival.package]
        self.records.append(record)
        self._answered_per_path[record.path] += 1
        self._wake()
        return record

    def max_concurrent_per_package(self) -> dict[PackageKey, int]:
        return dict(self._package_peak)

    def answered(self, path: str | None = None) -> int:
        if path is None:
            return len(self.records)
        return self._answered_per_path[path]

    async def wait_for_in_flight(self, n: int) -> None:
        await self._wait_until(lambda: self._in_flight >= n)

    async def wait_for_calls(self, n: int, path: str | None = None) -> None:
        await self._wait_until(lambda: self.answered(path) >= n)

    def clear(self) -> None:
        """Forget answered calls; calls still in flight stay counted, as they are real."""
        self.records.clear()
        self._answered_per_path.clear()
        self._package_peak = dict(self._package_in_flight)

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        if ready():
            return
        waiter = _Waiter(ready, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter.future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        # Not an asyncio.Condition: its notify needs the lock, which these synchronous
        # bookkeeping calls cannot take. And each condition is checked right at the change,
        # not when the waiter next runs, so even a brief overlap of two calls is caught.
        for waiter in list(self._waiters):
            if not waiter.future.done() and waiter.ready():
                waiter.future.set_result(None)
