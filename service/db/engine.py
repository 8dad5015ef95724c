"""The async engine, built from the service's `postgresql://` URL."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.settings import Settings


def sqlalchemy_url(database_url: str) -> URL:
    """`postgresql://...` (the setting's form) as SQLAlchemy's asyncpg URL."""
    return make_url(database_url).set(drivername="postgresql+asyncpg")


def asyncpg_dsn(database_url: str) -> str:
    """The URL as asyncpg's own `connect()` takes it (for LISTEN, which needs a raw connection)."""
    return (
        sqlalchemy_url(database_url)
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )


CONNECT_TIMEOUT_S = 5.0


def create_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    pool_timeout_s: float = 3.0,
    command_timeout_s: float = 15.0,
    statement_cache: bool = True,
) -> AsyncEngine:
    """`statement_cache=False` for PgBouncer in transaction mode, where a prepared statement
    made on one server connection may be missing on the next.

    `pool_timeout_s` is how long a request waits for a free connection before it is answered
    503: short, so that a saturated database sheds load instead of queueing it for SQLAlchemy's
    default 30 s. `command_timeout_s` bounds each statement (and each connection attempt, to
    CONNECT_TIMEOUT_S at most): a database that goes silent (a failover whose old primary
    vanished, a partition) answers nothing and resets nothing, and without a bound a request
    waited for TCP to give up, about 15 minutes, instead of answering 503."""
    url = sqlalchemy_url(database_url)
    connect_args: dict[str, object] = {
        # Timestamps are read and written in UTC whatever the server's default zone.
        "server_settings": {"timezone": "UTC", "application_name": "tracking"},
        "timeout": min(CONNECT_TIMEOUT_S, command_timeout_s),
        "command_timeout": command_timeout_s,
    }
    if not statement_cache:
        url = url.update_query_dict({"prepared_statement_cache_size": "0"})
        connect_args["statement_cache_size"] = 0
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No ping per checkout (three round trips each): after a restart the first statement
        # on a dead connection fails, SQLAlchemy drops the whole pool, and callers retry (the
        # dispatcher) or get one 503 (the API).
        pool_pre_ping=False,
        pool_timeout=pool_timeout_s,
        # Errors name their statement but not its values: those are callers' payloads, tokens'
        # hashes and webhook bodies, none of which may reach a log line.
        hide_parameters=True,
        connect_args=connect_args,
    )


def engine_from(settings: Settings, *, read_only: bool = False) -> AsyncEngine:
    """The primary's engine, or with `read_only` the replica's when DATABASE_READ_URL is set."""
    url = settings.database_url
    if read_only and settings.database_read_url:
        url = settings.database_read_url
    return create_engine(
        url,
        pool_size=settings.database_pool_size,
        pool_timeout_s=settings.database_pool_timeout_s,
        command_timeout_s=settings.database_command_timeout_s,
        statement_cache=settings.database_statement_cache,
    )
