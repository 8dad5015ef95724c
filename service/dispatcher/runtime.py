"""Building and running the dispatcher, with the reconciler and the notifier beside it: alone
(`python -m service dispatcher`) or in the API."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime

import aiohttp
import structlog
from aiohttp import web
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import health
from service.api.changes import change_out
from service.api.keys import ENGINE, METRICS, SETTINGS
from service.api.metrics_access import SCRAPE_ACCESS, ScrapeAccess
from service.db.engine import engine_from
from service.dispatcher.reconciler import Reconciler
from service.dispatcher.worker import Dispatcher
from service.domain.subscriptions import RetryPolicy
from service.domain.tracking import SILENCE_BEFORE_POLL_S
from service.metrics import Metrics
from service.notify import sending
from service.notify.worker import Clock, Notifier, wall_clock
from service.settings import Settings, mask_url
from service.shipengine.client import ShipEngineClient

log = structlog.get_logger(__name__)


def shipengine_session(settings: Settings) -> aiohttp.ClientSession:
    """One pooled keep-alive session for all of a process's ShipEngine calls."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.dispatch_concurrency)
    )


def shipengine_client(settings: Settings, session: aiohttp.ClientSession) -> ShipEngineClient:
    return ShipEngineClient(
        session,
        base_url=settings.shipengine_base_url,
        api_key=settings.require_api_key(),
        timeout_s=settings.shipengine_timeout_s,
    )


def build_dispatcher(
    settings: Settings,
    engine: AsyncEngine,
    session: aiohttp.ClientSession,
    metrics: Metrics | None = None,
) -> Dispatcher:
    client = shipengine_client(settings, session)
    return Dispatcher(
        engine,
        client.call,
        database_url=settings.database_url,
        concurrency=settings.dispatch_concurrency,
        lease_s=settings.dispatch_lease_s,
        poll_interval_s=settings.dispatch_poll_interval_s,
        shutdown_grace_s=settings.dispatch_shutdown_grace_s,
        retry_policy=RetryPolicy(
            base_s=settings.dispatch_retry_base_s,
            cap_s=settings.dispatch_retry_max_s,
            max_attempts=settings.dispatch_max_attempts,
        ),
        budget=settings.budget,
        metrics=metrics or Metrics(),
    )


def build_reconciler(
    settings: Settings,
    engine: AsyncEngine,
    session: aiohttp.ClientSession,
    metrics: Metrics | None = None,
    silence_s: Mapping[str | None, float] = SILENCE_BEFORE_POLL_S,
    clock: Callable[[], datetime] | None = None,
) -> Reconciler:
    return Reconciler(
        engine,
        shipengine_client(settings, session),
        budget=settings.budget,
        silence_s=silence_s,
        done_after_s=settings.tracking_done_after_s,
        interval_s=settings.reconcile_interval_s,
        batch=settings.reconcile_batch,
        rearm=settings.rearm_policy,
        metrics=metrics or Metrics(),
        stale_after_s=settings.stale_after_hours * 3600,
        clock=clock,
    )


def build_notifier(
    settings: Settings,
    engine: AsyncEngine,
    session: aiohttp.ClientSession,
    metrics: Metrics | None = None,
    clock: Clock = wall_clock,
) -> Notifier:
    return Notifier(
        engine,
        session,
        database_url=settings.database_url,
        render=render_change,
        per_endpoint=settings.notify_concurrency_per_endpoint,
        slots=settings.notify_concurrency,
        timeout_s=settings.notify_timeout_s,
        lease_s=settings.notify_lease_s,
        backlog=settings.notify_queue_per_endpoint,
        allowed_hosts=settings.notify_allowed_hosts,
        metrics=metrics or Metrics(),
        clock=clock,
    )


def render_change(change: RowMapping) -> bytes:
    """A notification's body: the change exactly as the feed shows it."""
    return change_out(change).model_dump_json().encode()


@contextlib.asynccontextmanager
async def running(
    settings: Settings, engine: AsyncEngine, metrics: Metrics
) -> AsyncIterator[Dispatcher]:
    """A dispatcher running in the background; on exit it stops and finishes in-flight calls."""
    async with (
        shipengine_session(settings) as session,
        sending.client_session(settings.notify_concurrency) as notify_session,
    ):
        dispatcher = build_dispatcher(settings, engine, session, metrics)
        reconciler = build_reconciler(settings, engine, session, metrics)
        notifier = build_notifier(settings, engine, notify_session, metrics)
        tasks = [
            asyncio.create_task(dispatcher.run(), name="dispatcher"),
            asyncio.create_task(reconciler.run(), name="reconciler"),
            asyncio.create_task(notifier.run(), name="notifier"),
        ]
        log.info("dispatcher.started", shipengine=settings.shipengine_base_url)
        try:
            yield dispatcher
        finally:
            dispatcher.stop()
            reconciler.stop()
            notifier.stop()
            await asyncio.gather(*tasks)
            log.info("dispatcher.stopped")


async def in_app(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx that runs a dispatcher inside the API process (`make run`)."""
    async with running(app[SETTINGS], app[ENGINE], app[METRICS]):
        yield


async def serve(settings: Settings) -> None:
    """Run a dispatcher until SIGINT or SIGTERM, with its health and metrics on a port."""
    settings.require_api_key()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    engine = engine_from(settings)
    metrics = Metrics()
    log.info("dispatcher.database", url=mask_url(settings.database_url))
    status_site = await _serve_status(settings, engine, metrics)
    try:
        async with running(settings, engine, metrics):
            await stop.wait()
    finally:
        if status_site is not None:
            await status_site.cleanup()
        await engine.dispose()


async def _serve_status(
    settings: Settings, engine: AsyncEngine, metrics: Metrics
) -> web.AppRunner | None:
    """/healthz, /readyz and /metrics of a dispatcher process, on DISPATCHER_STATUS_PORT;
    /metrics to a `metrics` token, as on the API's port."""
    if not settings.dispatcher_status_port:
        return None
    app = web.Application()
    app[ENGINE] = engine
    app[METRICS] = metrics
    app[SCRAPE_ACCESS] = ScrapeAccess()
    app.add_routes(health.routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.dispatcher_status_port).start()
    return runner
