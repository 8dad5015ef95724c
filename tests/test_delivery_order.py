"""Property: however a package's deliveries arrive (any order, any repeats, any grouping into
batches committed together), the subscription ends with the same status and the same history
as when they arrive in order, one by one."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.deliveries import Incoming, store_and_file
from service.db.driver import driver_connection
from service.db.subscriptions import (
    NewSubscription,
    create_subscription,
    get_subscription,
    list_events,
    list_status_changes,
)
from service.domain.tracking import RearmPolicy
from tests.payloads import HISTORY, event, track_body

REARM = RearmPolicy(max_rearms=0, delay_s=60)
# A package that goes through an exception and back, with a 300-event history at the end.
STEPS = 6
LONG_TAIL = [
    event(f"2026-11-23T{hour:02}:{minute:02}:00Z", "IT", f"Scan {hour}:{minute}")
    for hour, minute in itertools.product(range(5), range(60))
][:296]
_numbers = itertools.count()


def delivery(number: str, step: int) -> dict[str, Any]:
    """The package's state after `step` events; the last step carries 300 events."""
    body = track_body(number, "ups", min(step, len(HISTORY)))
    if step == STEPS:
        body["data"]["events"] = list(reversed(HISTORY + LONG_TAIL))
        body["data"]["status_code"] = "DE"
    if step == 2:  # an exception, later resolved (EX is followed by IT)
        body["data"]["status_code"] = "EX"
        body["data"]["events"].insert(0, event("2026-11-21T04:00:00Z", "EX", "Held"))
    return body


async def file_all(
    engine: AsyncEngine, number: str, order: list[int], batch_sizes: list[int] | None = None
) -> dict[str, Any]:
    """File the steps in `order`, one per transaction, or in batches of the sizes given."""
    async with engine.begin() as conn:
        row, _ = await create_subscription(conn, NewSubscription("ups", number))
    pending = [incoming(number, step) for step in order]
    sizes = iter(batch_sizes or [])
    while pending:
        size = next(sizes, 1)
        batch, pending = pending[:size], pending[size:]
        async with engine.begin() as conn:
            await store_and_file(await driver_connection(conn), batch, REARM)
    async with engine.connect() as conn:
        current = await get_subscription(conn, row["id"])
        events = await list_events(conn, row["id"])
        changes = await list_status_changes(conn, row["id"])
    assert current is not None
    return {
        "status": (current["status_code"], current["last_event_at"]),
        "events": sorted((e["occurred_at"], e["description"]) for e in events),
        "final_change": changes[0]["status_code"],
    }


def incoming(number: str, step: int) -> Incoming:
    payload = delivery(number, step)
    return Incoming.read(payload, json.dumps(payload).encode(), headers={}, verification="verified")


# Every step at least once, some repeated, in any order.
ORDERS = (
    st.lists(st.integers(min_value=1, max_value=STEPS), min_size=1, max_size=12)
    .map(lambda extra: [*extra, *range(1, STEPS + 1)])
    .flatmap(st.permutations)
)
EXAMPLES = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@EXAMPLES
@given(order=ORDERS)
async def test_any_order_and_repetition_ends_as_the_ordered_sequence(
    engine: AsyncEngine, order: list[int]
) -> None:
    expected = await file_all(engine, f"ORDERED{next(_numbers)}", list(range(1, STEPS + 1)))
    assert await file_all(engine, f"SHUFFLED{next(_numbers)}", order) == expected


@EXAMPLES
@given(
    order=ORDERS,
    batch_sizes=st.lists(st.integers(min_value=1, max_value=18), min_size=1, max_size=6),
)
async def test_any_grouping_into_batches_ends_as_the_ordered_sequence(
    engine: AsyncEngine, order: list[int], batch_sizes: list[int]
) -> None:
    expected = await file_all(engine, f"ORDERED{next(_numbers)}", list(range(1, STEPS + 1)))
    batched = await file_all(engine, f"BATCHED{next(_numbers)}", order, batch_sizes)
    assert batched == expected
