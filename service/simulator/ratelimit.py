"""ShipEngine's rate limit: a sliding window of admitted calls, shared by every endpoint."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

# A float product such as 200 * 0.3 / 60 may land a hair under a whole number of calls.
_ROUNDING_SLACK = 1e-9


def calls_per_window(per_minute: int, window_s: float) -> int:
    """How many calls fit in one window: `per_minute` scaled to the window, rounded down."""
    return math.floor(per_minute * window_s / 60 + _ROUNDING_SLACK)


class SlidingWindow:
    """Admits at most `calls_per_window(...)` calls in any `window_s` seconds.

    Only admitted calls are remembered: a refused call does not push the client's next
    chance further away, so `Retry-After` stays the honest wait for one free slot.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        # Monotonic: a wall-clock step (NTP) must neither free nor block the window.
        self._clock = clock
        self._admitted: collections.deque[float] = collections.deque()

    def admit(self, per_minute: int, window_s: float) -> int | None:
        """Count a call now; or, when the window is full, whole seconds until a slot frees."""
        now = self._clock()
        # A call at t is inside the window while now - t < window_s.
        while self._admitted and now - self._admitted[0] >= window_s:
            self._admitted.popleft()
        capacity = calls_per_window(per_minute, window_s)
        if len(self._admitted) < capacity:
            self._admitted.append(now)
            return None
        # Normally the oldest call; after the limit is lowered at runtime, the window may hold
        # more than `capacity` calls, and a slot frees only once the surplus has left too.
        freeing = self._admitted[len(self._admitted) - capacity]
        wait_s = freeing + window_s - now
        # Rounded up, so a client that waits exactly Retry-After finds a free slot.
        return max(1, math.ceil(wait_s))

    def clear(self) -> None:
        self._admitted.clear()
