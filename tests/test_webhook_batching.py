"""Group commit: deliveries that arrive together are committed together, each answered as if
it had come alone, and a delivery that cannot be stored fails alone."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.deliveries import FiledDelivery, Incoming
from service.db.subscriptions import NewSubscription, create_subscription
from service.domain.tracking import RearmPolicy, content_digest, parse_track_payload
from service.metrics import Metrics
from service.webhooks.batching import DeliveryBatcher
from tests.payloads import track_body

REARM = RearmPolicy(max_rearms=1, delay_s=60)


def incoming(number: str, step: int) -> Incoming:
    payload = track_body(number, "ups", step)
    update = parse_track_payload(payload)
    return Incoming(
        headers={"x-shipengine-timestamp": "1"},
        body=json.dumps(payload).encode(),
        update=update,
        content_sha256=content_digest(payload, update),
        verification="verified",
    )


async def subscribe(engine: AsyncEngine, *numbers: str) -> None:
    async with engine.begin() as conn:
        for number in numbers:
            await create_subscription(conn, NewSubscription("ups", number))


async def queued(
    batcher: DeliveryBatcher, deliveries: list[Incoming]
) -> list[asyncio.Task[FiledDelivery]]:
    """The deliveries waiting in the batcher's queue, before any writer runs."""
    tasks = [asyncio.create_task(batcher.file(item)) for item in deliveries]
    await asyncio.sleep(0)  # one turn of the loop: each task queues in its first step
    assert batcher.waiting == len(tasks)
    return tasks


def batches(metrics: Metrics) -> tuple[float, float]:
    """How many batches were committed, holding how many deliveries in all."""
    count = metrics.registry.get_sample_value("tracking_webhook_batch_size_count")
    total = metrics.registry.get_sample_value("tracking_webhook_batch_size_sum")
    return count or 0.0, total or 0.0


async def outcomes(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT tracking_number, outcome FROM webhook_deliveries ORDER BY id")
        )
        return [(row.tracking_number, row.outcome) for row in rows]


async def test_deliveries_queued_together_share_one_commit_and_are_answered_each(
    engine: AsyncEngine,
) -> None:
    await subscribe(engine, "1ZA", "1ZB")
    metrics = Metrics()
    batcher = DeliveryBatcher(engine, REARM, metrics)
    sent = [incoming("1ZA", 1), incoming("1ZB", 2), incoming("1ZA", 1), incoming("1ZC", 1)]
    tasks = await queued(batcher, sent)
    batcher.start()
    answers = await asyncio.gather(*tasks)
    await batcher.close()

    assert batches(metrics) == (1.0, 4.0)
    assert [a.outcome for a in answers] == ["filed", "filed", "duplicate", "orphan"]
    assert answers[2].subscription_id == answers[0].subscription_id
    assert [a.new_events for a in answers] == [1, 2, 0, 0]
    assert await outcomes(engine) == [
        ("1ZA", "filed"),
        ("1ZB", "filed"),
        ("1ZC", "orphan"),
        ("1ZA", "duplicate"),
    ]


async def test_a_delivery_that_cannot_be_stored_fails_alone(engine: AsyncEngine) -> None:
    await subscribe(engine, "1ZA", "1ZB")
    batcher = DeliveryBatcher(engine, REARM, Metrics())
    # PostgreSQL's jsonb refuses a NUL character: this one delivery cannot be stored.
    unstorable = dataclasses.replace(incoming("1ZB", 1), headers={"x-bad": "\u0000"})
    tasks = await queued(batcher, [incoming("1ZA", 1), unstorable, incoming("1ZA", 2)])
    batcher.start()
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    await batcher.close()

    assert [getattr(a, "outcome", None) for a in answers] == ["filed", None, "filed"]
    assert isinstance(answers[1], Exception)
    assert await outcomes(engine) == [("1ZA", "filed"), ("1ZA", "filed")]


async def test_closing_commits_what_is_queued_first(engine: AsyncEngine) -> None:
    await subscribe(engine, "1ZA")
    batcher = DeliveryBatcher(engine, REARM, Metrics())
    tasks = await queued(batcher, [incoming("1ZA", step) for step in (1, 2, 3)])
    batcher.start()
    await batcher.close()

    assert [task.result().outcome for task in tasks] == ["filed"] * 3
    with pytest.raises(RuntimeError):
        await batcher.file(incoming("1ZA", 4))
