"""The async engine, built from the service's `postgresql://` URL."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


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


def create_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # Timestamps are read and written in UTC whatever the server's default zone.
        connect_args={"server_settings": {"timezone": "UTC", "application_name": "tracking"}},
    )
