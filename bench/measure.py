"""Small statistics over event times: rates in a window, percentiles, the busiest window."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence


def rate(times: Sequence[float], start: float, end: float) -> float:
    """Events a second in [start, end); `times` sorted."""
    if end <= start:
        return 0.0
    return count(times, start, end) / (end - start)


def count(times: Sequence[float], start: float, end: float) -> int:
    """Events in [start, end); `times` sorted."""
    return bisect.bisect_left(times, end) - bisect.bisect_left(times, start)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1), interpolated between the closest ranks, as numpy does by default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def busiest_window(times: Sequence[float], window_s: float) -> int:
    """The most events inside any window of `window_s` seconds (t - first < window_s), as a
    sliding-window rate limiter counts them; `times` sorted."""
    most = 0
    first = 0
    for last, at in enumerate(times):
        while at - times[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def interpolate(samples: Sequence[tuple[float, float]], at: float) -> float:
    """The value of a sampled, increasing counter at `at`, linear between samples."""
    if not samples:
        return math.nan
    if at <= samples[0][0]:
        return samples[0][1]
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        if t0 <= at <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (at - t0) / (t1 - t0)
    return samples[-1][1]


def mean_in_flight(spans: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Average number of (arrival, answer) spans open at once over [start, end): by Little's
    law, how many calls the caller kept in flight."""
    if end <= start:
        return math.nan
    covered = sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)
    return covered / (end - start)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """How many, the least, p50, p90, p99 and the most."""
    return {
        "n": len(values),
        "min": min(values, default=math.nan),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "max": max(values, default=math.nan),
    }
