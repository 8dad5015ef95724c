"""Push notifications (issue 17): each change, signed, to the endpoints that want it, against a
real consumer on loopback. Signatures are checked with the `standardwebhooks` package, not
with our own code. The sender's clock is the test's, so a day passes in a statement."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.db import changes as feed
from service.db import notify
from service.db.tables import notify_attempts, notify_endpoints, notify_lanes, notify_messages
from service.db.tokens import create_token
from service.dispatcher.runtime import build_notifier, render_change
from service.domain.access import Scope
from service.domain.changes import ChangeType
from service.domain.endpoints import new_secret
from service.domain.notifications import (
    ATTEMPTS,
    RETRY_SCHEDULE_S,
    Answer,
    NotifyOutcome,
    retry_after_s,
)
from service.notify import sending
from service.notify.local_consumer import verified
from service.notify.worker import READY_WAIT_MAX_S, Notifier
from service.settings import Settings
from tests.conftest import RunningSimulator, bearer
from tests.processes import DispatcherProcess
from tests.test_dashboard import log_in
from tests.waiting import eventually

Client = TestClient[web.Request, web.Application]


# -- the consumer --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    query: str

    @property
    def change(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.body)
        return found

    @property
    def subscription_id(self) -> str:
        return str(self.change["subscription_id"])


Answering = Callable[[Received], Awaitable[web.StreamResponse]]


async def accept(_: Received) -> web.StreamResponse:
    return web.json_response({"ok": True})


class Consumer:
    """A consumer's endpoint: keeps every request, answers as `answer` says."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answer: Answering = accept
        self.arrivals = asyncio.Queue[Received]()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(dict(request.headers), await request.read(), request.query_string)
        self.received.append(received)
        self.arrivals.put_nowait(received)
        return await self.answer(received)

    def of(self, subscription_id: str) -> list[int]:
        """The sequences received for one subscription, in arrival order."""
        return [r.change["sequence"] for r in self.received if r.subscription_id == subscription_id]


