"""After the database drops every connection (a restart, a failover), each path answers 503
with Retry-After at most once, discards the dead connection, and the next call succeeds.

The API's backends are ended with `pg_terminate_backend` between two calls: the pool then
holds connections that are dead on the server but look alive to the process, which is what a
failover leaves behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.app import create_app
from service.api.keys import ENGINE
from service.db import partitions
from service.db.deliveries import Incoming, store_and_file
from service.db.driver import driver_connection
from service.db.engine import asyncpg_dsn, create_engine
from service.db.errors import is_unavailable
from service.dispatcher.worker import Dispatcher
from service.domain.tracking import RearmPolicy
from service.settings import Settings
from tests.conftest import RunningSimulator, bearer
from tests.payloads import track_body
from tests.test_dashboard import log_in
from tests.test_dispatch_faults import all_active, subscribe_many
from tests.waiting import eventually
from tests.webhook_sender import WEBHOOK

Client = TestClient[web.Request, web.Application]
Call = Callable[[Client, int], Awaitable[ClientResponse]]


async def terminate_backends(database_url: str) -> int:
    """End every other session on the test's database, as a restart would."""
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        ended: int = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    return ended


async def signed_delivery(api: Client, shipengine: RunningSimulator, n: int) -> ClientResponse:
    body = json_bytes(track_body(f"RESTART{n:04}", "stamps_com", 1))
    headers = {"Content-Type": "application/json", **shipengine.simulator.keys.headers(body)}
    return await api.post(WEBHOOK, data=body, headers=headers)


def json_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


async def subscribe(api: Client, n: int) -> ClientResponse:
    body = {"carrier_code": "stamps_com", "tracking_number": f"SUB{n:05}"}
    return await api.post("/v1/subscriptions", json=body)


async def subscribe_batch(api: Client, n: int) -> ClientResponse:
    items = [{"carrier_code": "stamps_com", "tracking_number": f"B{n:03}{k:02}"} for k in range(3)]
    return await api.post("/v1/subscriptions/batch", json={"subscriptions": items})


async def list_subscriptions(api: Client, _: int) -> ClientResponse:
    return await api.get("/v1/subscriptions?limit=5")


async def ops_summary(api: Client, _: int) -> ClientResponse:
    return await api.get("/v1/ops/summary")


async def ops_failures(api: Client, _: int) -> ClientResponse:
    return await api.get("/v1/ops/failures")


async def readyz(api: Client, _: int) -> ClientResponse:
    return await api.get("/readyz")


async def dashboard_page(api: Client, _: int) -> ClientResponse:
    return await api.get("/dashboard/subscriptions", allow_redirects=False)


API_PATHS: dict[str, Call] = {
    "subscribe": subscribe,
    "batch": subscribe_batch,
    "list": list_subscriptions,
    "ops summary": ops_summary,
    "ops failures": ops_failures,
    "readyz": readyz,
    "dashboard": dashboard_page,
}


async def check_recovers(api: Client, database_url: str, call: Call) -> None:
    first = await call(api, 1)
    assert first.status < 300, await first.text()
    assert await terminate_backends(database_url) > 0
    met_dead = await call(api, 2)
    if met_dead.status == 503:
        assert met_dead.headers.get("Retry-After", "").isdigit(), met_dead.headers
    else:
        assert met_dead.status < 300, await met_dead.text()
    for n in range(3, 6):  # and every call after it
        after = await call(api, n)
        assert after.status < 300, await after.text()


@pytest.mark.parametrize("path", sorted(API_PATHS))
async def test_an_api_path_recovers_after_the_database_drops_its_connections(
    api: Client, database_url: str, token: str, path: str
) -> None:
    if path == "dashboard":
        await log_in(api, token)
    await check_recovers(api, database_url, API_PATHS[path])


async def test_the_receiver_recovers_after_the_database_drops_its_connections(
    api: Client, database_url: str, shipengine: RunningSimulator
) -> None:
    async def deliver(client: Client, n: int) -> ClientResponse:
        return await signed_delivery(client, shipengine, n)

    await check_recovers(api, database_url, deliver)


async def test_an_exhausted_pool_is_a_503_after_the_pool_timeout(
    live_settings: Settings, token: str
) -> None:
    settings = dataclasses.replace(live_settings, database_pool_size=1, database_pool_timeout_s=0.2)
    async with TestClient(TestServer(create_app(settings)), headers=bearer(token)) as client:
        assert (await client.get("/v1/subscriptions")).status == 200
        engine = client.app[ENGINE]
        # Every connection the API may have (pool and overflow), held in open transactions.
        held = [await engine.connect() for _ in range(2)]
        try:
            answer = await client.get("/v1/subscriptions")
            assert answer.status == 503, await answer.text()
            assert answer.headers["Retry-After"].isdigit()
            document = await answer.json()
            assert document["errors"][0]["error_code"] == "database_unavailable"
        finally:
            for conn in held:
                await conn.close()
        assert (await client.get("/v1/subscriptions")).status == 200


# -- background work ---------------------------------------------------------------------------


