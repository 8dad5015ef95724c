"""The application factory: wires the HTTP surface to its resources."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import asyncpg
import structlog
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from service.api import change_stream, changes, endpoints, health, openapi, ops, subscriptions
from service.api.auth import TOKENS, authenticate
from service.api.keys import (
    DELIVERY_COMMITS,
    ENGINE,
    METRICS,
    NOTIFY_HTTP,
    PINGS_IN_FLIGHT,
    READ_ENGINE,
    SETTINGS,
    SUBSCRIBE_COMMITS,
    VERIFIER,
)
from service.api.metrics_access import SCRAPE_ACCESS, ScrapeAccess
from service.api.middleware import (
    echo_request_id,
    json_errors,
    request_context,
    request_metrics,
)
from service.api.ops import SUMMARY, stop_recounting
from service.dashboard import create_dashboard
from service.dashboard.keys import DashboardOptions
from service.db import changes as change_feed
from service.db import notify, partitions
from service.db import subscriptions as queries
from service.db.deliveries import FiledDelivery, Incoming, file_incoming, shared_locks_sql
from service.db.engine import engine_from
from service.db.group_commit import GroupCommit
from service.db.subscriptions import NewSubscription, Subscribed
from service.metrics import Metrics
from service.notify import sending
from service.settings import Settings
from service.webhooks import receiver, replay
from service.webhooks.refusals import refusal_ledger
from service.webhooks.signatures import KeySet, SignatureVerifier

log = structlog.get_logger(__name__)

PARTITION_MAINTENANCE_INTERVAL_S = 3600.0
PARTITION_MAINTENANCE_START_S = 10.0
PRUNE_BATCH = 5000
# Pings (`POST /v1/endpoints/{id}/test`) in flight at once from one API process: room for
# sixteen clients at their limit (`endpoints.PINGS_PER_CLIENT`).
PING_CONNECTIONS = 32

# The API. Each handler declares its operation (`@operation`, service/api/operations.py), and
# GET /v1/openapi.json documents every one the app serves.
API_ROUTES = (
    subscriptions.routes,
    changes.routes,
    change_stream.routes,
    endpoints.routes,
    ops.routes,
    receiver.routes,
    replay.routes,
    openapi.routes,
    health.routes,
)


def create_app(settings: Settings) -> web.Application:
    """The API app; reads no environment and holds nothing at module level."""
    app = web.Application(
        middlewares=[request_context, request_metrics, json_errors, authenticate],
        client_max_size=settings.webhook_max_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[SCRAPE_ACCESS] = ScrapeAccess()
    app[TOKENS] = {}
    app[PINGS_IN_FLIGHT] = collections.Counter()
    app[SUMMARY] = {}
    app.on_cleanup.append(stop_recounting)
    app.on_response_prepare.append(echo_request_id)
    app.on_shutdown.append(change_stream.end_streams)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(change_stream.broadcasting)
    app.cleanup_ctx.append(_webhook_keys)
    app.cleanup_ctx.append(refusal_ledger)
    app.cleanup_ctx.append(_group_commits)
    app.cleanup_ctx.append(_partition_maintenance)
    app.cleanup_ctx.append(_notify_http)
    for routes in API_ROUTES:
        app.add_routes(routes)
    app.add_subapp("/dashboard", create_dashboard(_dashboard_options(settings)))
    return app


def api_router() -> web.UrlDispatcher:
    """The API's routes, without an app around them."""
    router = web.UrlDispatcher()
    for routes in API_ROUTES:
        router.add_routes(routes)
    return router


def document() -> dict[str, Any]:
    """The document GET /v1/openapi.json serves, without an app (for tests and tools)."""
    return openapi.document_of(api_router())


# What that document is made of: each route with what its handler declares.
OPERATIONS = openapi.operations_of(openapi.routes_of(api_router()))


def _dashboard_options(settings: Settings) -> DashboardOptions:
    return DashboardOptions(
        secure_cookie=settings.dashboard_cookie_secure, allowed_origin=settings.dashboard_origin
    )


async def _database(app: web.Application) -> AsyncIterator[None]:
    """The primary's engine, and the replica's for dashboard reads (the primary's if none)."""
    settings = app[SETTINGS]
    app[ENGINE] = engine_from(settings)
    app[READ_ENGINE] = (
        engine_from(settings, read_only=True) if settings.database_read_url else app[ENGINE]
    )
    yield
    await app[ENGINE].dispose()
    if app[READ_ENGINE] is not app[ENGINE]:
        await app[READ_ENGINE].dispose()


