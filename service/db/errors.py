"""Driver errors, translated at the query boundary into what callers can act on."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
from sqlalchemy import exc as sa_exc


class DatabaseOverloaded(Exception):
    """More work is waiting for the database than it is given time to do: shed it (503)."""


def is_unavailable(error: BaseException) -> bool:
    """True when the error means the database is down, unreachable or overloaded, not a bad
    query: a lost connection (`is_disconnect`), or a database too busy to answer in time."""
    if isinstance(error, DatabaseOverloaded):
        return True
    if isinstance(error, sa_exc.TimeoutError):
        return True  # no connection free in the pool within DATABASE_POOL_TIMEOUT_S
    return is_disconnect(error) or _caused_by(
        # A statement or a connection attempt out of time, too many connections.
        error,
        lambda cause: isinstance(cause, TimeoutError | asyncpg.exceptions.TooManyConnectionsError),
    )


def is_disconnect(error: BaseException) -> bool:
    """True when the error means the connection is gone (a restart, a failover, a backend
    ended): other connections to the same server are likely gone too. Not for a pool with
    no free connection or a statement that ran out of time, where the connections are fine."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return _caused_by(error, _is_lost_connection)


def _is_lost_connection(error: BaseException) -> bool:
    # OSError covers refused and reset connections and DNS failures (TimeoutError, an OSError
    # since Python 3.11, is a slow server, not a lost one); then the whole connection class
    # (08) and the server shutting down, crashed or starting up (57P01-57P03).
    return _is_closed_connection(error) or (
        isinstance(
            error,
            OSError
            | asyncpg.exceptions.PostgresConnectionError
            | asyncpg.exceptions.AdminShutdownError
            | asyncpg.exceptions.CrashShutdownError
            | asyncpg.exceptions.CannotConnectNowError,
        )
        and not isinstance(error, TimeoutError)
    )


def _caused_by(error: BaseException, test: Callable[[BaseException], bool]) -> bool:
    """Whether `error` or any error that caused it (a driver's, under SQLAlchemy's) passes."""
    cause: BaseException | None = error
    while cause is not None:
        if test(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _is_closed_connection(error: BaseException) -> bool:
    """asyncpg's word for a statement on a connection the server ended (pg_terminate_backend,
    a restart): the test SQLAlchemy's own dialect makes of it."""
    return isinstance(error, asyncpg.InterfaceError) and "connection is closed" in str(error)


# deadlock_detected and serialization_failure: nothing wrong with the statements, only with
# their timing; the same transaction run again commits.
_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})


def is_transient(error: BaseException) -> bool:
    """True when the transaction lost a deadlock or a serialization conflict: run it again."""
    return _caused_by(error, lambda cause: getattr(cause, "sqlstate", None) in _TRANSIENT_SQLSTATES)