@pytest.fixture
async def consumer() -> AsyncIterator[Consumer]:
    found = Consumer()
    app = web.Application()
    app.router.add_post("/hooks", found.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    found.url = str(server.make_url("/hooks"))
    try:
        yield found
    finally:
        await server.close()


# -- the sender, on the test's clock ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class Middle(random.Random):
    """Jitter at its middle: the schedule exactly."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


MakeNotifier = Callable[..., Notifier]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with sending.client_session(64) as session:
        yield session


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_notifier(
    settings: Settings, engine: AsyncEngine, http: aiohttp.ClientSession, clock: Clock
) -> MakeNotifier:
    def make(**overrides: Any) -> Notifier:
        notifier = build_notifier(
            dataclasses.replace(settings, **overrides), engine, http, clock=clock
        )
        notifier._rng = Middle()
        return notifier

    return make


# -- what the tests do -----------------------------------------------------------------------


async def register(
    api: Client, url: str, headers: dict[str, str] | None = None, **body: Any
) -> dict[str, Any]:
    answer = await api.post("/v1/endpoints", json={"url": url, **body}, headers=headers)
    assert answer.status == 201, await answer.text()
    made: dict[str, Any] = await answer.json()
    return made


async def subscribe(api: Client, number: str, headers: dict[str, str] | None = None) -> str:
    answer = await api.post(
        "/v1/subscriptions",
        json={"carrier_code": "stamps_com", "tracking_number": number},
        headers=headers,
    )
    assert answer.status == 202, await answer.text()
    subscription_id: str = (await answer.json())["id"]
    return subscription_id


async def change(
    engine: AsyncEngine, *subscription_ids: str, kind: ChangeType = ChangeType.STATUS_CHANGED
) -> None:
    """A change of each subscription, committed."""
    async with engine.begin() as conn:
        await feed.note(conn, [(uuid.UUID(s), kind) for s in subscription_ids])


async def changed_packages(api: Client, engine: AsyncEngine, prefix: str, count: int) -> list[str]:
    """`count` new subscriptions (numbers `prefix` + 00, 01, ...), a change of each committed."""
    packages = [await subscribe(api, f"{prefix}{n:02}") for n in range(count)]
    await change(engine, *packages)
    return packages


async def count(engine: AsyncEngine, table: sa.Table) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


async def attempts(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(notify_attempts).order_by(notify_attempts.c.id))
        return [dict(row) for row in rows.mappings()]


async def endpoint_row(engine: AsyncEngine, endpoint_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        query = sa.select(notify_endpoints).where(notify_endpoints.c.id == uuid.UUID(endpoint_id))
        return dict((await conn.execute(query)).mappings().one())


async def one_change_to(
    api: Client, engine: AsyncEngine, consumer: Consumer, number: str, answer: Answering = accept
) -> tuple[dict[str, Any], str]:
    """An endpoint at `consumer`, which answers as `answer` says, and one change for it."""
    endpoint = await register(api, consumer.url)
    subscription_id = await subscribe(api, number)
    consumer.answer = answer
    await change(engine, subscription_id)
    return endpoint, subscription_id


def answering(status: int, **headers: str) -> Answering:
    async def answer(_: Received) -> web.StreamResponse:
        return web.Response(status=status, text="no", headers=headers)

    return answer


# -- signed, as the feed shows them -----------------------------------------------------------


async def test_a_change_arrives_as_the_feed_shows_it_signed_by_the_standard(
    api: Client, engine: AsyncEngine, consumer: Consumer, make_notifier: MakeNotifier
) -> None:
    endpoint = await register(api, consumer.url)
    subscription_id = await subscribe(api, "9400100000000000000001")
    await change(engine, subscription_id)

    assert await make_notifier().drain() == 1
    (received,) = consumer.received
    # The standard's own implementation verifies it, timestamp window included.
    assert Webhook(endpoint["secret"]).verify(received.body, received.headers) == received.change
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(received.body, received.headers)

    page = await (await api.get("/v1/changes")).text()
    assert f'"items":[{received.body.decode()}]' in page  # byte for byte as the feed shows it
    assert received.headers["webhook-id"] == received.change["id"]
    assert received.headers["Content-Type"] == "application/json"

    (attempt,) = await attempts(engine)
    assert (attempt["outcome"], attempt["status_code"], attempt["attempt"]) == ("delivered", 200, 1)
    assert attempt["response"] == '{"ok": true}'
    assert await count(engine, notify_messages) == await count(engine, notify_lanes) == 0


async def test_an_endpoint_receives_what_commits_after_it_was_registered_and_the_types_it_wants(
    api: Client, engine: AsyncEngine, consumer: Consumer, make_notifier: MakeNotifier
) -> None:
    subscription_id = await subscribe(api, "9400100000000000000002")
    await change(engine, subscription_id)  # before the endpoint: not sent
    await register(api, consumer.url, types=["tracking.eta_changed"])
    await change(engine, subscription_id)  # a type it does not want
    await change(engine, subscription_id, kind=ChangeType.ETA_CHANGED)

    assert await make_notifier().drain() == 1
    (received,) = consumer.received
    assert (received.change["type"], received.change["sequence"]) == ("tracking.eta_changed", 3)


# -- order, retries, disabling ----------------------------------------------------------------


async def test_a_subscriptions_changes_arrive_in_order_while_a_failing_one_holds_back_no_other(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    await register(api, consumer.url)
    stuck = await subscribe(api, "9400100000000000000003")
    other = await subscribe(api, "9400100000000000000004")
    refusing = {stuck}

    async def answer(received: Received) -> web.StreamResponse:
        refused = received.subscription_id in refusing
        return web.Response(status=500 if refused else 204)

    consumer.answer = answer
    for _ in range(3):
        await change(engine, stuck, other)
    notifier = make_notifier()

    await notifier.drain()
    assert consumer.of(other) == [1, 2, 3]
    assert consumer.of(stuck) == [1]  # its next wait behind it

    refusing.clear()
    clock.advance(seconds=RETRY_SCHEDULE_S[0])
    await notifier.drain()
    assert consumer.of(stuck) == [1, 1, 2, 3]
    webhook_ids = [r.headers["webhook-id"] for r in consumer.received if r.subscription_id == stuck]
    assert webhook_ids[0] == webhook_ids[1]  # a retry is the same message
    assert await count(engine, notify_lanes) == 0


async def test_a_failing_consumer_is_retried_on_the_schedule_then_disabled_and_enable_resumes(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    endpoint, subscription_id = await one_change_to(
        api, engine, consumer, "9400100000000000000005", answering(500)
    )
    notifier = make_notifier()

    await notifier.drain()
    for wait_s in RETRY_SCHEDULE_S:
        clock.advance(seconds=wait_s - 1)
        assert await notifier.drain() == 0  # not yet due
        clock.advance(seconds=1)
        assert await notifier.drain() == 1
    assert len(consumer.received) == ATTEMPTS == 8
    found = await endpoint_row(engine, endpoint["id"])
    assert found["state"] == "disabled"
    assert "8 attempts" in found["disabled_reason"]
    assert [a["outcome"] for a in await attempts(engine)] == ["failed"] * 8
    assert [a["attempt"] for a in await attempts(engine)] == list(range(1, 9))
    assert notifier.metrics.notify_endpoints_disabled._value.get() == 1

    await change(engine, subscription_id)  # while disabled: kept for later, not sent
    clock.advance(days=2)
    assert await notifier.drain() == 0

    consumer.answer = accept
    enabled = await api.post(f"/v1/endpoints/{endpoint['id']}/enable")
    assert (await enabled.json())["state"] == "enabled"
    await notifier.drain()
    assert consumer.of(subscription_id)[-2:] == [1, 2]  # where it stopped, nothing lost
    assert await count(engine, notify_messages) == 0


async def test_a_410_disables_the_endpoint_at_once(
    api: Client, engine: AsyncEngine, consumer: Consumer, make_notifier: MakeNotifier
) -> None:
    endpoint, _ = await one_change_to(
        api, engine, consumer, "9400100000000000000006", answering(410)
    )
    await make_notifier().drain()

    found = await endpoint_row(engine, endpoint["id"])
    assert (found["state"], found["disabled_reason"]) == (
        "disabled",
        "the endpoint answered 410 Gone",
    )
    shown = await (await api.get(f"/v1/endpoints/{endpoint['id']}")).json()
    assert shown["state"] == "disabled"
    assert await count(engine, notify_messages) == 1  # kept for `enable`


async def test_a_timeout_is_retried_and_a_slow_answer_within_it_is_delivered(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    await register(api, consumer.url)
    subscription_id = await subscribe(api, "9400100000000000000007")
    answered = asyncio.Event()

    async def too_slow(_: Received) -> web.StreamResponse:
        await answered.wait()  # never within the timeout: the test sets it afterwards
        return web.Response(status=200)

    consumer.answer = too_slow
    await change(engine, subscription_id)
    notifier = make_notifier(notify_timeout_s=0.3)
    await notifier.drain()
    answered.set()
    (attempt,) = await attempts(engine)
    assert (attempt["outcome"], attempt["status_code"]) == ("timeout", None)

    async def slow(_: Received) -> web.StreamResponse:
        await asyncio.sleep(0.05)  # the consumer's own pace, well within the timeout
        return web.Response(status=202)

    consumer.answer = slow
    clock.advance(seconds=RETRY_SCHEDULE_S[0])
    await notifier.drain()
    assert [a["outcome"] for a in await attempts(engine)] == ["timeout", "delivered"]


async def test_a_consumer_gone_for_a_day_gets_everything_in_order_when_back(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    endpoint = await register(api, consumer.url)
    packages = [await subscribe(api, f"94001000000000000001{n:02}") for n in range(3)]
    down = True

    async def answer(received: Received) -> web.StreamResponse:
        if down:
            raise ConnectionResetError  # the connection is cut: unreachable
        return web.Response(status=200)

    consumer.answer = answer
    notifier = make_notifier()
    started = clock.now
    for _ in range(24):  # a change of every package each hour, the sender going round
        await change(engine, *packages)
        await notifier.drain()
        clock.advance(hours=1)
    assert clock.now - started == timedelta(days=1)
    down = False
    clock.advance(seconds=max(RETRY_SCHEDULE_S))  # every lane's next retry is due by then
    await notifier.drain()

    for package in packages:
        delivered = [
            r.change["sequence"] for r in consumer.received if r.subscription_id == package
        ]
        assert delivered[-24:] == list(range(1, 25))
    assert (await endpoint_row(engine, endpoint["id"]))["state"] == "enabled"
    assert await count(engine, notify_messages) == 0


async def test_a_429_with_retry_after_pauses_that_endpoint_alone_without_counting(
    api: Client,
    engine: AsyncEngine,
    make_notifier: MakeNotifier,
    clock: Clock,
    consumer: Consumer,
) -> None:
    busy = await register(api, consumer.url + "?busy")
    calm = await register(api, consumer.url + "?calm")
    subscription_id = await subscribe(api, "9400100000000000000008")
    throttling = True

    async def answer(received: Received) -> web.StreamResponse:
        if received.query == "busy" and throttling:
            return web.Response(status=429, headers={"Retry-After": "120"})
        return web.Response(status=204)

    consumer.answer = answer
    await change(engine, subscription_id)
    notifier = make_notifier()
    assert await notifier.drain() == 2
    found = await endpoint_row(engine, busy["id"])
    assert found["paused_until"] == clock.now + timedelta(seconds=120)

    await change(engine, subscription_id)
    assert await notifier.drain() == 1  # the calm endpoint's second; the busy one waits
    throttling = False
    clock.advance(seconds=121)
    assert await notifier.drain() == 2
    by_endpoint = [(str(a["endpoint_id"]), a["outcome"]) for a in await attempts(engine)]
    assert [outcome for e, outcome in by_endpoint if e == busy["id"]] == [
        "throttled",
        "delivered",
        "delivered",
    ]
    assert [outcome for e, outcome in by_endpoint if e == calm["id"]] == ["delivered"] * 2
    assert (await endpoint_row(engine, busy["id"]))["state"] == "enabled"


# -- secrets and clients ---------------------------------------------------------------------


async def test_after_a_rotation_both_secrets_sign_for_a_day_then_only_the_new(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    endpoint = await register(api, consumer.url)
    subscription_id = await subscribe(api, "9400100000000000000009")
    rotated = await (await api.post(f"/v1/endpoints/{endpoint['id']}/rotate-secret")).json()
    notifier = make_notifier()

    await change(engine, subscription_id)
    await notifier.drain()
    during = consumer.received[-1]
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    for secret in (endpoint["secret"], rotated["secret"]):
        Webhook(secret).verify(during.body, during.headers)

    clock.advance(hours=24, seconds=1)
    await change(engine, subscription_id)
    await notifier.drain()
    after = consumer.received[-1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    Webhook(rotated["secret"]).verify(after.body, after.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint["secret"]).verify(after.body, after.headers)


async def test_an_endpoint_never_receives_another_clients_changes_unless_ops_made_it_for_all(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
) -> None:
    async with engine.begin() as conn:
        other = bearer((await create_token(conn, "billing", [Scope.WRITE])).plaintext)
        ops = bearer((await create_token(conn, "ops-team", [Scope.OPS])).plaintext)
    mine = await register(api, consumer.url + "?mine")
    theirs = await register(api, consumer.url + "?theirs", headers=other)
    every = await register(api, consumer.url + "?every", headers=ops, all_clients=True)
    my_package = await subscribe(api, "9400100000000000000010")
    their_package = await subscribe(api, "9400100000000000000011", headers=other)
    await change(engine, my_package, their_package)

    await make_notifier().drain()
    received = sorted((r.query, r.subscription_id) for r in consumer.received)
    assert received == sorted(
        [
            ("mine", my_package),
            ("theirs", their_package),
            ("every", my_package),
            ("every", their_package),
        ]
    )
    assert {mine["created_by"], theirs["created_by"], every["created_by"]} == {
        "tests",
        "billing",
        "ops-team",
    }


# -- sharing one endpoint among workers -------------------------------------------------------


async def claim(
    engine: AsyncEngine,
    now: datetime,
    *,
    per_endpoint: int = 16,
    answered: list[uuid.UUID] | None = None,
) -> list[notify.Send]:
    return await notify.claim(
        engine,
        now=now,
        lease_until=now + timedelta(seconds=60),
        per_endpoint=per_endpoint,
        slots=100,
        answered=answered or [],
    )


async def queue(engine: AsyncEngine, clock: Clock) -> notify.FanOut:
    return await notify.fan_out(
        engine, now=clock.now, page=500, backlog=10_000, render=lambda row: b"{}"
    )


async def test_per_endpoint_concurrency_counts_every_workers_sends(
    api: Client, engine: AsyncEngine, consumer: Consumer, clock: Clock
) -> None:
    await register(api, consumer.url)
    await changed_packages(api, engine, "94001000000000000002", 5)
    assert (await queue(engine, clock)).queued == 5

    first = await claim(engine, clock.now, per_endpoint=2)
    second = await claim(engine, clock.now, per_endpoint=2)  # another worker, same moment
    assert (len(first), len(second)) == (2, 0)
    assert len({send.subscription_id for send in first}) == 2


async def test_sends_answered_but_not_yet_recorded_free_their_endpoints_room(
    api: Client, engine: AsyncEngine, consumer: Consumer, clock: Clock
) -> None:
    await register(api, consumer.url)
    await changed_packages(api, engine, "94001000000000000004", 4)
    await queue(engine, clock)

    first = await claim(engine, clock.now, per_endpoint=2)
    assert await claim(engine, clock.now, per_endpoint=2) == []  # two in flight: no room
    answered = [send.claim_token for send in first]  # their answers came; records to come
    more = await claim(engine, clock.now, per_endpoint=2, answered=answered)
    assert len(more) == 2
    assert {s.subscription_id for s in more}.isdisjoint({s.subscription_id for s in first})


async def test_a_record_in_progress_at_an_endpoint_does_not_make_a_claim_pass_it_by(
    api: Client, engine: AsyncEngine, consumer: Consumer, clock: Clock
) -> None:
    endpoint = await register(api, consumer.url)
    await changed_packages(api, engine, "94001000000000000005", 2)
    await queue(engine, clock)
    async with engine.begin() as recording:
        # As a record's attempt does: its foreign key holds the endpoint's row (KEY SHARE).
        await recording.execute(
            sa.insert(notify_attempts).values(
                endpoint_id=uuid.UUID(endpoint["id"]),
                message_id="chg_0",
                type="subscription.active",
                attempt=1,
                outcome="delivered",
                status_code=204,
                latency_ms=1.0,
                response="",
                attempted_at=clock.now,
            )
        )
        assert len(await claim(engine, clock.now)) == 2


async def test_lanes_are_claimed_ahead_of_the_slots_and_given_back_when_the_notifier_stops(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    await register(api, consumer.url)
    await changed_packages(api, engine, "94001000000000000006", 3)
    answer = asyncio.Event()
    consumer.answer = held_until(answer)
    async with running(make_notifier(notify_concurrency=1)):
        await asyncio.wait_for(consumer.arrivals.get(), timeout=10)  # the one slot's send
        # One lane sending, and as many claimed ahead as there are slots: the next goes the
        # moment the slot frees, not a claim later. The third waits in the database.
        assert await claimed_lanes(engine) == 2
    answer.set()
    # The send cut short keeps its lease (sent again when it runs out); the one claimed ahead
    # is given back, due now for any worker.
    assert await claimed_lanes(engine) == 1
    assert len(await claim(engine, clock.now)) == 2


async def test_what_was_claimed_ahead_of_an_endpoint_that_answered_429_is_not_sent(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    busy = await register(api, consumer.url)
    await changed_packages(api, engine, "94001000000000000007", 2)

    async def throttle(_: Received) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "120"})

    consumer.answer = throttle

    async def settled() -> bool | None:
        paused = (await endpoint_row(engine, busy["id"]))["paused_until"] is not None
        return True if paused and await claimed_lanes(engine) == 0 else None

    async with running(make_notifier(notify_concurrency=1)):  # one sending, one ahead
        await eventually(settled)  # paused, and the lane claimed ahead given back
    assert len(consumer.received) == 1


async def test_a_send_that_waits_too_long_for_a_slot_is_given_back_for_other_workers(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    await register(api, consumer.url)
    await changed_packages(api, engine, "94001000000000000008", 3)
    answer = asyncio.Event()
    consumer.answer = held_until(answer)

    async def given_back() -> bool | None:
        return True if await claimed_lanes(engine) == 1 else None

    async with running(make_notifier(notify_concurrency=1)):
        await asyncio.wait_for(consumer.arrivals.get(), timeout=10)
        assert await claimed_lanes(engine) == 2  # one sending, one claimed ahead
        clock.advance(seconds=READY_WAIT_MAX_S + 1)  # the slot is still taken
        await eventually(given_back)  # and not claimed again while the slot stays clogged
        assert len(await claim(engine, clock.now)) == 2  # another worker takes them
    answer.set()


async def test_a_claim_skips_an_endpoint_whose_claim_lock_another_worker_holds(
    api: Client, engine: AsyncEngine, consumer: Consumer, clock: Clock
) -> None:
    endpoint = await register(api, consumer.url)
    await change(engine, await subscribe(api, "9400100000000000000901"))
    await queue(engine, clock)
    key = sa.text(
        "SELECT pg_advisory_xact_lock("
        "  CAST(:space AS bigint) << 32 | (hashtextextended(:id, 0) & 4294967295))"
    )
    async with engine.begin() as other_worker:
        await other_worker.execute(key, {"space": notify.ENDPOINT_LOCK_SPACE, "id": endpoint["id"]})
        assert await claim(engine, clock.now) == []
    assert len(await claim(engine, clock.now)) == 1


@contextlib.asynccontextmanager
async def running(notifier: Notifier) -> AsyncIterator[Notifier]:
    """The notifier's own loop (not `drain`), stopped at the end of the block."""
    task = asyncio.create_task(notifier.run())
    try:
        yield notifier
    finally:
        notifier.stop()
        await task


def held_until(answer: asyncio.Event) -> Answering:
    """A consumer that answers 204 once `answer` is set."""

    async def held(_: Received) -> web.StreamResponse:
        await answer.wait()
        return web.Response(status=204)

    return held


def test_a_send_claimed_ahead_starts_only_while_it_is_fresh(
    make_notifier: MakeNotifier, clock: Clock
) -> None:
    notifier = make_notifier(notify_timeout_s=10, notify_lease_s=60)
    spaced = notify.Send(
        target=notify.Target(uuid.uuid4(), "http://consumer.test/", ("whsec_x",), 4.0),
        subscription_id=uuid.uuid4(),
        claim_token=uuid.uuid4(),
        failures=0,
        change_id=1,
        type="subscription.active",
        body=b"{}",
        send_at=clock.now,
        lease_until=clock.now + timedelta(seconds=60),
    )
    unlimited = dataclasses.replace(
        spaced, target=dataclasses.replace(spaced.target, rate_limit_per_s=None)
    )

    def stale(send: notify.Send, claimed_s: float, now_s: float) -> bool:
        claimed_at = clock.now + timedelta(seconds=claimed_s)
        return notifier._stale(send, claimed_at, clock.now + timedelta(seconds=now_s))

    # A rate-limited send (4/s) may start late by one spacing, no more.
    assert not stale(spaced, 0, 0.2)
    assert stale(spaced, 0, 0.3)
    # Any send: only while the timeout and a second still fit before its lease (49 s in).
    assert not stale(unlimited, 48.5, 48.9)
    assert stale(unlimited, 48.5, 49.1)
    assert notifier._clogged_until is None  # a lease running out is no clogged slot


async def claimed_lanes(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        claimed = sa.select(sa.func.count()).where(notify_lanes.c.claim_token.is_not(None))
        return int(await conn.scalar(claimed) or 0)


async def test_a_rate_limit_spaces_sends_across_claims_and_workers(
    api: Client, engine: AsyncEngine, consumer: Consumer, clock: Clock
) -> None:
    await register(api, consumer.url, rate_limit_per_s=4)
    await changed_packages(api, engine, "94001000000000000003", 10)
    await queue(engine, clock)

    first = await claim(engine, clock.now)
    second = await claim(engine, clock.now)  # another worker: goes on where the first stopped
    send_times = [send.send_at for send in first + second]
    assert len(first) == 4  # a second's worth: SEND_AHEAD_S
    assert send_times == [clock.now + timedelta(seconds=0.25 * n) for n in range(len(send_times))]
    assert len(second) <= 1  # what is left of the window
    clock.advance(seconds=1)
    third = await claim(engine, clock.now)
    assert third[0].send_at == send_times[-1] + timedelta(seconds=0.25)


# -- the address, checked as it is sent -------------------------------------------------------


class FakeDns(aiohttp.abc.AbstractResolver):
    """A name server that answers what the test says (the rebinding attacker's)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: Any = 0
    ) -> list[aiohttp.abc.ResolveResult]:
        address = self.answers[host]
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": 2,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


async def test_a_name_that_resolves_to_a_metadata_address_at_send_time_is_refused(
    consumer: Consumer,
) -> None:
    port = consumer.url.split(":")[2].split("/")[0]
    dns = FakeDns({"consumer.test": "127.0.0.1", "rebound.test": "169.254.169.254"})
    async with sending.client_session(4, resolver=dns) as session:

        async def send(url: str, allowed: tuple[str, ...] = ()) -> sending.Answer:
            return await sending.post(
                session,
                url,
                message_id="chg_1",
                body=b"{}",
                secrets=[new_secret()],
                timeout_s=5,
                allowed_hosts=allowed,
            )

        assert (await send(f"http://consumer.test:{port}/hooks")).outcome == "delivered"
        refused = await send(f"http://rebound.test:{port}/hooks")
        assert (refused.outcome, refused.status_code) == ("refused", None)
        assert (await send("http://169.254.169.254/latest")).outcome == "refused"
        # NOTIFY_ALLOWED_HOSTS applies at send time too, to endpoints registered before it.
        outside = await send(f"http://consumer.test:{port}/hooks", ("elsewhere.test",))
        assert outside.outcome == "refused"
    assert len(consumer.received) == 1


async def test_a_redirect_is_not_followed_and_only_the_answers_first_4_kib_are_kept(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    await register(api, consumer.url)
    subscription_id = await subscribe(api, "9400100000000000000012")

    async def answer(_: Received) -> web.StreamResponse:
        if len(consumer.received) == 1:
            raise web.HTTPTemporaryRedirect("http://169.254.169.254/latest/meta-data")
        return web.Response(status=200, body=b"\x00\xff" + b"x" * 100_000)

    consumer.answer = answer
    await change(engine, subscription_id)
    notifier = make_notifier()
    await notifier.drain()
    (redirected,) = await attempts(engine)
    assert (redirected["outcome"], redirected["status_code"]) == ("failed", 307)
    assert len(consumer.received) == 1

    clock.advance(seconds=RETRY_SCHEDULE_S[0])
    await notifier.drain()
    kept = (await attempts(engine))[-1]["response"]
    assert kept.startswith("\ufffd\ufffd")  # a NUL and a byte that is not UTF-8
    assert len(kept) == 4096


# -- a worker killed mid-send -----------------------------------------------------------------


async def test_a_worker_killed_mid_send_has_the_message_sent_again(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
    database_url: str,
    shipengine: RunningSimulator,
    tmp_path: Path,
) -> None:
    await register(api, consumer.url, types=["subscription.active"])
    never = asyncio.Event()

    async def hang(_: Received) -> web.StreamResponse:
        await never.wait()  # the answer the killed worker waits for, in vain
        return web.Response(status=200)

    consumer.answer = hang
    env = {
        "DATABASE_URL": database_url,
        "SHIPENGINE_API_KEY": "TEST_simulator",
        "SHIPENGINE_BASE_URL": shipengine.url,
        "SHIPENGINE_RATE_LIMIT_PER_MINUTE": "0",
        "NOTIFY_TIMEOUT_S": "5",
        "NOTIFY_LEASE_S": "7",
    }
    worker = await DispatcherProcess.start(tmp_path / "dispatcher.log", env)
    try:
        # The worker starts tracking the package, the change is queued and its send begins.
        subscription_id = await subscribe(api, "9400100000000000000013")
        first = await asyncio.wait_for(consumer.arrivals.get(), timeout=30)
        worker.kill()
    finally:
        await worker.ensure_stopped()
    assert first.subscription_id == subscription_id

    consumer.answer = accept
    notifier = make_notifier()
    clock.now = datetime.now(UTC)  # after the killed worker's claim
    assert await notifier.drain() == 0  # its lease holds
    clock.advance(seconds=8)
    assert await notifier.drain() == 1  # the lease ran out: sent again, the same message
    again = consumer.received[-1]
    assert again.headers["webhook-id"] == first.headers["webhook-id"]
    assert again.body == first.body
    assert await count(engine, notify_messages) == 0


# -- replay, ping, attempts -------------------------------------------------------------------


async def test_replay_after_a_cursor_or_since_a_time_sends_those_changes_again(
    api: Client, engine: AsyncEngine, consumer: Consumer, make_notifier: MakeNotifier
) -> None:
    endpoint = await register(api, consumer.url)
    subscription_id = await subscribe(api, "9400100000000000000014")
    for _ in range(3):
        await change(engine, subscription_id)
    notifier = make_notifier()
    await notifier.drain()
    assert consumer.of(subscription_id) == [1, 2, 3]
    page = await (await api.get("/v1/changes", params={"limit": "1"})).json()

    path = f"/v1/endpoints/{endpoint['id']}/replay"
    answer = await api.post(path, json={"after": page["next_cursor"]})
    assert answer.status == 202, await answer.text()
    assert (await answer.json())["replaying_after"] == page["next_cursor"]
    await notifier.drain()
    assert consumer.of(subscription_id) == [1, 2, 3, 2, 3]

    answer = await api.post(path, json={"since": "2000-01-01T00:00:00+02:00"})
    assert answer.status == 202
    await notifier.drain()
    assert consumer.of(subscription_id)[5:] == [1, 2, 3]

    answer = await api.post(path, json={"since": "9999-12-31T23:59:59Z"})
    assert (await answer.json())["replaying_after"] is None  # nothing that recent
    assert await notifier.drain() == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"after": "00", "since": "2026-01-01T00:00:00Z"}, 422),
        ({"since": "2026-01-01T00:00:00"}, 422),  # no offset
        ({"since": "0001-01-01T00:00:00+01:00"}, 422),  # before year 1 in UTC
        ({"since": "0001-01-01T00:00:00Z"}, 202),
        ({"after": "zz"}, 400),
        ({"after": "7fffffffffffffff0000000000000000"}, 400),  # past every transaction
        ({"after": "00000000000000000000000000000000"}, 202),
    ],
)
async def test_a_replay_that_makes_no_sense_is_a_4xx(
    api: Client, body: dict[str, Any], status: int
) -> None:
    endpoint = await register(api, "http://127.0.0.1:9/hooks")
    answer = await api.post(f"/v1/endpoints/{endpoint['id']}/replay", json=body)
    assert answer.status == status, await answer.text()
    assert answer.content_type == "application/json"


async def test_a_ping_is_sent_now_signed_and_kept_with_the_attempts(
    api: Client, engine: AsyncEngine, consumer: Consumer
) -> None:
    endpoint = await register(api, consumer.url)
    consumer.answer = answering(410)  # a ping's answer changes nothing of the endpoint
    answer = await api.post(f"/v1/endpoints/{endpoint['id']}/test")
    assert answer.status == 200, await answer.text()
    attempt = await answer.json()
    assert (attempt["type"], attempt["outcome"], attempt["status_code"]) == ("ping", "gone", 410)

    (received,) = consumer.received
    ping = Webhook(endpoint["secret"]).verify(received.body, received.headers)
    assert ping["type"] == "ping"
    assert ping["id"] == received.headers["webhook-id"] == attempt["message_id"]
    assert (await endpoint_row(engine, endpoint["id"]))["state"] == "enabled"

    listed = await (await api.get(f"/v1/endpoints/{endpoint['id']}/attempts")).json()
    assert listed == {"items": [attempt], "next_before": None}


async def test_attempts_are_paged_newest_first_and_only_the_owners(
    api: Client,
    engine: AsyncEngine,
    consumer: Consumer,
    make_notifier: MakeNotifier,
    clock: Clock,
) -> None:
    endpoint, _ = await one_change_to(
        api, engine, consumer, "9400100000000000000015", answering(500)
    )
    notifier = make_notifier()
    await notifier.drain()
    for wait_s in RETRY_SCHEDULE_S[:2]:
        clock.advance(seconds=wait_s)
        await notifier.drain()

    path = f"/v1/endpoints/{endpoint['id']}/attempts"
    first = await (await api.get(path, params={"limit": "2"})).json()
    assert [a["attempt"] for a in first["items"]] == [3, 2]
    rest = await (await api.get(path, params={"before": str(first["next_before"])})).json()
    assert [a["attempt"] for a in rest["items"]] == [1]
    assert rest["next_before"] is None
    assert rest["items"][0]["response"] == "no"

    async with engine.begin() as conn:
        other = bearer((await create_token(conn, "billing", [Scope.READ])).plaintext)
    assert (await api.get(path, headers=other)).status == 404
    assert (await api.get(path, params={"limit": "0"})).status == 400


def test_the_local_consumer_checks_signatures_as_the_standard_makes_them() -> None:
    secret, body = new_secret(), b'{"type":"tracking.status_changed"}'
    now = datetime.now(UTC)
    signature = Webhook(secret).sign("chg_7", now, body)
    headers = {
        "webhook-id": "chg_7",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": f"v1,bm90IG91cnM= {signature}",  # another secret's first
    }
    assert verified(secret, headers, body, now.timestamp())
    assert not verified(secret, headers, body + b" ", now.timestamp())
    assert not verified(new_secret(), headers, body, now.timestamp())
    assert not verified(secret, headers, body, now.timestamp() + 301)  # too old: a replay
    # The same time in full-width digits, which int() reads but no sender writes.
    wide = headers["webhook-timestamp"].translate({ord(d): 0xFF10 + int(d) for d in "0123456789"})
    assert not verified(secret, {**headers, "webhook-timestamp": wide}, body, now.timestamp())


def readme_consumer() -> str:
    """The consumer of README's "Notifications" section: its Python block."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("\n## Notifications\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readmes_consumer_takes_what_is_sent_once_and_refuses_a_forgery(
    api: Client, engine: AsyncEngine, make_notifier: MakeNotifier
) -> None:
    namespace: dict[str, Any] = {"web": web}

    async def receive(request: web.Request) -> web.StreamResponse:
        answer: web.StreamResponse = await namespace["receive"](request)
        return answer

    app = web.Application()
    app.router.add_post("/hooks", receive)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        endpoint = await register(api, str(server.make_url("/hooks")))
        done: list[str] = []
        namespace |= {
            "secret": endpoint["secret"],
            "already_done": lambda change_id: change_id in done,
            "act_on": lambda change: done.append(change["id"]),
        }
        exec(readme_consumer(), namespace)  # noqa: S102 - the README's own code, run as written
        subscription_id = await subscribe(api, "9400100000000000000016")
        await change(engine, subscription_id)
        await make_notifier().drain()
        assert len(done) == 1

        async with aiohttp.ClientSession() as session:
            forged = {"webhook-id": "chg_1", "webhook-timestamp": "1", "webhook-signature": "v1,x"}
            async with session.post(server.make_url("/hooks"), data=b"{}", headers=forged) as got:
                assert got.status == 401
    finally:
        await server.close()


async def test_ops_see_a_disabled_endpoint_in_the_summary_the_dashboard_and_the_metrics(
    api: Client, engine: AsyncEngine, consumer: Consumer, make_notifier: MakeNotifier, token: str
) -> None:
    endpoint, _ = await one_change_to(
        api, engine, consumer, "9400100000000000000017", answering(410)
    )
    await make_notifier().drain()

    summary = (await (await api.get("/v1/ops/summary")).json())["notifications"]
    assert summary["endpoints"] == {"enabled": 0, "disabled": 1}
    assert summary["queued"] == 1
    (disabled,) = summary["disabled"]
    assert (disabled["id"], disabled["created_by"]) == (endpoint["id"], "tests")
    assert disabled["disabled_reason"] == "the endpoint answered 410 Gone"

    await log_in(api, token)
    page = await (await api.get("/dashboard")).text()
    assert "1 notification endpoint is DISABLED" in page
    assert endpoint["id"] in page

    metrics = await (await api.get("/metrics")).text()
    assert 'tracking_notify_endpoints{state="disabled"} 1.0' in metrics
    assert "tracking_notify_queued 1.0" in metrics


# -- what an attack review found ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "pause_s"),
    [
        ("0", RETRY_SCHEDULE_S[0]),  # never a hot loop
        ("Mon, 01 Jan 2001 00:00:00 GMT", RETRY_SCHEDULE_S[0]),  # in the past
        ("120", 120.0),
        ("9" * 5000, max(RETRY_SCHEDULE_S)),
        ("soon", None),
    ],
)
def test_retry_after_is_obeyed_within_the_schedules_bounds(
    header: str, pause_s: float | None
) -> None:
    assert retry_after_s(header, datetime.now(UTC)) == pause_s