def incoming(number: str) -> Incoming:
    payload = track_body(number, "stamps_com", 1)
    return Incoming.read(
        payload, json_bytes(payload), headers={}, verification="not_applicable", source="poll"
    )


async def file_one(engine: AsyncEngine, number: str) -> None:
    async with engine.begin() as conn:
        db = await driver_connection(conn)
        await store_and_file(db, [incoming(number)], RearmPolicy(max_rearms=0, delay_s=60))


async def test_filing_through_the_driver_discards_a_dead_connection(
    engine: AsyncEngine, database_url: str
) -> None:
    """The statements that go to asyncpg directly (webhooks, polls, adoption of orphans) meet a
    dead connection as SQLAlchemy's do: an error that means 'unavailable', and a pool that
    hands out a live connection next."""
    await file_one(engine, "DRV1")
    assert await terminate_backends(database_url) > 0
    with pytest.raises(sa_exc.DBAPIError) as failed:
        await file_one(engine, "DRV2")
    assert failed.value.connection_invalidated
    assert is_unavailable(failed.value)
    await file_one(engine, "DRV3")
    async with engine.connect() as conn:
        stored = await conn.scalar(sa.text("SELECT count(*) FROM webhook_deliveries"))
    assert stored == 2


async def test_partition_maintenance_recovers_after_the_database_drops_its_connections(
    engine: AsyncEngine, database_url: str
) -> None:
    async def maintain() -> partitions.Maintenance:
        async with engine.begin() as conn:
            return await partitions.maintain(
                conn, delivery_retention_days=35, event_retention_days=400
            )

    await maintain()
    assert await terminate_backends(database_url) > 0
    with pytest.raises(sa_exc.DBAPIError) as failed:
        await maintain()
    assert is_unavailable(failed.value)
    await maintain()


async def test_the_dispatcher_recovers_after_the_database_drops_its_connections(
    engine: AsyncEngine,
    database_url: str,
    make_dispatcher: Callable[..., Dispatcher],
    shipengine: RunningSimulator,
) -> None:
    dispatcher = make_dispatcher()  # on `engine`, whose connections are ended below
    observer = create_engine(database_url, pool_size=1)  # the test's own, fresh, pool
    running = asyncio.create_task(dispatcher.run())
    try:
        await subscribe_many(observer, ["DISPATCH1"])
        await eventually(lambda: all_active(observer, 1))
        assert await terminate_backends(database_url) > 0
        await observer.dispose()  # the observer starts afresh; the dispatcher must cope
        await subscribe_many(observer, ["DISPATCH2"])
        await eventually(lambda: all_active(observer, 2), timeout_s=20)
        assert not running.done()
    finally:
        dispatcher.stop()
        await asyncio.wait_for(running, 10)
        await observer.dispose()


async def test_a_connection_lost_between_two_driver_statements_is_discarded(
    engine: AsyncEngine, database_url: str
) -> None:
    async def two_statements_and_a_restart_between() -> None:
        async with engine.begin() as conn:
            driver = await driver_connection(conn)
            await driver.execute("SELECT 1")
            await terminate_backends(database_url)
            await driver.execute("SELECT 2")

    with pytest.raises(sa_exc.DBAPIError) as failed:
        await two_statements_and_a_restart_between()
    assert is_unavailable(failed.value)
    async with engine.begin() as conn:
        driver = await driver_connection(conn)
        assert await driver.fetchval("SELECT 3") == 3


# -- a database that goes silent -----------------------------------------------------------------


class SilentableProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding without closing anything: what a
    failover whose old primary vanished, or a network partition, looks like to a client."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def go_silent(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()  # silent: the bytes are held, nothing is closed
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()


@pytest.fixture
async def silentable(database_url: str) -> AsyncIterator[tuple[SilentableProxy, str]]:
    url = make_url(database_url)
    proxy = SilentableProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    through = url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    yield proxy, through
    proxy.resume()
    await proxy.close()


async def test_a_database_gone_silent_is_a_503_not_a_hang(
    live_settings: Settings,
    token: str,
    silentable: tuple[SilentableProxy, str],
    shipengine: RunningSimulator,
) -> None:
    proxy, through = silentable
    settings = dataclasses.replace(
        live_settings,
        database_url=through,
        database_command_timeout_s=0.5,
        database_pool_timeout_s=0.5,
    )
    async with TestClient(TestServer(create_app(settings)), headers=bearer(token)) as api:
        calls: list[Call] = [list_subscriptions, subscribe]

        async def deliver(client: Client, n: int) -> ClientResponse:
            return await signed_delivery(client, shipengine, n)

        calls.append(deliver)
        for n, call in enumerate(calls):
            assert (await call(api, 10 * n)).status < 300
        proxy.go_silent()
        async with asyncio.timeout(20):  # a safety stop: a hang fails here, not in CI's limit
            for n, call in enumerate(calls):
                silent = await call(api, 10 * n + 1)
                assert silent.status == 503, await silent.text()
                assert silent.headers["Retry-After"].isdigit()
        proxy.resume()
        for n, call in enumerate(calls):
            answers = [(await call(api, 10 * n + k)).status for k in range(2, 5)]
            assert answers[-1] < 300, answers  # a dead connection costs one 503 at most
