"""Driver errors, translated at the query boundary into what callers can act on."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
from sqlalchemy import exc as sa_exc


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached now; the caller should answer 503 or retry later."""


def is_unavailable(error: BaseException) -> bool:
    """True when the error means the database is down or unreachable, not a bad query."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(
            cause,
            OSError
            | socket.gaierror
            | asyncio.TimeoutError
            | asyncpg.exceptions.CannotConnectNowError
            | asyncpg.exceptions.ConnectionDoesNotExistError
            | asyncpg.exceptions.TooManyConnectionsError
            | asyncpg.exceptions.AdminShutdownError,
        ):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