async def test_a_rate_limited_endpoint_is_not_due_again_before_its_next_send(
    api: Client, engine: AsyncEngine, consumer: Consumer, clock: Clock
) -> None:
    await register(api, consumer.url, rate_limit_per_s=0.5)
    await changed_packages(api, engine, "94001000000000000004", 5)
    await queue(engine, clock)
    assert len(await claim(engine, clock.now)) == 1  # at 0.5/s, one; the next in 2 s
    async with engine.connect() as conn:
        due = await notify.next_due(conn)
    # Not a busy loop while four more lanes are due: the next claim is when the next send
    # comes within SEND_AHEAD_S (1 s) of its time.
    assert due == clock.now + timedelta(seconds=1)


async def test_a_replay_waits_for_a_fan_out_in_progress_rather_than_be_overwritten(
    api: Client, engine: AsyncEngine, consumer: Consumer
) -> None:
    endpoint = await register(api, consumer.url)
    page = await (await api.get("/v1/changes")).json()
    async with engine.connect() as holder:  # a fan-out in progress holds the lock
        await holder.execute(sa.select(sa.func.pg_advisory_lock(notify.FAN_OUT_LOCK)))
        replaying = asyncio.ensure_future(
            api.post(f"/v1/endpoints/{endpoint['id']}/replay", json={"after": page["next_cursor"]})
        )

        async def waiting() -> bool | None:
            query = sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            return True if await holder.scalar(query) else None

        await eventually(waiting)
        assert not replaying.done()
        await holder.execute(sa.select(sa.func.pg_advisory_unlock(notify.FAN_OUT_LOCK)))
    assert (await replaying).status == 202