async def _notify_http(app: web.Application) -> AsyncIterator[None]:
    """The client of endpoint pings, made as the sender's are (the address checked at send)."""
    async with sending.client_session(PING_CONNECTIONS) as session:
        app[NOTIFY_HTTP] = session
        yield


async def _partition_maintenance(app: web.Application) -> AsyncIterator[None]:
    """Partitions are created ahead and dropped past retention, and the change feed is pruned
    (`_prune_changes`): once before the app serves
    (so a new database is ready at once), then every PARTITION_MAINTENANCE_INTERVAL_S. An
    unreachable database delays the start by at most PARTITION_MAINTENANCE_START_S."""
    try:
        async with asyncio.timeout(PARTITION_MAINTENANCE_START_S):
            await _maintain(app)
    except TimeoutError:
        log.warning("partitions.maintenance_deferred", timeout_s=PARTITION_MAINTENANCE_START_S)
    task = asyncio.create_task(_maintain_partitions_forever(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _maintain_partitions_forever(app: web.Application) -> None:
    while True:
        await asyncio.sleep(PARTITION_MAINTENANCE_INTERVAL_S)
        await _maintain(app)


async def _maintain(app: web.Application) -> None:
    await _maintain_partitions(app)
    await _prune_changes(app)


async def _maintain_partitions(app: web.Application) -> None:
    settings = app[SETTINGS]
    try:
        async with app[ENGINE].begin() as conn:
            done = await partitions.maintain(
                conn,
                delivery_retention_days=settings.delivery_retention_days,
                event_retention_days=settings.event_retention_days,
            )
    except Exception:
        # Inserts still work (a DEFAULT partition takes what has no partition); the next
        # round tries again.
        log.exception("partitions.maintenance_failed")
        return
    if done.created or done.dropped or done.purged:
        log.info("partitions.maintained", **done.as_json())


Prune = Callable[[AsyncConnection, int, int], Awaitable[int]]


async def _prune_changes(app: web.Application) -> None:
    """The change feed past CHANGE_RETENTION_DAYS, and the notification attempts that sent it.
    Deleted in small transactions: a long one would hold every feed reader back while it ran."""
    await _prune_in_batches(app, "changes", change_feed.prune)
    await _prune_in_batches(app, "notify_attempts", notify.prune_attempts)


async def _prune_in_batches(app: web.Application, what: str, prune: Prune) -> None:
    keep_days, deleted = app[SETTINGS].change_retention_days, 0
    try:
        while True:
            async with app[ENGINE].begin() as conn:
                batch = await prune(conn, keep_days, PRUNE_BATCH)
            deleted += batch
            if batch < PRUNE_BATCH:
                break
    except Exception:
        log.exception("retention.prune_failed", table=what, deleted=deleted)
        return
    if deleted:
        log.info("retention.pruned", table=what, deleted=deleted)


async def _group_commits(app: web.Application) -> AsyncIterator[None]:
    """Closed before the engine, so what is queued is committed first."""
    engine, rearm, sizes = app[ENGINE], app[SETTINGS].rearm_policy, app[METRICS].group_commit_size

    async def file(db: asyncpg.Connection, items: Sequence[Incoming]) -> list[FiledDelivery]:
        return await file_incoming(db, items, rearm)

    def shared_locks(items: Sequence[Incoming]) -> str:
        return shared_locks_sql(item.update.tracking_number for item in items)

    async def create(db: asyncpg.Connection, news: Sequence[NewSubscription]) -> list[Subscribed]:
        return await queries.subscribe(db, news, rearm)

    deliveries = GroupCommit(engine, file, sizes.labels("webhook").observe, opening=shared_locks)
    subscribes = GroupCommit(engine, create, sizes.labels("subscribe").observe)
    app[DELIVERY_COMMITS], app[SUBSCRIBE_COMMITS] = deliveries, subscribes
    for group_commit in (deliveries, subscribes):
        group_commit.start()
    yield
    await asyncio.gather(deliveries.close(), subscribes.close())


async def _webhook_keys(app: web.Application) -> AsyncIterator[None]:
    """ShipEngine's signing keys, fetched from its JWKS when first needed, then cached."""
    settings = app[SETTINGS]
    if not settings.webhook_verify:
        log.warning(
            "webhooks.verification_off",
            detail="WEBHOOK_VERIFY=false: deliveries are not authenticated; for local use only",
        )
    async with aiohttp.ClientSession() as session:
        keys = KeySet(
            session,
            settings.shipengine_jwks_url,
            refresh_interval_s=settings.webhook_keys_refresh_s,
        )
        app[VERIFIER] = SignatureVerifier(keys, tolerance_s=settings.webhook_timestamp_tolerance_s)
        yield
