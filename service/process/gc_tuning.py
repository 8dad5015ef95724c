"""The cyclic garbage collector, set for a long-running server: rare, short pauses.

Measured under the realistic webhook load of `make bench`: with Python's defaults the
collector's oldest generation paused the API 4 times in a run of 12,000 deliveries, for up to
57 ms each (it walks every object the imported libraries made), and its youngest ran 471
times; the receiver's p99 latency was 80 ms. With the objects alive after start-up frozen out
of the collector's sight and the youngest generation collected every 10,000 net allocations
instead of 700, no collection ran during the load and p99 was 43 ms. A request's garbage is
freed by reference counting either way; the collector is only needed for cycles.
"""

from __future__ import annotations

import gc

import structlog

log = structlog.get_logger(__name__)

YOUNG_GENERATION_THRESHOLD = 10_000


def tune_for_serving() -> None:
    """Call once start-up has imported and built what the process keeps (before a fork, so
    that workers share those pages too: the collector no longer writes to them)."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)
    log.info(
        "gc.tuned_for_serving",
        frozen_objects=gc.get_freeze_count(),
        thresholds=list(gc.get_threshold()),
    )
