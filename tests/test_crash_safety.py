"""kill -9 of the API loses nothing it acknowledged.

The API answers a subscription or a webhook delivery only once it is committed. Here the real
API runs as its own process; concurrent clients keep subscribing and sending signed deliveries
to it, and once enough answers have come back, while more requests are still on their way, the
process is killed with SIGKILL: no shutdown of any kind. Every acknowledged subscription and
delivery must then be in PostgreSQL, as it was answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import RunningSimulator, bearer
from tests.payloads import track_body
from tests.processes import ApiProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SUBSCRIBERS = 6
SENDERS = 6
REQUESTS_PER_CLIENT = 300  # each client's bound; the kill comes long before
ACKNOWLEDGED_BEFORE_THE_KILL = 150
MIN_OF_EACH_KIND = 30
STEPS = 2  # events in each delivery


@dataclasses.dataclass(frozen=True)
class Answer:
    """A delivery's package and what the API answered for it."""

    number: str
    outcome: str
    subscription_id: uuid.UUID | None


@dataclasses.dataclass
class Acknowledged:
    """What the API answered 2xx, and what the clients saw of the kill."""

    kill: Callable[[], None]  # called as the answer that makes enough is read
    subscriptions: dict[str, uuid.UUID] = dataclasses.field(default_factory=dict)
    deliveries: dict[int, Answer] = dataclasses.field(default_factory=dict)
    # Subscribed packages no delivery has been sent for yet: the next ones to send.
    undelivered: list[str] = dataclasses.field(default_factory=list)
    in_flight: int = 0
    in_flight_at_the_kill: int | None = None
    cut_off: int = 0  # requests that got no answer: the API was gone
    killed: bool = False

    def count(self) -> None:
        subscriptions, deliveries = len(self.subscriptions), len(self.deliveries)
        enough = (
            subscriptions + deliveries >= ACKNOWLEDGED_BEFORE_THE_KILL
            and min(subscriptions, deliveries) >= MIN_OF_EACH_KIND
        )
        if enough and not self.killed:
            self.in_flight_at_the_kill = self.in_flight
            self.kill()
            self.killed = True


async def subscriber(
    session: aiohttp.ClientSession, url: str, token: str, client: int, seen: Acknowledged
) -> None:
    """Subscribes new packages one after another until the API is gone."""
    for n in range(REQUESTS_PER_CLIENT):
        number = f"CRASH-S{client}-{n}"
        body = {"carrier_code": "ups", "tracking_number": number}
        seen.in_flight += 1
        try:
            async with session.post(
                f"{url}/v1/subscriptions", json=body, headers=bearer(token)
            ) as answer:
                assert answer.status == 202, await answer.text()
                document = await answer.json()
        except aiohttp.ClientError:
            seen.cut_off += 1
            return
        finally:
            seen.in_flight -= 1
        seen.subscriptions[number] = uuid.UUID(document["id"])
        seen.undelivered.append(number)
        seen.count()


async def sender(
    session: aiohttp.ClientSession,
    url: str,
    shipengine: RunningSimulator,
    client: int,
    seen: Acknowledged,
) -> None:
    """Sends signed deliveries until the API is gone: in turn for a package subscribed (and
    acknowledged) already, and for one nobody subscribes."""
    for n in range(REQUESTS_PER_CLIENT):
        subscribed = n % 2 == 0 and bool(seen.undelivered)
        number = seen.undelivered.pop() if subscribed else f"CRASH-D{client}-{n}"
        raw = json.dumps(track_body(number, "ups", STEPS)).encode()
        headers = {"Content-Type": "application/json", **shipengine.simulator.keys.headers(raw)}
        seen.in_flight += 1
        try:
            async with session.post(
                f"{url}/v1/webhooks/shipengine", data=raw, headers=headers
            ) as answer:
                assert answer.status == 200, await answer.text()
                document = await answer.json()
        except aiohttp.ClientError:
            seen.cut_off += 1
            return
        finally:
            seen.in_flight -= 1
        subscription_id = document["subscription_id"]
        seen.deliveries[document["delivery_id"]] = Answer(
            number, document["outcome"], uuid.UUID(subscription_id) if subscription_id else None
        )
        seen.count()


async def stored_subscriptions(
    engine: AsyncEngine, ids: list[uuid.UUID]
) -> dict[uuid.UUID, tuple[str, str, bool]]:
    """By id: tracking number, state, and whether its start call is due."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT id, tracking_number, state, next_attempt_at IS NOT NULL AS due "
                "FROM subscriptions WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )
        return {row.id: (row.tracking_number, row.state, row.due) for row in rows}


async def stored_deliveries(
    engine: AsyncEngine, ids: list[int]
) -> dict[int, tuple[str, str, uuid.UUID | None, int]]:
    """By id: tracking number, outcome, subscription, and the events its subscription holds."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT d.id, d.tracking_number, d.outcome, d.subscription_id, "
                "(SELECT count(*) FROM tracking_events AS e "
                " WHERE e.subscription_id = d.subscription_id) AS events "
                "FROM webhook_deliveries AS d WHERE d.id = ANY(:ids)"
            ),
            {"ids": ids},
        )
        return {
            row.id: (row.tracking_number, row.outcome, row.subscription_id, row.events)
            for row in rows
        }


async def test_after_kill_9_every_acknowledged_subscription_and_delivery_is_stored(
    engine: AsyncEngine,
    database_url: str,
    token: str,
    shipengine: RunningSimulator,
    tmp_path: Path,
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "SHIPENGINE_API_KEY": "TEST_simulator",
        "SHIPENGINE_BASE_URL": shipengine.url,
        "LOG_LEVEL": "WARNING",
    }
    api = await ApiProcess.start(tmp_path / "api.log", env)
    seen = Acknowledged(kill=api.process.kill)  # SIGKILL
    try:
        async with aiohttp.ClientSession() as session:
            clients = [
                *(subscriber(session, api.url, token, n, seen) for n in range(SUBSCRIBERS)),
                *(sender(session, api.url, shipengine, n, seen) for n in range(SENDERS)),
            ]
            async with asyncio.timeout(30):
                await asyncio.gather(*clients)
        assert seen.killed
        await api.process.wait()
    finally:
        await api.ensure_stopped()
    # The kill came while requests were on their way, and every client had one cut off.
    assert seen.in_flight_at_the_kill
    assert seen.cut_off == SUBSCRIBERS + SENDERS

    subscriptions = await stored_subscriptions(engine, list(seen.subscriptions.values()))
    assert subscriptions == {
        subscription_id: (number, "pending", True)  # its start waits for a dispatcher
        for number, subscription_id in seen.subscriptions.items()
    }
    # A delivery for a package whose subscription was acknowledged is filed against it; one
    # for a package nobody subscribed to is an orphan. So it is stored, and so it was answered.
    expected = {
        delivery_id: (
            Answer(answer.number, "filed", seen.subscriptions[answer.number])
            if answer.number in seen.subscriptions
            else Answer(answer.number, "orphan", None)
        )
        for delivery_id, answer in seen.deliveries.items()
    }
    deliveries = await stored_deliveries(engine, list(seen.deliveries))
    assert deliveries == {
        delivery_id: (
            (answer.number, answer.outcome, answer.subscription_id, STEPS)
            if answer.outcome == "filed"
            else (answer.number, answer.outcome, None, 0)
        )
        for delivery_id, answer in expected.items()
    }
    assert seen.deliveries == expected