async def test_a_send_whose_lease_ran_out_counts_only_for_the_claim_that_holds_the_lane(
    api: Client, engine: AsyncEngine, consumer: Consumer, make_notifier: MakeNotifier, clock: Clock
) -> None:
    await register(api, consumer.url)
    subscription_id = await subscribe(api, "9400100000000000000018")
    await change(engine, subscription_id)
    await change(engine, subscription_id)
    await queue(engine, clock)
    (stale,) = await claim(engine, clock.now)
    (current,) = await claim(engine, clock.now + timedelta(seconds=61))  # the lease ran out
    assert current.change_id == stale.change_id
    notifier = make_notifier()

    def finished(send: notify.Send, delivered: bool) -> notify.Finished:
        answer = Answer(
            NotifyOutcome.DELIVERED if delivered else NotifyOutcome.FAILED, 200, 1.0, ""
        )
        return notifier._judge(send, answer, clock.now)

    async with engine.begin() as conn:  # the stale one's late success, the current failure
        await notify.record(conn, [finished(stale, True), finished(current, False)])
    async with engine.connect() as conn:
        lane = (await conn.execute(sa.select(notify_lanes))).mappings().one()
        queued = await conn.scalar(sa.select(sa.func.count()).select_from(notify_messages))
    assert (lane["pending"], lane["failures"], lane["claim_token"]) == (2, 1, None)
    assert queued == 2  # the first change is sent again, by the claim that holds its lane


