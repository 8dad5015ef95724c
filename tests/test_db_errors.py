"""Which database errors mean "unavailable, wait and retry" and which "transient, run again"."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from service.db.errors import DatabaseOverloaded, is_disconnect, is_transient, is_unavailable


def wrapped(error: BaseException) -> BaseException:
    """As SQLAlchemy raises a driver error: its own, caused by the driver's."""
    try:
        raise sa_exc.DBAPIError("statement", {}, error) from error
    except sa_exc.DBAPIError as outer:
        return outer


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(),
        TimeoutError(),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.ConnectionFailureError("connection failure"),
        asyncpg.exceptions.AdminShutdownError("terminating connection: immediate shutdown"),
        asyncpg.exceptions.CrashShutdownError("terminating connection: crash of another"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_outages_are_unavailable_raw_or_wrapped(error: BaseException) -> None:
    assert is_unavailable(error)
    assert is_unavailable(wrapped(error))
    assert not is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_lost_conflicts_are_transient_raw_or_wrapped(error: BaseException) -> None:
    assert is_transient(error)
    assert is_transient(wrapped(error))
    assert not is_unavailable(error)


def test_a_bad_statement_is_neither() -> None:
    error = asyncpg.exceptions.UndefinedTableError('relation "nope" does not exist')
    assert not is_unavailable(error)
    assert not is_transient(wrapped(error))


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.InterfaceError("cannot call Connection.fetch(): connection is closed"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_lost_connection_is_a_disconnect_raw_or_wrapped(error: BaseException) -> None:
    assert is_disconnect(error)
    assert is_disconnect(wrapped(error))


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError(),  # a statement out of time: the connection is fine
        sa_exc.TimeoutError("QueuePool limit reached"),  # no free connection in the pool
        DatabaseOverloaded("4096 items already wait"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_busy_database_is_unavailable_but_no_disconnect(error: BaseException) -> None:
    assert is_unavailable(error)
    assert not is_disconnect(error)