async def test_an_endpoint_deleted_mid_send_costs_the_others_nothing(
    api: Client, engine: AsyncEngine, consumer: Consumer, make_notifier: MakeNotifier, clock: Clock
) -> None:
    gone = await register(api, consumer.url + "?gone")
    await register(api, consumer.url + "?kept")
    subscription_id = await subscribe(api, "9400100000000000000019")
    await change(engine, subscription_id)
    await queue(engine, clock)
    sends = await claim(engine, clock.now)
    assert len(sends) == 2
    assert (await api.delete(f"/v1/endpoints/{gone['id']}")).status == 204
    notifier = make_notifier()
    answer = Answer(NotifyOutcome.DELIVERED, 204, 1.0, "")
    async with engine.begin() as conn:
        await notify.record(conn, [notifier._judge(send, answer, clock.now) for send in sends])
    assert await count(engine, notify_messages) == 0
    assert len(await attempts(engine)) == 1  # the kept endpoint's


async def test_a_clients_pings_to_a_tarpit_hold_back_no_other_client(
    api: Client, engine: AsyncEngine, consumer: Consumer
) -> None:
    released = asyncio.Event()

    async def answer(received: Received) -> web.StreamResponse:
        if received.query == "tarpit":
            await released.wait()  # until the test lets it answer
        return web.Response(status=204)

    consumer.answer = answer
    tarpit = await register(api, consumer.url + "?tarpit")
    async with engine.begin() as conn:
        other = bearer((await create_token(conn, "billing", [Scope.WRITE])).plaintext)
    theirs = await register(api, consumer.url + "?theirs", headers=other)

    held = [asyncio.ensure_future(api.post(f"/v1/endpoints/{tarpit['id']}/test")) for _ in "ab"]
    for _ in held:
        await asyncio.wait_for(consumer.arrivals.get(), timeout=10)
    refused = await api.post(f"/v1/endpoints/{tarpit['id']}/test")
    assert refused.status == 429
    assert (await refused.json())["errors"][0]["error_code"] == "too_many_pings"
    answered = await api.post(f"/v1/endpoints/{theirs['id']}/test", headers=other)
    assert (await answered.json())["outcome"] == "delivered"

    released.set()
    for ping in held:
        assert (await ping).status == 200
    assert (await api.post(f"/v1/endpoints/{tarpit['id']}/test")).status == 200


async def test_a_disabled_endpoint_is_logged_at_warning_with_its_id_and_reason_only(
    api: Client, engine: AsyncEngine, consumer: Consumer, make_notifier: MakeNotifier
) -> None:
    endpoint, _ = await one_change_to(
        api, engine, consumer, "9400100000000000000020", answering(410)
    )
    with structlog.testing.capture_logs() as logs:
        await make_notifier().drain()
    (disabled,) = [entry for entry in logs if entry["event"] == "notify.endpoint_disabled"]
    assert disabled["log_level"] == "warning"
    assert disabled["endpoint_id"] == endpoint["id"]
    assert disabled["reason"] == "the endpoint answered 410 Gone"
    assert consumer.url not in str(logs)  # a consumer's URL may carry its own token


async def test_a_full_queue_takes_no_more_of_the_feed_until_it_has_room(
    api: Client, engine: AsyncEngine, consumer: Consumer, make_notifier: MakeNotifier, clock: Clock
) -> None:
    endpoint = await register(api, consumer.url)
    packages = await changed_packages(api, engine, "94001000000000000006", 5)

    async def fan_out() -> notify.FanOut:
        return await notify.fan_out(
            engine, now=clock.now, page=500, backlog=2, render=render_change
        )

    first = await fan_out()
    assert first.queued == 5  # a page is taken whole, then the queue is full
    again = await fan_out()
    assert (again.queued, again.full) == (0, frozenset({uuid.UUID(endpoint["id"])}))
    await make_notifier(notify_queue_per_endpoint=2).drain()
    assert sorted(r.subscription_id for r in consumer.received) == sorted(packages)
